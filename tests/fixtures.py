"""What the tests set up, written once: worker processes and Flower under the fleet's own
Supervisor (as `fleet up` runs them), the provider simulator, a fresh Redis database, and
the reset of the fleet's live state. conftest.py registers the fixtures built from these;
tests/chaos/harness.py uses them directly. Imported as `tests.fixtures` (conftest.py puts
the repository root on sys.path)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis

from workers.ops.pools import worker_argv
from workers.ops.redis_server import free_port
from workers.ops.supervisor import Child, Supervisor
from workers.ops.up import flower_argv
from workers.sim.simulator import Simulator
from workers.state import keys

ROOT = Path(__file__).resolve().parents[1]
WORKER_READY = " ready."  # what `celery worker` logs once it consumes
FLOWER_READY = "Visit me at"  # what Flower logs once it serves (as `fleet up` waits for)
FINAL = ("SUCCESS", "FAILURE")
T = TypeVar("T")


def wait_until(predicate: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll `predicate` until it returns something true (returned); AssertionError naming
    `what` if it never does within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not seen within {timeout_s:g} s"
        time.sleep(0.02)


def reply_bytes(reply: object) -> bytes:
    """A reply to the tests' Redis clients, which do not decode responses: bytes. (redis-py's
    types say `bytes | str`, or wider, since they cannot tell how a client was made.)"""
    assert isinstance(reply, bytes), reply
    return reply


def reply_text(reply: object) -> str:
    """A reply to the tests' Redis clients (bytes, see reply_bytes) as text."""
    return reply_bytes(reply).decode()


# --- worker processes ------------------------------------------------------------------


class Workers:
    """Celery worker processes under one Supervisor, each logging to its own file.

    A worker is known by its label: the name given to start(), or else its queue (the
    session fleet's workers are `test-<queue>@host`, known by their queue)."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.supervisor = Supervisor(log_dir, env)
        self.by_label: dict[str, Child] = {}

    def start(
        self,
        queue: str,
        *,
        name: str | None = None,
        concurrency: int = 8,
        pool: str | None = None,
    ) -> Child:
        """Start a worker on `queue`, with the queue's pool kind unless `pool` is given
        (wait_ready() waits for it to consume)."""
        node = name or f"test-{queue}"
        argv = worker_argv([queue], pool=pool, concurrency=concurrency, name=node)
        child = self.supervisor.start(node, argv, ready_marker=WORKER_READY, cwd=ROOT)
        self.by_label[name or queue] = child
        return child

    def start_ledger_writer(self) -> Child:
        """The fleet's ledger writer (`fleet ledger-writer`), as `fleet up` runs it."""
        from workers.ledger.writer import READY as LEDGER_WRITER_READY
        from workers.ops.up import ledger_writer_argv

        child = self.supervisor.start(
            "ledger-writer", ledger_writer_argv(), ready_marker=LEDGER_WRITER_READY, cwd=ROOT
        )
        self.by_label["ledger-writer"] = child
        return child

    def wait_ready(self, timeout_s: float = 60, children: Iterable[Child] | None = None) -> None:
        self.supervisor.wait_ready(timeout_s, children)

    def log(self, label: str) -> str:
        return self.by_label[label].log()

    def kill(self, child: Child) -> None:
        """kill -9 the worker's main process (with a threads pool: every job it holds)."""
        self.supervisor.kill(child)

    def restart(self, child: Child, wait: bool = True) -> None:
        self.supervisor.restart(child)
        if wait:
            self.wait_ready(children=[child])

    def stop(self, timeout_s: float = 30) -> None:
        self.supervisor.stop(timeout_s)


# --- Flower ------------------------------------------------------------------------------


