"""Jobs that end without an answer land in the dead-letter store, which keeps each task
class's newest letters within its retention; poison messages stop after a bounded number
of deliveries; idempotency keys run a job once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import yaml

from client import dispatch
from router import JobFailed
from router.catalog import DeadLetters, Retention, default_catalog_path, load_catalog
from router.errors import ConfigError
from tests.fixtures import Workers, reply_text, url_of, wait_until
from workers.runtime.resultstore import Bookkeeping, attach
from workers.runtime.sending import TASK_RUN_JOB
from workers.state import deadletter, deliveries, keys
from workers.state.deadletter import Filing

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
    # Given a job whose message was already delivered 3 times, and whose worker died on it
    # alone twice (the third death is laid on it as the 4th delivery begins)
    job_id = uuid.uuid4().hex
    record = deliveries.DeliveryRecord(n=3, deaths=2)
    state_redis.hset(keys.deliveries(job_id, 0), mapping=record.fields())
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
    assert deliveries.record(state_redis, handle.id, 0).n == 1
    # When the same message arrives again (a redelivery after the job was answered)
    fleet_app.send_task(
        TASK_RUN_JOB,
        kwargs={"job": handle.job.model_dump(mode="json")},
        task_id=handle.id,
        queue="free",
    )
    # Then a worker takes it (its second delivery is counted) and drops it
    deadline = time.monotonic() + 30
    dropped = f"fleet.run_job[{handle.id}] ignored"
    while dropped not in fleet_workers.log("free") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dropped in fleet_workers.log("free")
    assert deliveries.record(state_redis, handle.id, 0).n == 2
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


# --- retention: the store is bounded, per task class, oldest first --------------------------


def backend_on(client: redis_lib.Redis):
    from workers.runtime.celery_app import create_app

    return create_app({"FLEET_BROKER_URL": url_of(client)}).backend


def fail(backend, job_id: str, task_class: str, filing: Filing) -> None:
    """A job's FAILURE written as a worker writes it: through store_result.lua, with its
    dead letter and where it is filed."""
    from celery import states

    letter = deadletter.entry({"id": job_id, "task_class": task_class}, {"error": "x"})
    attach(job_id, Bookkeeping(dead_letter=letter, filing=filing))
    backend.store_result(job_id, JobFailed("x", {"ok": False}), states.FAILURE)


def indexed(client: redis_lib.Redis, task_class: str) -> list[str]:
    return [reply_text(m) for m in client.zrange(keys.dead_letter_index(task_class), 0, -1)]


def held(client: redis_lib.Redis) -> set[str]:
    return {reply_text(k) for k in client.hkeys(keys.DEAD_LETTER)}


def test_each_class_keeps_its_newest_letters_up_to_its_count(fresh_redis) -> None:
    backend = backend_on(fresh_redis)
    # Given heartbeat letters kept up to 3, creative ones up to 3, filed in turn
    beat, creative = Filing("heartbeat", 3, 3600), Filing("creative", 3, 3600)
    for n in range(1, 6):
        fail(backend, f"hb{n}", "heartbeat", beat)
        if n <= 2:
            fail(backend, f"cr{n}", "creative", creative)
    # Then the two oldest heartbeat letters are gone, from the store and its index, and
    # creative's (under its count) are all there
    assert held(fresh_redis) == {"hb3", "hb4", "hb5", "cr1", "cr2"}
    assert indexed(fresh_redis, "heartbeat") == ["hb3", "hb4", "hb5"]
    assert indexed(fresh_redis, "creative") == ["cr1", "cr2"]
    # And the operator sees what was trimmed, per class
    policy = DeadLetters(classes={"heartbeat": Retention(max_count=3)})
    rows = {r["task_class"]: r for r in deadletter.summary(fresh_redis, policy)}
    assert (rows["heartbeat"]["held"], rows["heartbeat"]["trimmed"]) == (3, 2)
    assert rows["heartbeat"]["last_trimmed_at"] is not None
    assert (rows["creative"]["held"], rows["creative"]["trimmed"]) == (2, 0)
    # And a replayed letter leaves its class's index too
    assert deadletter.take(fresh_redis, "hb4") is not None
    assert indexed(fresh_redis, "heartbeat") == ["hb3", "hb5"]


def test_letters_past_their_class_age_are_trimmed_when_the_class_files_again(
    fresh_redis,
) -> None:
    backend = backend_on(fresh_redis)
    young = Filing("cost_free", 100, 1.0)  # a second, on Redis' clock
    fail(backend, "old1", "cost_free", young)
    fail(backend, "old2", "cost_free", young)
    fail(backend, "other1", "vision", Filing("vision", 100, 3600))
    time.sleep(1.2)
    fail(backend, "new1", "cost_free", young)
    assert held(fresh_redis) == {"new1", "other1"}
    assert fresh_redis.hget(keys.DEAD_LETTER_TRIMMED, "cost_free") == b"2"


def test_trim_applies_every_class_age_without_a_new_letter(fresh_redis) -> None:
    # `fleet dead-letter list` and `fleet status` trim first: a class that has filed
    # nothing since shows no letter past its age
    backend = backend_on(fresh_redis)
    fail(backend, "v1", "vision", Filing("vision", 100, 3600))
    fail(backend, "junk1", "chitchat", Filing())  # a class no catalog knows: 'other'
    time.sleep(1.2)
    second = 1 / deadletter.DAY_S
    policy = DeadLetters(classes={"vision": Retention(max_age_days=second)})
    assert deadletter.trim(fresh_redis, policy) == {"vision": 1}
    assert held(fresh_redis) == {"junk1"}
    assert indexed(fresh_redis, "other") == ["junk1"]


RETENTION_ERRORS = {
    "a count of 0": (
        {"default": {"max_count": 0}},
        "policy.dead_letters.default.max_count: must be a whole number of 1 or more (got 0)",
    ),
    "a count in words": (
        {"classes": {"heartbeat": {"max_count": "lots"}}},
        "policy.dead_letters.classes.heartbeat.max_count: must be a whole number of 1 or more"
        " (got 'lots')",
    ),
    "a negative age": (
        {"default": {"max_age_days": -1}},
        "policy.dead_letters.default.max_age_days: must be a number of days above 0",
    ),
    "an unknown class": (
        {"classes": {"chitchat": {"max_count": 5}}},
        "policy.dead_letters.classes.chitchat: Input should be 'complex_reasoning', 'creative',",
    ),
    "a misspelt field": (
        {"classes": {"heartbeat": {"max_age": 7}}},
        "policy.dead_letters.classes.heartbeat.max_age: unknown field (valid: max_age_days,"
        " max_count)",
    ),
}


@pytest.mark.parametrize("case", sorted(RETENTION_ERRORS))
def test_a_bad_retention_is_refused_in_one_line_naming_what_is_valid(
    tmp_path: Path, fleet_env: dict[str, str], case: str
) -> None:
    retention, expected = RETENTION_ERRORS[case]
    path = catalog_with(tmp_path, dead_letters=retention)
    with pytest.raises(ConfigError) as caught:
        load_catalog(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}:")
    assert expected in message, message
    # and `fleet check-config` says the same, on one line, with exit status 2
    done = fleet(fleet_env, "check-config", str(path))
    assert done.returncode == 2 and done.stderr == f"fleet: {message}\n"


def catalog_with(tmp_path: Path, source: str | None = None, **policy: Any) -> Path:
    """A copy of a catalog (default: the packaged one) with these policy fields set."""
    data = yaml.safe_load(Path(source or default_catalog_path()).read_text())
    data["policy"].update(policy)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_worker_files_under_its_catalog_retention_and_the_cli_shows_the_trimmed(
    fleet_env: dict[str, str], simulator: Any, fresh_redis: Any, tmp_path: Path, monkeypatch
) -> None:
    # Given a worker whose catalog keeps 2 cost_free letters and 3 of any other class
    retention = {"default": {"max_count": 3}, "classes": {"cost_free": {"max_count": 2}}}
    path = catalog_with(tmp_path, fleet_env["FLEET_CATALOG"], dead_letters=retention)
    env = {**fleet_env, "FLEET_BROKER_URL": url_of(fresh_redis), "FLEET_CATALOG": str(path)}
    for key in ("FLEET_BROKER_URL", "FLEET_CATALOG"):
        monkeypatch.setenv(key, env[key])
    workers = Workers(env, tmp_path / "logs")
    workers.start("free", name="retention-free", concurrency=2)
    try:
        workers.wait_ready()
        # When 4 cost_free jobs and 2 reasoning_free jobs fail (a 400: at once), in turn
        failed: dict[str, list[str]] = {}
        for n, task_class in enumerate(["cost_free"] * 4 + ["reasoning_free"] * 2):
            handle = dispatch(ask(f"[[sim:*=400]] bad {n}", task_class=task_class))
            with pytest.raises(JobFailed):
                handle.get(timeout=30)
            failed.setdefault(task_class, []).append(handle.id)
        wait_until(lambda: len(held(fresh_redis)) == 4, 5, "the last letter filed")
    finally:
        workers.stop()
    # Then the store keeps the 2 newest cost_free letters and both reasoning_free ones
    listed = json.loads(fleet(env, "dead-letter", "list", "--json").stdout)
    assert [e["job_id"] for e in listed] == failed["cost_free"][2:] + failed["reasoning_free"]
    # And the operator sees what was trimmed: under `fleet dead-letter list`...
    human = fleet(env, "dead-letter", "list")
    assert human.returncode == 0, human.stderr
    assert human.stdout.splitlines()[-1] == (
        "trimmed by retention (oldest first; `fleet status` has each limit): cost_free 2"
    )
    # ...and in `fleet status`, with each class's retention
    status = json.loads(fleet(env, "status", "--json").stdout)
    classes = {c["task_class"]: c for c in status["dead_letters"]}
    assert {k: (c["held"], c["trimmed"], c["max_count"]) for k, c in classes.items()} == {
        "cost_free": (2, 2, 2),
        "reasoning_free": (2, 0, 3),
    }
    assert "trimmed by retention" in fleet(env, "status").stdout
