"""Celery's own commands find the fleet's app as `-A workers` (through workers/celery.py),
while importing `workers` loads no Celery and the submodule's name shadows the library
for no module of the package. (`celery -A workers beat` and `flower` run in test_beat.py
and test_flower.py, through the argv `fleet up` uses.)"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from router import dispatch
from tests.fixtures import WORKER_READY, url_of
from workers.ops.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("router", "gateway", "workers")
JOB = {"task_class": "cost_free", "messages": [{"role": "user", "content": "hello"}]}


def run_python(code: str) -> Any:
    """What `code`, run by a fresh interpreter from the repository root, printed (JSON)."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_importing_workers_loads_no_celery() -> None:
    loaded = run_python("import sys, json, workers\nprint(json.dumps(sorted(sys.modules)))")
    assert "workers" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("celery", "kombu", "redis")]


def test_the_package_finds_the_celery_library_and_celery_finds_the_fleet_app() -> None:
    found = run_python(
        "import json, celery, workers.celery\n"
        "from celery.app.utils import find_app\n"
        "from workers.runtime import celery_app\n"
        "print(json.dumps([celery.__file__, celery_app.Celery is celery.Celery,\n"
        "    find_app('workers') is workers.celery.app is celery_app.get_app()]))"
    )
    library, same_class, same_app = found
    assert not Path(library).is_relative_to(ROOT / "workers"), library
    assert same_class and same_app


def test_no_module_imports_the_celery_library_relatively() -> None:
    # A relative `from . import celery` (or `.celery`) in the workers package would reach
    # workers/celery.py, not the library: every module imports Celery absolutely.
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level:
                    names = [node.module or "", *(alias.name for alias in node.names)]
                    assert "celery" not in names, f"{path}: a relative import of celery"


@pytest.fixture
def broker(
    fleet_env: dict[str, str], fresh_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The fleet's environment on a Redis database of this test's own (no worker of the
    session fleet consumes it); the test process dispatches there too."""
    env = {**fleet_env, "FLEET_BROKER_URL": url_of(fresh_redis)}
    env.pop("FLEET_STATE_URL", None)
    for key in ("FLEET_BROKER_URL", "FLEET_CATALOG"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("FLEET_STATE_URL", raising=False)
    return env


def test_celery_dash_a_workers_starts_a_worker_that_answers_jobs(
    broker: dict[str, str], tmp_path: Path
) -> None:
    # Given `celery -A workers worker -Q free`, the command a Celery user types first,
    # started from a folder of its own (the package comes from PYTHONPATH, as installed)
    argv = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "free"]
    argv += ["-P", "threads", "-c", "2", "-n", "conventions@%h", "-l", "INFO"]
    sup = Supervisor(tmp_path / "logs", broker)
    worker = sup.start("conventions", argv, ready_marker=WORKER_READY, cwd=tmp_path)
    try:
        sup.wait_ready(60)
        # When a job is sent with the client's dispatch()
        result = dispatch(JOB).get(timeout=30)
    finally:
        sup.stop(30)

    # Then that worker answered it, and its banner names the broker by its redis:// URL
    assert result.ok and result.queue_path == ["free"], result
    log = worker.log()
    assert "conventions@" in log and "[tasks]" in log and "fleet.run_job" in log, log[-3000:]
    assert f"transport:   {broker['FLEET_BROKER_URL'].replace('//', '//:**@', 1)}" in log
