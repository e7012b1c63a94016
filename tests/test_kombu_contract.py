"""What the fleet's broker transport (workers/runtime/transport.py) takes from kombu's
Redis channel, checked against the installed kombu: pyproject.toml pins the range these
tests passed on, and a kombu that changes any of it fails here, not in production."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from kombu.connection import Connection
from kombu.transport import redis as stock
from kombu.transport import virtual

from tests.fixtures import url_of
from workers.state import keys

TRANSPORT = "workers.runtime.transport:Transport"


def test_the_kombu_helpers_the_transport_extends_or_calls_are_there() -> None:
    # The transport overrides these (same arguments) and calls kombu's own beside them
    expected: dict[Callable[..., Any], list[str]] = {
        stock.QoS.append: ["self", "message", "delivery_tag"],
        stock.QoS.ack: ["self", "delivery_tag"],
        stock.QoS.reject: ["self", "delivery_tag", "requeue"],
        stock.QoS.restore_by_tag: ["self", "tag", "client", "leftmost"],
        stock.QoS.restore_visible: ["self", "start", "num", "interval"],
        virtual.QoS.append: ["self", "message", "delivery_tag"],
        virtual.QoS.ack: ["self", "delivery_tag"],
        stock.Channel._put: ["self", "queue", "message"],
        stock.Channel._restore: ["self", "message", "leftmost"],
        stock.Channel._purge: ["self", "queue"],
        stock.Channel.basic_consume: ["self", "queue"],
        stock.Channel._connparams: ["self", "asynchronous"],
        stock.PublishBatch.add: ["self", "name"],
    }
    for function, names in expected.items():
        params = list(inspect.signature(function).parameters)
        assert params[: len(names)] == names, (function.__qualname__, params)
    for name in ("_lookup", "_get_message_priority", "_q_for_pri", "conn_or_acquire"):
        assert callable(getattr(stock.Channel, name)), name
    # a channel's close hands back what it prefetched through restore_by_tag
    assert "restore_by_tag" in inspect.getsource(stock.QoS.restore_unacked)
    assert "restore_unacked_once" in inspect.getsource(virtual.Channel.close)
    assert "priority_steps" in stock.Channel.from_transport_options


def test_a_requeued_message_keeps_its_filing(fresh_redis: Any) -> None:
    # Given a message on a tracked queue, taken by a consumer
    options = {"tracked_queues": ["free"]}
    with (
        Connection(url_of(fresh_redis), transport=TRANSPORT, transport_options=options) as conn,
        conn.SimpleQueue("free") as queue,
    ):
        queue.put({"job": "requeue me"})
        message = queue.get(timeout=5)
        tag = message.delivery_tag
        assert fresh_redis.hexists(keys.BROKER_MESSAGES, tag)
        assert fresh_redis.llen("free") == 0
        # When it is handed back (kombu's reject with requeue)
        message.requeue()
        # Then it is in its list again and still filed: a worker that pops it next and
        # dies at once does not lose it (kombu's reject must not drop the filing)
        assert fresh_redis.llen("free") == 1
        assert fresh_redis.hexists(keys.BROKER_MESSAGES, tag)
        assert fresh_redis.zscore(keys.broker_queued("free"), tag) is not None
        again = queue.get(timeout=5)
        assert again.payload == {"job": "requeue me"}
        again.ack()
    assert not fresh_redis.hexists(keys.BROKER_MESSAGES, tag)


def test_a_closed_channel_hands_back_what_it_held(fresh_redis: Any) -> None:
    # Given a consumer holding a message it took and never acked
    options = {"tracked_queues": ["free"]}
    with (
        Connection(url_of(fresh_redis), transport=TRANSPORT, transport_options=options) as conn,
        conn.SimpleQueue("free") as queue,
    ):
        queue.put({"job": "held"})
        message = queue.get(timeout=5)
        assert fresh_redis.llen("free") == 0
    # When its connection closes (a clean shutdown), the message is back in its list, at
    # once, filed, and held by nobody
    assert fresh_redis.llen("free") == 1
    assert fresh_redis.hexists(keys.BROKER_MESSAGES, message.delivery_tag)
    held = list(fresh_redis.scan_iter(keys.BROKER_HELD_PREFIX + "*"))
    assert all(not fresh_redis.hexists(k, message.delivery_tag) for k in held)


def test_a_closed_channel_is_detached_and_a_late_ack_goes_through_the_beat(
    fresh_redis: Any,
) -> None:
    # Given a message taken on a channel that is then closed (its connection lost and
    # replaced, as after a Redis restart): kombu detaches the channel from its connection
    options = {"tracked_queues": ["free"]}
    with Connection(url_of(fresh_redis), transport=TRANSPORT, transport_options=options) as conn:
        queue = conn.SimpleQueue("free")
        queue.put({"job": "late ack"})
        message = queue.get(timeout=5)
        qos = message.channel.qos
        beat = message.channel.beat
        qos._delivered.clear()  # (its hand-back at close failed: Redis was away)
    assert message.channel.connection is None
    # When the task that took it acks after that, it does not raise: the ack waits for
    # the process's next beat, which makes it
    qos.ack(message.delivery_tag)
    beat._settle_pending()
    assert not fresh_redis.hexists(keys.BROKER_MESSAGES, message.delivery_tag)


def test_the_celery_worker_state_the_beat_reads_is_there() -> None:
    # The beat keeps a closed channel's messages held while their tasks still run
    # (workers/runtime/tasks.py `_active_tags`, liveness.active_tags): Celery's record of
    # the running requests, each with its kombu message, in the consuming process...
    import weakref

    from celery.worker import state
    from celery.worker.consumer.consumer import Consumer
    from celery.worker.request import Request

    assert isinstance(state.active_requests, weakref.WeakSet)
    assert isinstance(Request.message, property)
    # ...and Celery drops what it had only reserved when its connection closes (so those
    # are given back at once)
    assert "reserved_requests.clear()" in inspect.getsource(Consumer.on_close)
