"""A job enqueued "from another language": the raw Celery protocol-2 message, built by
hand (JSON + base64, no Celery or kombu on the sending side) and pushed onto the queue's
Redis list with the shipped publish script (or a bare LPUSH), is run by the real workers
like a job sent by `dispatch()`.

The message (one JSON document per list item; the queue's list is named after the queue,
e.g. `free`, for priority 0). Only `body` is base64-encoded:

    {
      "body": "<base64 of the UTF-8 JSON body below>",
      "content-encoding": "utf-8",
      "content-type": "application/json",
      "headers": {
        "lang": "js",
        "task": "fleet.run_job",
        "id": "3f2b9c1e-...",
        "shadow": null,
        "eta": null,
        "expires": null,
        "group": null,
        "group_index": null,
        "retries": 0,
        "timelimit": [null, null],
        "root_id": "3f2b9c1e-...",
        "parent_id": null,
        "argsrepr": "()",
        "kwargsrepr": "{'job': '3f2b9c1e-...', 'class': 'cost_free', 'source': 'app'}",
        "origin": "my-service@host",
        "ignore_result": false,
        "replaced_task_nesting": 0,
        "stamped_headers": null,
        "stamps": {}
      },
      "properties": {
        "correlation_id": "3f2b9c1e-...",
        "reply_to": "",
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": "free"},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": "<a fresh uuid>"
      }
    }

    body = [[], {"job": {"task_class": "cost_free",
                         "messages": [{"role": "user", "content": "..."}]}},
            {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]

`delivery_info.routing_key` is the queue the worker believes it is on; `exchange` may be
"" (the anonymous exchange, as Celery itself writes) or the queue's name (the fleet
declares one direct exchange per queue). `kwargsrepr` is what Flower and the worker logs
show of the job: without it they fall back to the full repr, prompt included.

The result lands in the state Redis under `celery-task-meta-<task id>` (JSON).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from router import Result
from tests.fixtures import reset_live_state

TIMEOUT_S = 30
TASK = "fleet.run_job"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_live_state(fleet_env: dict[str, str]) -> None:
    """Every model usable for the jobs here, whatever ran before."""
    reset_live_state(fleet_env)


def build_message(
    task_id: str, queue: str, job: dict[str, Any], *, exchange: str = ""
) -> dict[str, Any]:
    """The protocol-2 message, as any language would build it: plain JSON and base64."""
    body = [[], {"job": job}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    kwargsrepr = (
        f"{{'job': {task_id!r}, 'class': {job.get('task_class')!r},"
        f" 'source': {job.get('source', 'app')!r}}}"
    )
    return {
        "body": base64.b64encode(json.dumps(body).encode("utf-8")).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "js",
            "task": TASK,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": kwargsrepr,
            "origin": "foreign-sender@test",
            "ignore_result": False,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": exchange, "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


PUBLISH_SCRIPT = ROOT / "workers" / "state" / "scripts" / "broker_publish.lua"


def enqueue(redis_url: str, queue: str, message: dict[str, Any], filed: bool = True) -> None:
    """Enqueue as the doc says: EVAL of the shipped publish script (the message filed in
    the same step as its push), or a bare LPUSH (`filed=False`)."""
    text = json.dumps(message)
    with redis.Redis.from_url(redis_url) as client:
        if not filed:
            client.lpush(queue, text)
            return
        tag = message["properties"]["delivery_tag"]
        keys = [
            queue,
            "fleet:broker:messages",
            "fleet:broker:positions",
            f"fleet:broker:queued:{queue}",
        ]
        assert client.eval(PUBLISH_SCRIPT.read_text(), len(keys), *keys, text, tag) == 1
        # filed before any worker can pop it: a kill between the pop and the delivery
        # loses nothing
        assert client.hget("fleet:broker:messages", tag) == text.encode()


def ask(text: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **fields}


def wait_result(app: Any, task_id: str) -> Result:
    value = AsyncResult(task_id, app=app).get(timeout=TIMEOUT_S, interval=0.05)
    return Result.model_validate(value)


def test_job_on_its_own_queue_is_answered(fleet_app, fleet_env) -> None:
    task_id = str(uuid.uuid4())
    tag = f"foreign-{uuid.uuid4().hex[:8]}"
    job = {"id": task_id, **ask(f"{tag} from elsewhere", task_class="cost_free")}
    enqueue(fleet_env["FLEET_BROKER_URL"], "free", build_message(task_id, "free", job))
    result = wait_result(fleet_app, task_id)
    assert result.ok, result.error
    assert result.job_id == task_id
    assert result.model == "openrouter/meta-llama/llama-3.1-405b-instruct:free"
    assert result.queue_path == ["free"]
    assert tag in (result.text or "")
    # Any language can read the result too: plain JSON under a known key.
    with redis.Redis.from_url(fleet_env["FLEET_BROKER_URL"]) as client:
        meta = json.loads(client.get(f"celery-task-meta-{task_id}") or b"{}")
    assert meta["status"] == "SUCCESS"
    assert meta["result"]["job_id"] == task_id and meta["result"]["ok"] is True


@pytest.mark.parametrize("exchange", ["", "free"], ids=["anonymous-exchange", "queue-exchange"])
def test_job_on_the_wrong_queue_is_forwarded_with_its_task_id(
    fleet_app, fleet_env, fleet_workers, exchange
) -> None:
    """A user_facing job pushed onto `free` goes on to `subscription`, where its first
    model lives; the free worker makes no call and records no attempt."""
    task_id = str(uuid.uuid4())
    tag = f"misrouted-{uuid.uuid4().hex[:8]}"
    job = {"id": task_id, **ask(f"{tag} hello", task_class="user_facing")}
    message = build_message(task_id, "free", job, exchange=exchange)
    enqueue(fleet_env["FLEET_BROKER_URL"], "free", message)
    result = wait_result(fleet_app, task_id)
    assert result.ok, result.error
    assert result.job_id == task_id
    assert result.model == "zai/glm-4.7"
    (attempt,) = result.attempts
    assert attempt.queue == "subscription"
    assert attempt.worker and attempt.worker.startswith("test-subscription@")
    assert tag in (result.text or "")
    # It really went through the free worker first, which only forwarded it.
    deadline = time.monotonic() + 5
    while task_id not in fleet_workers.log("free") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"fleet.run_job[{task_id}] received" in fleet_workers.log("free")


def test_job_without_an_id_takes_the_task_id(fleet_app, fleet_env) -> None:
    task_id = f"foreign-{uuid.uuid4().hex}"
    job = ask("no id in this job", task_class="cost_free")
    assert "id" not in job
    # (a bare LPUSH, unfiled: still run, filed at its delivery)
    enqueue(fleet_env["FLEET_BROKER_URL"], "free", build_message(task_id, "free", job), filed=False)
    result = wait_result(fleet_app, task_id)
    assert result.ok, result.error
    assert result.job_id == task_id


def test_the_message_has_the_shape_celery_itself_sends(redis_server) -> None:
    """Celery's own message (sent by `send_task` in a child process, to a Redis db no
    worker reads) has the same envelope, header and property names, and body layout."""
    url = redis_server.url.rsplit("/", 1)[0] + "/15"
    job = ask("captured", task_class="cost_free")
    send = (
        "import json, sys\n"
        "from workers.runtime.celery_app import create_app\n"
        "with create_app({'FLEET_BROKER_URL': sys.argv[1]}) as app:\n"
        "    app.send_task(sys.argv[2], kwargs={'job': json.loads(sys.argv[3])},"
        " task_id='captured-1', queue='free')\n"
    )
    argv = [sys.executable, "-c", send, url, TASK, json.dumps(job)]
    subprocess.run(argv, check=True, cwd=ROOT, timeout=30)
    with redis.Redis.from_url(url) as client:
        (raw,) = client.lrange("free", 0, -1)
        client.flushdb()
    celery_message = json.loads(raw)
    ours = build_message("captured-1", "free", job)
    assert set(ours) == set(celery_message)
    assert set(ours["headers"]) == set(celery_message["headers"])
    # Celery also copies argsrepr/kwargsrepr into the properties; the worker ignores them.
    assert set(ours["properties"]) == set(celery_message["properties"]) - {
        "argsrepr",
        "kwargsrepr",
    }
    assert celery_message["properties"]["delivery_info"] == {"exchange": "", "routing_key": "free"}
    for key in ("content-type", "content-encoding"):
        assert ours[key] == celery_message[key]
    for key in ("delivery_mode", "priority", "body_encoding"):
        assert ours["properties"][key] == celery_message["properties"][key]
    decode = base64.b64decode
    assert json.loads(decode(ours["body"])) == json.loads(decode(celery_message["body"]))
