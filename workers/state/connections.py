"""Every Redis client the fleet makes, with one set of timeouts, and its Lua scripts.

    client = redis_client()                  # this process's client of the state Redis
    admit = script(client, "admit")          # workers/state/scripts/admit.lua, by EVALSHA

A client is made once per (process, URL) and shared by its threads (redis-py pools its
connections, and a forked child gets a fresh pool). The scripts live as `.lua` files
beside this module and are registered once: each call sends the script's SHA, not its
text, and a Redis that lost its script cache (a restart) is sent the text once again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from workers.config import fleet_urls

SOCKET_TIMEOUT_S = 5.0  # a command that takes longer means Redis is in trouble
CONNECT_TIMEOUT_S = 2.0  # Redis is on the same network: refusal or silence comes fast
HEALTH_CHECK_S = 30  # a connection idle this long is pinged before use
SCRIPTS = Path(__file__).parent / "scripts"

_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}


def new_client(url: str) -> redis.Redis:
    """A client of its own (the caller closes it): for a process about to fork, a
    short-lived command, or a test."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        health_check_interval=HEALTH_CHECK_S,
    )


def redis_client(url: str | None = None, environ: Mapping[str, str] = os.environ) -> redis.Redis:
    """This process's shared client of `url` (default: the fleet's state Redis)."""
    url = url or fleet_urls(environ)[1]
    with _lock:
        if url not in _clients:
            _clients[url] = new_client(url)
        return _clients[url]


@cache
def source(name: str, included: bool = False) -> str:
    """A script's text, with each `--!include NAME` line replaced by NAME.lua up to its
    `--!main` line, if it has one (Lua has no imports inside Redis: shared functions are
    pasted in before the script is sent; what follows `--!main` runs the script alone)."""
    text = (SCRIPTS / f"{name}.lua").read_text(encoding="utf-8")
    if included:
        text = text.split("--!main\n", 1)[0]
    return "".join(
        source(line.split()[1], included=True) if line.startswith("--!include ") else line
        for line in text.splitlines(keepends=True)
    )


_registered: dict[tuple[int, str], Script] = {}


def script(client: Any, name: str) -> Script:
    """The script `name` registered on `client` (computed once: its SHA, its text)."""
    key = (id(client), name)
    found = _registered.get(key)
    if found is None or found.registered_client is not client:
        found = _registered[key] = client.register_script(source(name))
    return found


def preload(client: Any, names: list[str]) -> None:
    """Put scripts in Redis' cache ahead of their first call (a worker's warm-up)."""
    for name in names:
        client.script_load(source(name))


class Pipeline:
    """One round trip of commands (no transaction) in which script calls survive a Redis
    that lost its script cache (a restart): a NOSCRIPT reply is redone with the text.

        batch = Pipeline(client)
        batch.pipe.incr("a")                       # any redis-py command
        batch.script("cool", [key], [ms, why])     # a script, by EVALSHA
        replies = batch.execute()                  # raises the first error
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pipe = client.pipeline(transaction=False)
        self._scripts: dict[int, tuple[Script, list[Any], list[Any]]] = {}

    def script(self, name: str, keys: list[Any], args: list[Any]) -> None:
        scr = script(self.client, name)
        self._scripts[len(self.pipe.command_stack)] = (scr, keys, args)
        self.pipe.evalsha(scr.sha, len(keys), *keys, *args)

    def __len__(self) -> int:
        return len(self.pipe.command_stack)

    def execute(self) -> list[Any]:
        if not len(self):
            return []
        replies: list[Any] = self.pipe.execute(raise_on_error=False)
        for index, (scr, keys, args) in self._scripts.items():
            if isinstance(replies[index], NoScriptError):
                replies[index] = scr(keys=keys, args=args)
        self._scripts.clear()
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies
