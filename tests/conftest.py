"""Session fixtures: a real redis-server on a free port, the provider simulator over real
HTTP, the tiny generated MLX model, and real Celery worker processes, one per queue."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.catalog import QUEUES
from workers.ops.pools import worker_argv
from workers.ops.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]

# The suite holds ~1,000 sockets at once (the concurrency tests) on top of its fleet's:
# lift the soft open-file limit to the hard one, as a server process would.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


@pytest.fixture(autouse=True)
def _open_file_limit() -> None:
    # Importing mlx_lm (the tiny model's build does) sets this process's limit to
    # (2048, 4096), whatever it was: lift the soft limit again before every test.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


PROVIDER_TIMEOUT_S = 2.0  # the simulated catalog's timeout: the 'timeout' fault waits this


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def simulator() -> Iterator[object]:
    from workers.sim.simulator import Simulator

    sim = Simulator().start()
    yield sim
    sim.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.sim.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def fleet_env(
    redis_server: RedisServer,
    simulator: object,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    from workers.sim.simulated import simulated_env

    data = tmp_path_factory.mktemp("fleet")
    env = {
        **os.environ,
        "FLEET_BROKER_URL": redis_server.url,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        **simulated_env(simulator.url, tiny_model_dir, data, PROVIDER_TIMEOUT_S),  # type: ignore[attr-defined]
        # Every test worker records its jobs' attempts in this one ledger (test_ledger reads it).
        "FLEET_LEDGER_URL": f"sqlite:///{data / 'ledger.db'}",
    }
    env.pop("FLEET_STATE_URL", None)
    return env


class Workers:
    """Worker processes, one per queue, with their logs kept for assertions."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, queue: str, concurrency: int = 8) -> None:
        log = open(self.log_dir / f"{queue}.log", "wb")  # noqa: SIM115 - closed in stop()
        argv = worker_argv([queue], concurrency=concurrency, name=f"test-{queue}")
        self.procs[queue] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log, cwd=ROOT)
        log.close()

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(self.procs)
        while pending:
            for queue in list(pending):
                if self.procs[queue].poll() is not None:
                    raise RuntimeError(f"worker {queue} exited:\n{self.log(queue)[-3000:]}")
                if " ready." in self.log(queue):
                    pending.discard(queue)
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready: {sorted(pending)}")
            time.sleep(0.1)

    def log(self, queue: str) -> str:
        return (self.log_dir / f"{queue}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for queue, proc in self.procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(f"worker {queue} did not stop on SIGTERM", file=sys.stderr)


@pytest.fixture(scope="session")
def fleet_workers(
    fleet_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    workers = Workers(fleet_env, tmp_path_factory.mktemp("worker-logs"))
    for queue in QUEUES:
        workers.start(queue)
    workers.wait_ready()
    yield workers
    workers.stop()


@pytest.fixture
def fleet_app(fleet_env: dict[str, str], fleet_workers: Workers, monkeypatch: pytest.MonkeyPatch):
    """The test process as a dispatcher: FLEET_* pointing at the test fleet."""
    for key in ("FLEET_BROKER_URL", "FLEET_CATALOG"):
        monkeypatch.setenv(key, fleet_env[key])
    from workers.runtime.celery_app import get_app

    return get_app()


_databases = iter(range(1, 16))  # db 0 is the test fleet's


@pytest.fixture
def fresh_redis(redis_server: RedisServer) -> Iterator[object]:
    """A client of a Redis database no other test of this session uses, empty."""
    import redis

    try:
        db = next(_databases)
    except StopIteration:
        pytest.fail("more than 15 tests asked for a fresh Redis database: reuse or raise")
    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{db}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
