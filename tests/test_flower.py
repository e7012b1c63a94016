"""Flower, started for real against the test fleet: it sees every queue's worker and the
jobs dispatched, and shows no prompt and no API key. Its API refuses callers without
credentials when basic auth is on."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from client import dispatch
from router.catalog import QUEUES
from tests.fixtures import Flower, reset_live_state
from workers.sim.simulated import PLACEHOLDER_KEY

TIMEOUT_S = 30
# A tiny PNG as a data URL: the vision job's image part.
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def flower(fleet_env, fleet_workers, tmp_path_factory) -> Iterator[Flower]:
    env = {**fleet_env, "FLOWER_UNAUTHENTICATED_API": "true"}
    server = Flower(env, tmp_path_factory.mktemp("flower"))
    try:
        server.wait_workers(len(QUEUES))  # only then are the jobs' events sure to reach it
        yield server
    finally:
        server.stop()


def ask(text: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **fields}


def image_job(text: str) -> dict[str, Any]:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": PIXEL}}]
    return {"task_class": "user_facing", "messages": [{"role": "user", "content": parts}]}


def test_flower_sees_every_queue_and_shows_no_prompt_or_key(
    flower, fleet_app, fleet_env, fleet_workers
) -> None:
    secret = f"flower-prompt-{uuid.uuid4().hex}"  # in every prompt; the simulator echoes it
    jobs = {
        "subscription": ask(f"{secret} user", task_class="user_facing"),
        "free": ask(f"{secret} free", task_class="cost_free"),
        "long-context": ask(f"{secret} long", task_class="long_context"),
        "local": ask(f"{secret} ping", task_class="heartbeat", source="heartbeat", max_tokens=8),
        "vision": image_job(f"{secret} what is in this picture?"),
        # Escalates subscription -> free (task-retried, then a new delivery's events) ...
        "escalated": ask(f"[[sim:MiniMax-M2.1=503]] {secret} hop", task_class="fast_general"),
        # ... and fails (task-failed, its exception carries the Result).
        "failed": ask(f"[[sim:glm-4.7=400]] {secret} bad", task_class="user_facing"),
    }
    reset_live_state(fleet_env)
    try:
        handles = {name: dispatch(job) for name, job in jobs.items()}
        results = {name: h.get(timeout=TIMEOUT_S, propagate=False) for name, h in handles.items()}
    finally:
        reset_live_state(fleet_env)
    for queue in QUEUES:
        assert results[queue].ok and results[queue].queue_path == [queue], results[queue]
    assert results["escalated"].queue_path == ["subscription", "free"]
    assert not results["failed"].ok

    workers = flower.get("/api/workers?refresh=1").json()
    consumed = {q["name"] for w in workers.values() for q in w.get("active_queues") or []}
    assert consumed == set(QUEUES), sorted(workers)

    ids = {h.id for h in handles.values()}
    tasks = flower.tasks_when_final(ids)
    unfinished = {i for i in ids if tasks.get(i, {}).get("state") not in ("SUCCESS", "FAILURE")}
    names = {h.id: name for name, h in handles.items()}
    assert not unfinished, f"Flower never saw {[names[i] for i in unfinished]} finish: {tasks}"
    for name, handle in handles.items():
        task = tasks[handle.id]
        assert task["name"] == "fleet.run_job"
        assert task["state"] == ("FAILURE" if name == "failed" else "SUCCESS")
        # The job as Flower shows it: the dispatcher's short description, not the payload.
        assert task["args"] == "()"
        job = jobs[name]
        assert task["kwargs"].startswith(
            f"{{'job': {handle.id!r}, 'class': {job['task_class']!r}, 'source': "
        ), task["kwargs"]
        assert len(task["kwargs"]) < 200
    # The result as Flower shows it: the outcome, without the answer text.
    escalated = tasks[handles["escalated"].id]["result"]
    assert "'model': 'openrouter/meta-llama/llama-3.1-405b-instruct:free'" in escalated
    assert "'queue_path': ['subscription', 'free']" in escalated
    assert "bad_request" in tasks[handles["failed"].id]["exception"]

    seen = json.dumps(tasks)
    assert PLACEHOLDER_KEY not in seen
    assert secret not in seen, [k for k, t in tasks.items() if secret in json.dumps(t)]
    for queue in QUEUES:  # the workers' logs hold neither, too
        log = fleet_workers.log(queue)
        assert secret not in log and PLACEHOLDER_KEY not in log, queue


def test_basic_auth_refuses_the_api_without_credentials(fleet_env, tmp_path) -> None:
    # Basic auth as `fleet up` turns it on: FLEET_FLOWER_BASIC_AUTH in its environment
    env = {k: v for k, v in fleet_env.items() if k != "FLOWER_UNAUTHENTICATED_API"}
    env["FLEET_FLOWER_BASIC_AUTH"] = "fleet:s3cret-pass"
    server = Flower(env, tmp_path)
    try:
        server.wait_answering()
        assert server.get("/api/workers").status_code == 401
        assert server.get("/api/tasks").status_code == 401
        assert server.get("/api/workers", auth=("fleet", "wrong")).status_code == 401
        assert server.get("/api/workers", auth=("fleet", "s3cret-pass")).status_code == 200
    finally:
        server.stop()
