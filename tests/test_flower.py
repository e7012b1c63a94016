"""Flower, started for real against the test fleet: it sees every queue's worker and the
jobs dispatched, and shows no prompt and no API key. Its API refuses callers without
credentials when basic auth is on. Its broker page and queue-length API count the jobs
waiting in a queue at every priority, on the fleet's transport as on kombu's."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from client import dispatch
from router.catalog import QUEUES
from tests.fixtures import Flower, reset_live_state, url_of
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


# --- queue lengths: every priority list of a queue, on both transports -------------------

# Priorities of the jobs left waiting, by queue. kombu's Redis channel (and the fleet's, on
# the same lists) keeps a queue's jobs in four lists by priority step: 0-2 in `<queue>`,
# 3-5 in `<queue>\x06\x163` (the default priority, 5, lands there), 6-8 in `...6`, 9 in `...9`.
WAITING = {"free": [0, 0, 2, 3, 5, 5, 5, 6, 8, 9, 9], "subscription": [1, 4, 4, 7, 9]}
CLASS_OF_QUEUE = {"free": "cost_free", "subscription": "user_facing"}
SEP = "\x06\x16"


def priority_lists(priorities: list[int], queue: str) -> dict[str, int]:
    lists: dict[str, int] = {}
    for priority in priorities:
        step = max(s for s in (0, 3, 6, 9) if s <= priority)
        name = f"{queue}{SEP}{step}" if step else queue
        lists[name] = lists.get(name, 0) + 1
    return lists


def broker_page_counts(html: str) -> dict[str, int]:
    """Queue -> Messages, from the rows of Flower's /broker page."""
    rows = re.findall(r'<tr id="([^"]+)">\s*<td>[^<]*</td>\s*<td[^>]*>\s*(\d+)\s*<', html)
    return {name: int(count) for name, count in rows}


@pytest.mark.parametrize("transport", ["fleet", "kombu"])
def test_queue_lengths_count_the_jobs_waiting_at_every_priority(
    transport: str,
    fleet_env: dict[str, str],
    fresh_redis: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Given jobs waiting at several priorities in free and subscription, on a Redis
    # database no worker consumes
    env = {
        **fleet_env,
        "FLEET_BROKER_URL": url_of(fresh_redis),
        "FLEET_BROKER_TRANSPORT": transport,
        "FLOWER_UNAUTHENTICATED_API": "true",
    }
    for key in ("FLEET_BROKER_URL", "FLEET_BROKER_TRANSPORT", "FLEET_CATALOG"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("FLEET_STATE_URL", raising=False)
    for queue, priorities in WAITING.items():
        for priority in priorities:
            dispatch(ask("wait", task_class=CLASS_OF_QUEUE[queue], priority=priority))
    lists = {
        key.decode(): int(fresh_redis.llen(key))
        for key in fresh_redis.scan_iter()
        if fresh_redis.type(key) == b"list"
    }
    expected_lists = {k: v for q, p in WAITING.items() for k, v in priority_lists(p, q).items()}
    assert lists == expected_lists  # four lists for free, three for subscription
    expected = {queue: len(WAITING.get(queue, [])) for queue in QUEUES}

    # When Flower (as `fleet up` starts it) is asked for the queues' lengths
    server = Flower(env, tmp_path)
    try:
        server.wait_answering()
        lengths = server.get("/api/queues/length")
        page = server.get("/broker")
    finally:
        server.stop()

    # Then every queue's count is every job waiting in it, whatever its priority
    assert lengths.status_code == 200, lengths.text
    assert {q["name"]: q["messages"] for q in lengths.json()["active_queues"]} == expected
    assert page.status_code == 200, page.text
    assert broker_page_counts(page.text) == expected, page.text
    # and the page names the broker by a redis:// URL, not by the transport's class path
    shown = re.search(r'class="[^"]*broker-url[^"]*">([^<]+)<', page.text)
    assert shown, page.text
    broker, url = urlsplit(url_of(fresh_redis)), urlsplit(shown[1])
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "redis",
        broker.hostname,
        broker.port,
        broker.path,
    ), shown[1]


@pytest.mark.parametrize("transport", ["fleet", "kombu"])
def test_the_broker_url_reads_redis_on_either_transport(transport: str) -> None:
    # What Flower reads to pick its broker reader, and what it shows (password masked)
    from workers.runtime.celery_app import create_app

    env = {"FLEET_BROKER_URL": "redis://:s3cret@redis.example:6380/2"}
    app = create_app({**env, "FLEET_BROKER_TRANSPORT": transport})
    with app.connection() as connection:
        assert connection.as_uri() == "redis://:**@redis.example:6380/2"
        assert connection.as_uri(include_password=True) == env["FLEET_BROKER_URL"]
        expected = "workers.runtime.transport:Transport" if transport == "fleet" else "redis"
        assert connection.transport_cls == expected  # the transport is still the chosen one
