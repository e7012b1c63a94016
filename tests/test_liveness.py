"""Liveness on the fleet's broker transport (workers/runtime/liveness.py), with real
workers, a real redis-server and the simulator: a killed worker's jobs are back within
seconds of the kill, and a live worker's long call is made once, whatever its pool."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client import dispatch
from tests.fixtures import url_of
from workers.ops.pools import worker_argv
from workers.ops.supervisor import Supervisor
from workers.runtime.celery_app import get_app
from workers.sim.simulated import simulated_env
from workers.sim.simulator import Simulator
from workers.state import keys

pytestmark = pytest.mark.slow
JOB = {"task_class": "cost_free", "messages": [{"role": "user", "content": "hello"}]}
READY = " ready."


@pytest.fixture
def fleet(
    fresh_redis: Any,
    sim: Simulator,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[dict[str, str], Any]]:
    """A fleet environment of this test's own: its Redis database and its simulator,
    whose calls may take up to 90 s (the catalog's timeout)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
        **simulated_env(sim.url, tiny_model_dir, tmp_path / "data", timeout_s=90),
        "FLEET_BROKER_URL": url_of(fresh_redis),
        "FLEET_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    for key in ("FLEET_BROKER_URL", "FLEET_CATALOG"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("FLEET_STATE_URL", raising=False)
    yield env, sim


def calls_per_job(sim: Simulator) -> Counter[str]:
    return Counter(str(r["job"]) for r in sim.requests() if r.get("job"))


def wait_for(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_killed_workers_jobs_are_answered_within_seconds(
    fleet: tuple[dict[str, str], Simulator], tmp_path: Path
) -> None:
    env, sim = fleet
    sim.configure(default={"latency_ms": 3000})
    sup = Supervisor(tmp_path / "logs", env)  # default settings: lapse 4 s, visibility 600 s
    workers = [
        sup.start(name, worker_argv(["free"], pool="threads", concurrency=4, name=name), READY)
        for name in ("live-a", "live-b")
    ]
    try:
        sup.wait_ready(90)
        # Given two workers each holding jobs mid-call
        handles = [dispatch(JOB, app=get_app()) for _ in range(8)]
        wait_for(lambda: sum(calls_per_job(sim).values()) == 8, 20)
        # When one is killed -9 and restarted at once (as a supervisor would)
        sup.kill(workers[0])
        killed_at = time.monotonic()
        sup.restart(workers[0])
        # Then every job is answered within 10 s of the kill (its held jobs back at its
        # lapse, not at the 600 s visibility timeout)
        for handle in handles:
            assert handle.get(timeout=max(0.1, killed_at + 10 - time.monotonic())).ok
        within = time.monotonic() - killed_at
        # and only the killed worker's jobs were called again, once each
        calls = calls_per_job(sim)
        assert set(calls.values()) <= {1, 2} and sum(calls.values()) in range(9, 13), calls
        assert within < 10
    finally:
        sup.stop(20)


@pytest.mark.timeout(240)
def test_a_long_call_is_made_once_on_every_pool(
    fleet: tuple[dict[str, str], Simulator], tmp_path: Path
) -> None:
    env, sim = fleet
    # Given a provider that takes 45 s, a lapse of 1 s and a visibility timeout of 5 s
    sim.configure(default={"latency_ms": 45_000})
    env = {**env, "FLEET_WORKER_LAPSE_S": "1", "FLEET_VISIBILITY_TIMEOUT_S": "5"}
    sup = Supervisor(tmp_path / "logs", env)
    pools = ("threads", "prefork", "solo")
    for pool in pools:
        sup.start(pool, worker_argv(["free"], pool=pool, concurrency=1, name=pool), READY)
    try:
        sup.wait_ready(90)
        # When three jobs go to three one-slot workers, one each, and a worker with free
        # slots joins (it would take any job handed out again)
        handles = [dispatch(JOB, app=get_app()) for _ in pools]
        wait_for(lambda: sum(calls_per_job(sim).values()) == len(pools), 20)
        spare = sup.start(
            "spare", worker_argv(["free"], pool="threads", concurrency=4, name="spare"), READY
        )
        sup.wait_ready(90, [spare])
        results = [h.get(timeout=120) for h in handles]
        # Then each was answered by one call: no worker's call was made again while it
        # waited, whatever its pool
        assert all(r.ok for r in results)
        assert calls_per_job(sim) == Counter({h.id: 1 for h in handles})
        workers = {a.worker.split("@")[0] for r in results for a in r.attempts if a.worker}
        assert workers == set(pools)
    finally:
        sup.stop(20)


# A quarter of the fleet's default lapse (4 s): at 0.5 s the whole suite's load on two
# cores once starved the busy process past it (14 ms late), not its GIL.
BUSY_LAPSE_S = 1.0
BUSY_PROCESS = (
    f"LAPSE_S = {BUSY_LAPSE_S}\n"
    + """
import sys, threading, time
from mlx_lm import generate, load
from workers.runtime import liveness

url_host, url_port, db, model_dir, seconds = sys.argv[1:6]
beat = liveness.Beat({"host": url_host, "port": int(url_port), "db": int(db)}, LAPSE_S)
beat.consume(["busy-list"])
model, tokenizer = load(model_dir)

def spin():  # pure Python: holds the GIL but for the interpreter's switches
    end = time.monotonic() + float(seconds)
    n = 0
    while time.monotonic() < end:
        n += 1

spinners = [threading.Thread(target=spin) for _ in range(4)]
for s in spinners:
    s.start()
print(beat.process, flush=True)
end = time.monotonic() + float(seconds)
while time.monotonic() < end:  # the main thread generates, as a solo pool's task would
    generate(model, tokenizer, prompt="hello", max_tokens=200)
for s in spinners:
    s.join()
"""
)


def test_the_beat_goes_on_while_the_process_is_busy(
    fresh_redis: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given a process whose main thread generates with MLX and whose four other threads
    # spin in pure Python, beating with a lapse of BUSY_LAPSE_S
    kwargs = fresh_redis.connection_pool.connection_kwargs
    script = tmp_path / "busy.py"
    script.write_text(BUSY_PROCESS)
    argv = [sys.executable, str(script), "127.0.0.1", str(kwargs["port"]), str(kwargs["db"])]
    root = Path(__file__).resolve().parents[1]
    busy = subprocess.Popen(
        [*argv, str(tiny_model_dir), "6"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        process = (busy.stdout.readline() if busy.stdout else "").strip()
        assert process, "the busy process did not start"
        # Then its deadline never passes while it is busy: nobody would take its jobs
        worst = 0.0
        end = time.monotonic() + 5
        while time.monotonic() < end:
            deadline = fresh_redis.zscore(keys.BROKER_HOLDERS, process)
            seconds, micros = fresh_redis.time()
            now_ms = seconds * 1000 + micros / 1000
            assert deadline is not None and deadline > now_ms, "its beat lapsed while busy"
            worst = max(worst, BUSY_LAPSE_S * 1000 - (deadline - now_ms))  # its last beat's age
            time.sleep(0.02)
        assert worst < BUSY_LAPSE_S * 1000
    finally:
        busy.wait(30)
        if busy.stdout:
            busy.stdout.close()
