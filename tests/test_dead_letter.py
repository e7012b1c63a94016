"""Jobs that end without an answer land in the dead-letter store; poison messages stop
after a bounded number of deliveries; idempotency keys run a job once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis as redis_lib

from router import JobFailed, dispatch
from workers.runtime.sending import TASK_RUN_JOB

FLEET = str(Path(sys.executable).with_name("fleet"))
LLAMA_UPSTREAM = "meta-llama/llama-3.1-405b-instruct:free"


def ask(text: str, **fields):
    return {"messages": [{"role": "user", "content": text}], **fields}


def fleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEET, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def state_redis(fleet_app):
    client = redis_lib.Redis.from_url(fleet_app.conf.broker_url)
    client.delete(
        *client.keys("fleet:cooldown:*") or ["-"], *client.keys("fleet:circuit:*") or ["-"]
    )
    yield client
    client.delete(
        *client.keys("fleet:cooldown:*") or ["-"], *client.keys("fleet:circuit:*") or ["-"]
    )
    client.close()


def test_a_job_failing_everywhere_is_dead_lettered_and_can_be_replayed(
    fleet_app, fleet_env, simulator, state_redis
) -> None:
    # Given every model of the creative chain answering 500 for a while
    models = ["glm-4.7", "MiniMax-M2.1", "trinity-free", LLAMA_UPSTREAM]
    simulator.configure(models={m: {"fault": "500"} for m in models})
    try:
        handle = dispatch(ask("poison", task_class="creative", max_tokens=4))
        with pytest.raises(JobFailed) as caught:
            handle.get(timeout=90)
    finally:
        simulator.reset()
    failed = caught.value.result
    assert "every model failed" in failed["error"]
    # Then it is in the dead-letter store, with every attempt's reason
    listed = json.loads(fleet(fleet_env, "dead-letter", "list", "--json").stdout)
    mine = [e for e in listed if e["job_id"] == handle.id]
    assert mine and mine[0]["attempts"] == len(failed["attempts"]) == 8  # 4 models x 2 tries
    assert "every model failed" in mine[0]["error"]
    # And a replay (once the providers are back) answers it under a new id
    done = fleet(fleet_env, "dead-letter", "replay", handle.id, "--json")
    assert done.returncode == 0, done.stderr
    new_id = json.loads(done.stdout)["job_id"]
    assert new_id.startswith(handle.id) and new_id != handle.id
    from celery.result import AsyncResult

    result = AsyncResult(new_id, app=fleet_app).get(timeout=60)
    assert result["ok"] and result["metadata"]["replay_of"] == handle.id
    listed = json.loads(fleet(fleet_env, "dead-letter", "list", "--json").stdout)
    assert handle.id not in [e["job_id"] for e in listed]
    bad = fleet(fleet_env, "dead-letter", "replay", "no-such-job")
    assert bad.returncode == 2 and "no dead letter 'no-such-job'" in bad.stderr


def test_a_message_redelivered_too_often_stops_and_is_dead_lettered(
    fleet_app, state_redis, simulator
) -> None:
    # Given a job whose message was already delivered 3 times (its worker died each time)
    job_id = uuid.uuid4().hex
    state_redis.set(f"fleet:deliveries:{job_id}:0", 3)
    started = time.time()
    handle = dispatch(ask("crashy", task_class="cost_free", id=job_id))
    # Then the 4th delivery does not run it again: it fails and is dead-lettered
    with pytest.raises(JobFailed, match="delivered 4 times without finishing"):
        handle.get(timeout=30)
    # (filed once the failure is stored: a moment after the caller hears of it)
    deadline = time.monotonic() + 5
    while not state_redis.hexists("fleet:dead-letter", job_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state_redis.hexists("fleet:dead-letter", job_id)
    assert not [
        r for r in simulator.requests() if r["t"] >= started and r["model"] == LLAMA_UPSTREAM
    ]


def test_a_stale_copy_of_a_finished_job_is_not_run_again(
    fleet_app, fleet_workers, simulator, state_redis
):
    handle = dispatch(ask("once only", task_class="cost_free"))
    first = handle.get(timeout=30)
    finished = time.time()
    counter = f"fleet:deliveries:{handle.id}:0"
    assert state_redis.get(counter) == b"1"
    # When the same message arrives again (a redelivery after the job was answered)
    fleet_app.send_task(
        TASK_RUN_JOB, kwargs={"job": handle.job.model_dump(mode="json")}, task_id=handle.id,
        queue="free",
    )  # fmt: skip
    # Then a worker takes it (its second delivery is counted) and drops it
    deadline = time.monotonic() + 30
    dropped = f"fleet.run_job[{handle.id}] ignored"
    while dropped not in fleet_workers.log("free") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dropped in fleet_workers.log("free")
    assert state_redis.get(counter) == b"2"
    # And no provider is called and the caller's result is unchanged
    assert not [r for r in simulator.requests() if r["t"] >= finished]
    assert handle.get(timeout=5) == first


def test_duplicate_submissions_with_one_idempotency_key_run_once(fleet_app, simulator):
    key = f"digest-{uuid.uuid4().hex}"
    started = time.time()
    one = dispatch(ask("idempotent digest", task_class="cost_free", idempotency_key=key))
    two = dispatch(ask("idempotent digest", task_class="cost_free", idempotency_key=key))
    assert two.id == one.id
    assert one.get(timeout=30) == two.get(timeout=30)
    time.sleep(0.5)
    calls = [r for r in simulator.requests() if r["t"] >= started and r["model"] == LLAMA_UPSTREAM]
    assert len(calls) == 1
