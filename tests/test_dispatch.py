"""dispatch() and dispatch_many() against a real Redis broker, with no worker: what is
queued, what is refused, and what an idempotency key names."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from client import dispatch, dispatch_many
from router import BatchRefused, InvalidJob, NoRouteAvailable
from workers.state import deliveries, keys

COST_FREE_CHAIN = (
    "openrouter/meta-llama/llama-3.1-405b-instruct:free",
    "openrouter/nousresearch/hermes-3-llama-3.1-405b:free",
    "litellm/deepseek-free",
    "litellm/gpt-oss-free",
    "local/qwen3-mlx",
)


def ask(text: str, **fields: Any) -> dict[str, Any]:
    return {"task_class": "cost_free", "messages": [{"role": "user", "content": text}], **fields}


def url_of(client: Any) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://127.0.0.1:{kwargs['port']}/{kwargs['db']}"


def queued(client: Any, queue: str) -> list[bytes]:
    """Messages waiting on `queue`, whatever their priority (kombu keeps a list for each
    priority step, named queue + separator + step)."""
    names = [k for k in client.keys(f"{queue}*") if k.split(b"\x06")[0] == queue.encode()]
    return [m for name in sorted(names) for m in client.lrange(name, 0, -1)]


@pytest.fixture
def broker(fresh_redis: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A broker of its own that no worker consumes: what is sent stays queued. The
    dispatcher's one-second view of live state starts empty."""
    from workers.state.live import forget_views

    forget_views()
    monkeypatch.setenv("FLEET_BROKER_URL", url_of(fresh_redis))
    monkeypatch.delenv("FLEET_STATE_URL", raising=False)
    return fresh_redis