class Flower:
    """Flower on a free port, started as `fleet up` starts it (flower_argv: the basic auth
    comes from FLEET_FLOWER_BASIC_AUTH in `env`), from a scratch folder of its own, so no
    flowerconfig.py or state file is picked up or left behind."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        scratch = workdir / f"flower-{self.port}"
        scratch.mkdir(parents=True, exist_ok=True)
        self.supervisor = Supervisor(workdir, env)
        self.child = self.supervisor.start(
            f"flower-{self.port}", flower_argv(self.port, env), FLOWER_READY, cwd=scratch
        )

    @property
    def log_path(self) -> Path:
        return self.child.log_path

    def log(self) -> str:
        return self.child.log()

    def wait_answering(self, timeout_s: float = 30) -> None:
        self.supervisor.wait_ready(timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.get("/healthcheck")
                return
            except httpx.TransportError:
                if not self.child.alive():
                    raise RuntimeError(self.supervisor.describe_death(self.child)) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"flower did not answer:\n{self.log()[-3000:]}") from None
                time.sleep(0.05)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kwargs)

    def wait_workers(self, count: int, timeout_s: float = 30) -> None:
        """Flower knows a worker once it has seen its events (a heartbeat every 2 s): only
        then are the jobs' events sure to reach it."""
        self.wait_answering(timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.TransportError, ValueError):
                if len(self.get("/api/workers?status=1").json()) >= count:
                    return
            if not self.child.alive():
                raise RuntimeError(self.supervisor.describe_death(self.child))
            if time.monotonic() > deadline:
                raise TimeoutError(f"flower never saw {count} workers:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def tasks_when_final(self, ids: set[str], timeout_s: float = 30) -> dict[str, Any]:
        """/api/tasks once every job of `ids` has a final state there (or the deadline)."""
        deadline = time.monotonic() + timeout_s
        while True:
            tasks = self.get("/api/tasks").json()
            final = {i for i in ids if tasks.get(i, {}).get("state") in FINAL}
            if final == ids or time.monotonic() > deadline:
                return dict(tasks)
            time.sleep(0.1)

    def stop(self) -> None:
        self.supervisor.stop(10)


# --- the provider simulator --------------------------------------------------------------


def running_simulator(config: dict[str, Any] | None = None) -> Iterator[Simulator]:
    """A simulator on a free port for the fixture's life (a fixture's body)."""
    with Simulator(port=0, config=config) as sim:
        yield sim


# --- Redis -------------------------------------------------------------------------------


class Databases:
    """Redis databases 1-15 of the test redis-server (0 is the session fleet's), handed
    out one per test, empty, and taken back (emptied) when the test ends."""

    def __init__(self, server_url: str) -> None:
        self.base = server_url.rsplit("/", 1)[0]
        self.free = list(range(1, 16))

    def fresh(self) -> Iterator[redis.Redis]:
        if not self.free:
            raise RuntimeError("more than 15 Redis databases in use at once")
        db = self.free.pop(0)
        client = redis.Redis.from_url(f"{self.base}/{db}")
        client.flushdb()
        try:
            yield client
        finally:
            client.flushdb()
            client.close()
            self.free.insert(0, db)


@contextlib.contextmanager
def running_workers(
    env: dict[str, str], log_dir: Path, queue: str, names: list[str], concurrency: int
) -> Iterator[Workers]:
    """Worker processes on `queue`, one per name, ready; stopped on the way out."""
    workers = Workers(env, log_dir)
    try:
        for name in names:
            workers.start(queue, name=name, concurrency=concurrency)
        workers.wait_ready()
        yield workers
    finally:
        workers.stop()


def url_of(client: redis.Redis) -> str:
    """The redis:// URL of the database `client` talks to (for FLEET_* variables)."""
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs.get('host', '127.0.0.1')}:{kwargs['port']}/{kwargs.get('db', 0)}"


LIVE_STATE_KINDS = ("cooldown", "circuit", "window", "lacks")


def reset_live_state(target: redis.Redis | Mapping[str, str]) -> None:
    """Forget every model's cooldown, circuit, rate windows and capability rests, so
    the next jobs meet every model usable whatever ran before. `target`: a client of the
    state Redis, or a fleet environment (FLEET_BROKER_URL / FLEET_STATE_URL) naming it."""
    if isinstance(target, redis.Redis):
        _delete_live_state(target)
        return
    from workers.config import fleet_urls

    with redis.Redis.from_url(fleet_urls(target)[1]) as client:
        _delete_live_state(client)


def _delete_live_state(client: redis.Redis) -> None:
    for kind in LIVE_STATE_KINDS:
        found = list(client.scan_iter(f"{keys.PREFIX}:{kind}:*", count=1000))
        if found:
            client.delete(*found)


def ledger_rows(
    env: Mapping[str, str], job_id: str, wait_s: float = 20
) -> dict[int, dict[str, Any]]:
    """The job's ledger rows by attempt number, once the fleet's ledger writer (or this
    drain of its spool) has written them; {} if none come within `wait_s`."""
    from sqlalchemy import select

    from workers.ledger.schema import attempts
    from workers.ledger.store import Ledger

    ledger = Ledger(env["FLEET_LEDGER_URL"], redis_url=env.get("FLEET_BROKER_URL"))
    try:
        deadline = time.monotonic() + wait_s
        while True:
            ledger.drain()
            with ledger.engine.connect() as conn:
                found = conn.execute(select(attempts).where(attempts.c.job_id == job_id))
                rows = {row["attempt"]: dict(row) for row in found.mappings()}
            if rows or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)
    finally:
        ledger.close()
