"""`fleet up`: the whole fleet on one machine, in one process tree.

A private redis-server (when FLEET_BROKER_URL is unset; data under the data dir, append-only
so queued jobs survive a restart), one worker per queue, beat (once per fleet) and Flower.
Ctrl-C or SIGTERM stops every child cleanly. The data dir holds a lock, so a second
`fleet up` on it says the fleet is already running, and `up.json`, from which `fleet submit`
finds the broker.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from gateway.serve import READY as GATEWAY_READY
from router.catalog import QUEUES
from router.errors import ConfigError
from workers.config import data_dir, read_up_info
from workers.ledger.writer import READY as LEDGER_WRITER_READY
from workers.ops.pools import worker_argv
from workers.ops.redis_server import RedisServer
from workers.ops.supervisor import Supervisor

FLOWER_PORT = 5555
GATEWAY_PORT = 8080


@contextmanager
def exclusive(directory: Path) -> Iterator[None]:
    """Hold the data dir's lock, or ConfigError naming who holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "up.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = read_up_info(directory)
            raise ConfigError(
                f"the fleet is already running on {directory} (pid {info.get('pid', '?')},"
                f" broker {info.get('broker_url', '?')}); stop it first"
            ) from None
        try:
            yield
        finally:
            (directory / "up.json").unlink(missing_ok=True)


def flower_argv(port: int, environ: Mapping[str, str]) -> list[str]:
    argv = [sys.executable, "-m", "celery", "-A", "workers", "flower"]
    argv += ["--address=127.0.0.1", f"--port={port}"]
    auth = environ.get("FLEET_FLOWER_BASIC_AUTH") or environ.get("FLOWER_BASIC_AUTH")
    if auth:
        argv.append(f"--basic-auth={auth}")
    return argv


def ledger_writer_argv() -> list[str]:
    return [sys.executable, "-m", "workers.cli", "ledger-writer"]


def gateway_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "workers.cli", "serve", "--port", str(port)]


def start_fleet(
    sup: Supervisor,
    directory: Path,
    *,
    beat: bool,
    flower_port: int | None,
    gateway_port: int | None = None,
) -> None:
    for queue in QUEUES:
        sup.start(f"worker-{queue}", worker_argv([queue]), ready_marker=" ready.")
    sup.start("ledger-writer", ledger_writer_argv(), ready_marker=LEDGER_WRITER_READY)
    if beat:
        schedule = str(directory / "beat-schedule")
        argv = [sys.executable, "-m", "celery", "-A", "workers", "beat"]
        sup.start("beat", [*argv, "-s", schedule, "-l", "INFO"], ready_marker="beat: Starting")
    if flower_port:
        sup.start("flower", flower_argv(flower_port, sup.env), ready_marker="Visit me at")
    if gateway_port is not None:
        sup.start("gateway", gateway_argv(gateway_port), ready_marker=GATEWAY_READY)


def run_up(
    *,
    beat: bool = True,
    flower_port: int | None = FLOWER_PORT,
    gateway_port: int | None = GATEWAY_PORT,
    out: TextIO = sys.stdout,
) -> int:
    directory = data_dir()
    with exclusive(directory):
        env = dict(os.environ)
        redis = None
        if not env.get("FLEET_BROKER_URL"):
            redis = RedisServer(directory / "redis").start()
            env["FLEET_BROKER_URL"] = redis.url
        sup = Supervisor(directory / "logs", env)
        stopping: list[int] = []
        previous = {
            s: signal.signal(s, lambda n, _f: stopping.append(n))
            for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            start_fleet(
                sup, directory, beat=beat, flower_port=flower_port, gateway_port=gateway_port
            )
            sup.wait_ready()
            info = {
                "pid": os.getpid(),
                "broker_url": env["FLEET_BROKER_URL"],
                "started": time.time(),
            }
            if flower_port:
                info["flower"] = f"http://127.0.0.1:{flower_port}"
            if gateway_port is not None:
                info["gateway"] = _gateway_url(sup)
            (directory / "up.json").write_text(json.dumps(info))
            _print_banner(out, directory, sup, info)
            _print_doctor(out, env)
            while not stopping and not sup.dead():
                time.sleep(0.2)
            dead = sup.dead()
            if dead and not stopping:
                print(sup.describe_death(dead[0]), file=sys.stderr)
                return 1
            print("fleet: stopping...", file=out, flush=True)
            return 0
        finally:
            sup.stop()
            if redis is not None:
                redis.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _print_doctor(out: TextIO, env: Mapping[str, str]) -> None:
    """`fleet doctor`'s summary, without its probe: a few seconds at most (its TCP connects
    and Celery's inspect have short timeouts). A failing check never stops the fleet."""
    from router.catalog import load_catalog
    from workers.ops.doctor import diagnose, summary

    try:
        lines = summary(diagnose(load_catalog(), env))
    except Exception as exc:  # the fleet is up either way: say why there is no summary
        lines = [f"doctor: could not run: {type(exc).__name__}: {exc}"]
    for line in lines:
        print(line, file=out, flush=True)


def _gateway_url(sup: Supervisor) -> str:
    """The URL the gateway printed when it started listening."""
    child = next(c for c in sup.children if c.name == "gateway")
    line = next(x for x in child.log().splitlines() if GATEWAY_READY in x)
    return line.split(GATEWAY_READY, 1)[1].strip()


def _print_banner(out: TextIO, directory: Path, sup: Supervisor, info: dict[str, Any]) -> None:
    print(f"fleet up: data dir {directory}", file=out)
    print(f"  broker  {info['broker_url']}", file=out)
    for child in sup.children:
        pid = child.process.pid if child.process else "?"
        print(f"  {child.name:<20} pid {pid:<8} log {child.log_path}", file=out)
    if "flower" in info:
        print(f"  flower  {info['flower']}", file=out)
    if "gateway" in info:
        print(
            f"  gateway {info['gateway']}  (OpenAI-compatible; keys: fleet keys create APP)",
            file=out,
        )
    print("Ctrl-C stops the fleet.", file=out, flush=True)