def test_a_bad_job_is_refused_and_nothing_is_queued(broker) -> None:
    with pytest.raises(InvalidJob, match="task_class"):
        dispatch({"task_class": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert broker.dbsize() == 0


def test_an_unroutable_job_leaves_its_idempotency_key_free(broker) -> None:
    # Given every model of the chain resting for an hour
    until = int((time.time() + 3600) * 1000)
    for model in COST_FREE_CHAIN:
        broker.set(keys.cooldown(model), f"{until}|test", px=3_600_000)
    # When a keyed job cannot be routed
    with pytest.raises(NoRouteAvailable):
        dispatch(ask("digest", idempotency_key="k-unroutable"))
    # Then the key names no job, and nothing was queued
    assert not broker.exists(keys.idempotency("k-unroutable"))
    assert queued(broker, "free") == []


def test_a_failed_send_releases_the_key_and_a_retry_is_sent(
    broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a broker that refuses connections (state Redis still up)
    monkeypatch.setenv("FLEET_STATE_URL", url_of(broker))
    monkeypatch.setenv("FLEET_BROKER_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(Exception):  # noqa: B017 - kombu's OperationalError, after retries
        dispatch(ask("digest", idempotency_key="k-send"))
    assert not broker.exists(keys.idempotency("k-send"))
    # When the same key is sent again with the broker back
    monkeypatch.setenv("FLEET_BROKER_URL", url_of(broker))
    handle = dispatch(ask("digest", idempotency_key="k-send"))
    # Then it is this job that is queued and owns the key
    assert broker.get(keys.idempotency("k-send")).decode() == handle.id
    assert len(queued(broker, "free")) == 1


def test_dispatch_many_sends_a_batch_in_order_with_one_key_owner(broker) -> None:
    jobs = [ask(f"item {i}") for i in range(100)]
    jobs += [ask("keyed", idempotency_key="k-batch"), ask("keyed again", idempotency_key="k-batch")]
    handles = dispatch_many(jobs)
    assert len(handles) == 102
    assert handles[101].id == handles[100].id  # the second follows the first
    sent = [json.loads(m)["headers"]["id"] for m in queued(broker, "free")]
    # in order: a worker pops the list's tail first, so it takes them as they were given
    # (one LPUSH of the whole batch, as many LPUSHes one after the other would)
    assert list(reversed(sent)) == [h.id for h in handles[:101]]
    # and each message filed, as the fleet's transport files it (transport.py)
    filed = {json.loads(e)["headers"]["id"] for e in broker.hvals(keys.BROKER_MESSAGES)}
    zsets = broker.keys(keys.broker_queued("free") + "*")
    assert filed == set(sent) and sum(broker.zcard(k) for k in zsets) == 101


def test_dispatch_many_refuses_the_whole_batch_naming_each_bad_job(broker) -> None:
    jobs = [ask("fine"), {"task_class": "nope", "messages": []}, ask("fine"), ask("x", priority=99)]
    with pytest.raises(BatchRefused) as caught:
        dispatch_many(jobs)
    assert [index for index, _ in caught.value.errors] == [1, 3]
    lines = str(caught.value).splitlines()
    assert lines[0] == "2 of 4 jobs refused, none queued:"
    assert lines[1].startswith("job 1: ") and lines[2].startswith("job 3: ")
    assert queued(broker, "free") == []


def test_a_finished_job_is_recognised_by_its_status_not_by_a_substring(fresh_redis) -> None:
    job_id = uuid.uuid4().hex
    # A job still travelling whose stored state merely contains the word
    fresh_redis.set(keys.result(job_id), json.dumps({"status": "RETRY", "result": {"SUCCESS": 1}}))
    assert not deliveries.begin(fresh_redis, job_id, 0).finished
    fresh_redis.set(keys.result(job_id), json.dumps({"status": "SUCCESS", "result": {}}))
    assert deliveries.begin(fresh_redis, job_id, 0).finished


def test_a_result_stored_without_a_wake_up_is_still_found(broker) -> None:
    # Given a waiting caller whose job's final state lands with no publication to wake
    # it (as when it lands between the caller's subscription and its first read)
    handle = dispatch(ask("quiet"))
    result = {"job_id": handle.id, "task_class": "cost_free", "source": "app", "ok": True}
    meta: dict[str, Any] = {
        "status": "SUCCESS",
        "result": {**result, "text": "hi"},
        "traceback": None,
        "children": [],
        "date_done": None,
        "task_id": handle.id,
    }
    import threading

    threading.Timer(0.3, lambda: broker.set(keys.result(handle.id), json.dumps(meta))).start()
    # Then get() still returns it, on its next look
    started = time.monotonic()
    assert handle.get(timeout=10).text == "hi"
    assert time.monotonic() - started < 9


def _events(broker: Any) -> Any:
    pubsub = broker.pubsub()
    pubsub.psubscribe("*celeryev/task.sent")
    assert pubsub.get_message(timeout=2)["type"] == "psubscribe"  # subscribed, for sure
    return pubsub


def _shape(envelope: dict[str, Any]) -> dict[str, Any]:
    """An envelope without what differs from message to message."""
    import base64

    varying = {
        "id",
        "root_id",
        "correlation_id",
        "delivery_tag",
        "kwargsrepr",
        "uuid",
        "kwargs",
        "timestamp",
        "clock",
        "pid",
        "hostname",
        "origin",
    }

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {
            k: (strip(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in varying
        }

    body = json.loads(base64.b64decode(envelope["body"]))
    task = isinstance(body, list)  # a task: [args, kwargs, embed]; else an event
    return {**strip(envelope), "body": [body[0], sorted(body[1]), body[2]] if task else strip(body)}


def test_a_batched_message_and_its_event_are_what_kombu_writes(broker) -> None:
    events = _events(broker)
    # Given one job sent through kombu's producer, then two in a batch
    one = dispatch(ask("single"))
    many = dispatch_many([ask("batch a"), ask("batch b")])
    messages = {json.loads(m)["headers"]["id"]: json.loads(m) for m in queued(broker, "free")}
    sent: list[dict[str, Any]] = []
    while len(sent) < 3 and (message := events.get_message(timeout=2)):
        if message["type"] == "pmessage":
            sent.append(json.loads(message["data"]))
    events.close()
    # Then every message and every task-sent event has kombu's shape
    assert len(messages) == 3 and len(sent) == 3
    kombu_message = _shape(messages[one.id])
    assert [_shape(messages[h.id]) for h in many] == [kombu_message] * 2
    shapes = [_shape(e) for e in sent]
    assert shapes[1:] == [shapes[0]] * 2
    assert {json.loads(__import__("base64").b64decode(e["body"]))["uuid"] for e in sent} == {
        one.id,
        *(h.id for h in many),
    }
