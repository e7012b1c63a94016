"""The fleet's Redis broker transport: kombu's Redis channel, with no moment at which a
kill can lose a job message.

kombu's stock channel pops a message with BRPOP and only then files it as unacked
(`QoS.append`, a few milliseconds later). A worker killed in between, or a connection
dropped while BRPOP's reply is on the wire, loses the message: no list, hash or counter
holds it any more (celery/celery#7950, celery/kombu#305, kombu#1836).

Here a job message is filed when it is published, in the same MULTI/EXEC as its LPUSH:
its text in `fleet:broker:messages` (delivery tag -> [payload, exchange, routing key,
list]) and its tag in `fleet:broker:index` (tag -> last touched). The pop itself is
kombu's BRPOP, unchanged; the delivery only restarts the tag's clock; the ack deletes
both. The visibility sweep (`broker_sweep.lua`) takes every tag untouched for the
visibility timeout: a message still waiting in its list (LPOS finds the same text) only
has its clock restarted, and any other goes back to the front of its list, whether its
worker died before or after it recorded the delivery. Delivery is at least once, as
with the stock channel; the fleet's delivery counters and stored final states keep a
job from being answered or billed twice (docs/architecture.md, "No job lost").

The design is celery-redis-plus's (a requeue index written at publish time), kept on
kombu's lists instead of its sorted sets, so the wire format is kombu's: `fleet status`
and Flower's queue lengths read the same lists, and a producer in another language that
only LPUSHes (docs/enqueue-from-any-language.md) works too; its message is filed at
delivery, as kombu does.

Only the job queues (the `tracked_queues` transport option) are filed; Celery's own
reply and control queues are consumed without acks and keep the stock behaviour.
`FLEET_BROKER_TRANSPORT=kombu` selects kombu's stock channel (workers/runtime/celery_app.py),
for comparison (tests/chaos/kills.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from time import time
from typing import Any, cast

from kombu.transport import redis as stock
from kombu.utils import json as kombu_json

from workers.state import keys
from workers.state.connections import script

Command = tuple[str, tuple[Any, ...]]  # a redis-py pipeline method and its arguments
# kombu's Redis transport is not annotated. What this module calls of it goes through typed
# names (below and in Channel), or through `cast(Any, super())` where it extends a method.
dumps: Callable[[Any], str] = kombu_json.dumps  # JSON as kombu writes messages
DEFAULT_SWEEP_BATCH = 1000  # tags looked at per sweep: bounds the script's run time


class QoS(stock.QoS):
    """Acks and redelivery on the message store filed at publish (see the module doc)."""

    def append(self, message: Any, delivery_tag: str) -> None:
        delivered = self.channel.script("broker_delivered")
        with self.channel.conn_or_acquire() as client:
            if not delivered(keys=self._keys, args=[delivery_tag, time()], client=client):
                # a message pushed by a producer that does not file it: file it now, as
                # kombu's stock channel does (it was unprotected until this moment)
                entry = self.channel.entry_of_delivered(message)
                pipe = client.pipeline()
                pipe.hset(keys.BROKER_MESSAGES, delivery_tag, entry)
                pipe.zadd(keys.BROKER_INDEX, {delivery_tag: time()})
                pipe.execute()
        # virtual.QoS's own bookkeeping (skipping kombu's Redis writes, done above)
        cast(Any, super(stock.QoS, self)).append(message, delivery_tag)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        # kombu's `leftmost` means LPUSH: the back of the line (BRPOP pops the right end)
        where = "back" if leftmost else "front"
        with self.channel.conn_or_acquire(client) as conn:
            self.channel.script("broker_restore")(
                keys=self._keys, args=[tag, time(), where], client=conn
            )

    def restore_visible(self, start: int = 0, num: int | None = 10, interval: int = 10) -> None:
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        now = time()
        with self.channel.conn_or_acquire() as client:
            self.channel.script("broker_sweep")(
                keys=self._keys,
                args=[now - self.visibility_timeout, now, num or DEFAULT_SWEEP_BATCH],
                client=client,
            )

    @property
    def _keys(self) -> list[str]:
        return [keys.BROKER_MESSAGES, keys.BROKER_INDEX]


class Channel(stock.Channel):
    QoS = QoS
    # ack and reject(requeue=False) are kombu's own, on the fleet's keys
    unacked_key = keys.BROKER_MESSAGES
    unacked_index_key = keys.BROKER_INDEX
    tracked_queues: frozenset[str] | tuple[str, ...] = ()
    from_transport_options = (*stock.Channel.from_transport_options, "tracked_queues")  # type: ignore[assignment]
    # kombu's helpers used here, typed: the queue names a message's exchange and routing
    # key lead to, its priority (0-9), and the list holding a queue's messages of a priority
    _lookup: Callable[..., list[str]]
    _get_message_priority: Callable[..., int]
    _q_for_pri: Callable[[str, int], str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cast(Any, super()).__init__(*args, **kwargs)
        self.tracked_queues = frozenset(self.tracked_queues)
        self._scripts: dict[str, Any] = {}

    def script(self, name: str) -> Any:
        if name not in self._scripts:
            self._scripts[name] = script(self.client, name)
        return self._scripts[name]

    @staticmethod
    def entry(payload: str, exchange: str, routing_key: str, list_key: str) -> str:
        return json.dumps([payload, exchange, routing_key, list_key])

    def entry_of_delivered(self, message: Any) -> str:
        info = message.delivery_info
        exchange, routing_key = info["exchange"], info["routing_key"]
        queue = min(self._lookup(exchange, routing_key) or [routing_key])  # a set: one of them
        priority = self._get_message_priority(message._raw, reverse=False)
        list_key = self._q_for_pri(queue, priority)
        return self.entry(dumps(message._raw), exchange, routing_key, list_key)

    def put_commands(self, queue: str, message: dict[str, Any]) -> list[Command]:
        """The Redis commands that publish `message` to `queue` (in one MULTI/EXEC by the
        caller): its LPUSH and, for a job queue, its filing."""
        priority = self._get_message_priority(message, reverse=False)
        list_key = self._q_for_pri(queue, priority)
        payload = dumps(message)
        commands: list[Command] = [("lpush", (list_key, payload))]
        if queue in self.tracked_queues:
            props = message["properties"]
            info = props.get("delivery_info") or {}
            tag = props["delivery_tag"]
            exchange, routing_key = info.get("exchange", ""), info.get("routing_key", queue)
            entry = self.entry(payload, exchange, routing_key, list_key)
            commands += [
                ("hset", (keys.BROKER_MESSAGES, tag, entry)),
                ("zadd", (keys.BROKER_INDEX, {tag: time()})),
            ]
        return commands

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        if queue not in self.tracked_queues or self._expires.get(queue):
            cast(Any, super())._put(queue, message, **kwargs)
            return
        commands = self.put_commands(queue, message)
        batch = kwargs.pop("_publish_batch", None)
        if batch is not None:  # kombu's batch publisher: pipelined with its neighbours
            for name, args in commands:
                batch.add(name, *args)
            return
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=True)
            for name, args in commands:
                getattr(pipe, name)(*args)
            pipe.execute()

    def _restore(self, message: Any, leftmost: bool = False) -> None:
        self.qos.restore_by_tag(message.delivery_tag, leftmost=leftmost)

    def _purge(self, queue: str) -> int:
        lists = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        with self.conn_or_acquire() as client:
            return int(
                self.script("broker_purge")(
                    keys=[keys.BROKER_MESSAGES, keys.BROKER_INDEX, *dict.fromkeys(lists)],
                    client=client,
                )
            )

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._purge(queue)
        cast(Any, super())._delete(queue, *args, **kwargs)


class Transport(stock.Transport):
    Channel = Channel
