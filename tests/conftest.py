"""Session fixtures: a real redis-server on a free port, the provider simulator over real
HTTP, the tiny generated MLX models (chat and embedding), and real Celery worker processes,
one per queue. The helpers behind them live in tests/fixtures.py; this file only registers
them."""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.fixtures`, as the chaos harness imports it too
    sys.path.insert(0, str(ROOT))

from router.catalog import QUEUES  # noqa: E402
from tests import fixtures  # noqa: E402
from workers.ops.redis_server import RedisServer  # noqa: E402
from workers.sim.simulator import Simulator  # noqa: E402

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
def simulator() -> Iterator[Simulator]:
    """The simulator the session fleet's providers point at."""
    yield from fixtures.running_simulator()


@pytest.fixture(scope="module")
def module_simulator() -> Iterator[Simulator]:
    yield from fixtures.running_simulator()


@pytest.fixture
def sim(module_simulator: Simulator) -> Simulator:
    """A simulator of the test module's own (no fleet calls it), reset for each test."""
    module_simulator.reset()
    return module_simulator


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.sim.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny_embedding_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen3 embedding model laid out as Qwen3-Embedding is (workers/sim/tiny_model.py)."""
    from workers.sim.tiny_model import build_tiny_embedding_model

    return build_tiny_embedding_model(tmp_path_factory.mktemp("tiny-embedding") / "model")


@pytest.fixture(scope="session")
def fleet_env(
    redis_server: RedisServer,
    simulator: Simulator,
    tiny_model_dir: Path,
    tiny_embedding_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    from workers.sim.simulated import simulated_env

    data = tmp_path_factory.mktemp("fleet")
    env = {
        **os.environ,
        "FLEET_BROKER_URL": redis_server.url,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        **simulated_env(
            simulator.url, tiny_model_dir, data, PROVIDER_TIMEOUT_S, tiny_embedding_model_dir
        ),
        # Every test worker records its jobs' attempts in this one ledger (test_ledger reads it).
        "FLEET_LEDGER_URL": f"sqlite:///{data / 'ledger.db'}",
    }
    env.pop("FLEET_STATE_URL", None)
    return env


@pytest.fixture(scope="session")
def fleet_workers(
    fleet_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[fixtures.Workers]:
    """One worker per queue (`test-<queue>@host`) and the ledger writer, under the
    fleet's Supervisor."""
    workers = fixtures.Workers(fleet_env, tmp_path_factory.mktemp("worker-logs"))
    for queue in QUEUES:
        workers.start(queue)
    workers.start_ledger_writer()
    workers.wait_ready()
    yield workers
    workers.stop()


@pytest.fixture
def fleet_app(
    fleet_env: dict[str, str], fleet_workers: fixtures.Workers, monkeypatch: pytest.MonkeyPatch
):
    """The test process as a dispatcher: FLEET_* pointing at the test fleet."""
    for key in ("FLEET_BROKER_URL", "FLEET_CATALOG"):
        monkeypatch.setenv(key, fleet_env[key])
    from workers.runtime.celery_app import get_app

    return get_app()


@pytest.fixture(scope="session")
def _databases(redis_server: RedisServer) -> fixtures.Databases:
    return fixtures.Databases(redis_server.url)


@pytest.fixture
def fresh_redis(_databases: fixtures.Databases) -> Iterator[object]:
    """A client of a Redis database of the test server that no other running test uses,
    empty (emptied again, and handed back, when the test ends). fixtures.url_of() gives
    its URL for FLEET_* variables."""
    yield from _databases.fresh()
