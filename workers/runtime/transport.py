"""The fleet's Redis broker transport: kombu's Redis channel, with no moment at which a
kill can lose a job message, and a dead worker's jobs back in seconds.

kombu's stock channel pops a message with BRPOP and only then files it as unacked
(`QoS.append`, a few milliseconds later). A worker killed in between, or a connection
dropped while BRPOP's reply is on the wire, loses the message: no list, hash or counter
holds it any more (celery/celery#7950, celery/kombu#305, kombu#1836). And a message a
worker took comes back only when the visibility timeout (600 s) has passed since, whether
its worker died at once or is still waiting on a long call (then it is run twice).

Here a job message is filed when it is published (scripts/broker_publish.lua): its text
in the message store, its tag in its list's zset of waiting messages, scored by its
position in the list. The pop itself is kombu's BRPOP, unchanged. The delivery moves the
tag to the held hash of the worker process that took it (broker_delivered.lua); the ack
forgets it (broker_ack.lua). Each worker process beats (workers/runtime/liveness.py):
while it beats its messages stay its own, however long their calls run; once its beat
lapses (FLEET_WORKER_LAPSE_S, 4 s by default) any live worker's next beat puts them back
at the front of their lists, and a clean shutdown gives them back at once. A message
popped whose delivery no process recorded is found by its position, without reading the
list, and put back after a lapse too. Delivery is at least once, as with the stock
channel; the fleet's delivery counters and stored final states keep a job from being
answered or billed twice (docs/architecture.md, "No job lost").

The wire format is kombu's (the message text on the queue's lists), so `fleet status`
and Flower's queue lengths read the same lists. A producer in another language files its
message with the same script (docs/enqueue-from-any-language.md); one that only LPUSHes
works too, its message filed at delivery, as kombu does (unprotected until then).

Only the job queues (the `tracked_queues` transport option) are filed; Celery's own
reply and control queues are consumed without acks and keep the stock behaviour.
`FLEET_BROKER_TRANSPORT=kombu` selects kombu's stock channel (workers/runtime/celery_app.py),
for comparison (tests/chaos/kills.py). kombu's visibility sweep does nothing here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from kombu.transport import redis as stock
from kombu.transport import virtual
from kombu.utils import json as kombu_json

from workers.runtime import liveness
from workers.state import keys
from workers.state.connections import script, source

# kombu's Redis transport is not annotated. What this module calls of it goes through typed
# names (below and in Channel), or through `cast(Any, super())` where it extends a method.
dumps: Callable[[Any], str] = kombu_json.dumps  # JSON as kombu writes messages
# kombu's in-memory QoS bookkeeping (what is delivered, what acked), below its Redis writes
VirtualQoS: Any = virtual.QoS


Command = tuple[str, tuple[Any, ...]]  # a redis-py client method and its arguments


def publish_command(list_key: str, messages: list[tuple[str, str]]) -> Command:
    """One EVAL of broker_publish.lua that files and pushes `messages` (text, delivery
    tag), in order, onto `list_key`. EVAL, not EVALSHA: inside a pipeline or a MULTI a
    NOSCRIPT (a Redis restarted since) could not be redone."""
    script_keys = [
        list_key,
        keys.BROKER_MESSAGES,
        keys.BROKER_POSITIONS,
        keys.broker_queued(list_key),
    ]
    args = [item for message in messages for item in message]
    return ("eval", (source("broker_publish"), len(script_keys), *script_keys, *args))


def merged_publishes(commands: list[Command]) -> list[Command]:
    """`commands` with the filed publishes to each list merged into one, in order."""
    publish = source("broker_publish")
    by_list: dict[str, list[tuple[str, str]]] = {}
    rest: list[Command] = []
    for name, args in commands:
        if name == "eval" and args[0] == publish:
            items = args[6:]
            by_list.setdefault(args[2], []).extend(zip(items[::2], items[1::2], strict=True))
        else:
            rest.append((name, args))
    return [*(publish_command(key, items) for key, items in by_list.items()), *rest]


class QoS(stock.QoS):
    """Deliveries, acks and hand-backs on the fleet's filing (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cast(Any, super()).__init__(*args, **kwargs)
        self._stamps: dict[str, str] = {}  # delivery tag -> its delivery's stamp

    def append(self, message: Any, delivery_tag: str) -> None:
        channel = self.channel
        process = channel.beat.process
        list_key = channel.list_of(message)
        held = [
            keys.BROKER_MESSAGES,
            keys.broker_queued(list_key),
            keys.BROKER_POPPED,
            keys.broker_held(process),
            keys.BROKER_HOLDERS,
        ]
        args = [delivery_tag, list_key, channel.beat.lapse_ms, process]
        delivered = channel.script("broker_delivered")
        with channel.conn_or_acquire() as client:
            stamp = delivered(keys=held, args=[*args, ""], client=client)
            if not stamp:  # pushed by a producer that did not file it: filed now, as kombu does
                stamp = delivered(keys=held, args=[*args, dumps(message._raw)], client=client)
        self._stamps[delivery_tag] = stamp.decode() if isinstance(stamp, bytes) else str(stamp)
        # virtual.QoS's own bookkeeping (skipping kombu's Redis writes, done above)
        VirtualQoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        self._forget(delivery_tag)
        VirtualQoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
        else:
            self._forget(delivery_tag)
        VirtualQoS.ack(self, delivery_tag)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        # kombu's `leftmost` means LPUSH: the back of the line (BRPOP pops the right end)
        self._stamps.pop(tag, None)
        where = "back" if leftmost else "front"
        if self._detached():
            self.channel.beat.give_back_later(tag, where)
            return
        try:
            with self.channel.conn_or_acquire(client) as conn:
                self.channel.beat.give_back(tag, where, conn)
        except self.channel.connection_errors:  # Redis away: this process's beat retries
            self.channel.beat.give_back_later(tag, where)

    def restore_unacked(self, client: Any = None) -> None:
        """Hand back what this channel took and did not ack (its close): each one, or, with
        Redis away, later, from the beat (kombu's stops at the first error)."""
        for tag in list(self._delivered):
            self.restore_by_tag(tag, client=client)
        self._delivered.clear()

    def restore_visible(self, start: int = 0, num: int | None = 10, interval: int = 10) -> None:
        """kombu's visibility sweep: nothing to do. Messages come back by their holder's
        lapse (workers/runtime/liveness.py), not by a clock."""

    def _detached(self) -> bool:
        """Whether this QoS's channel was closed under it (its connection lost with Redis,
        and replaced): a task that ends after the reconnection acks through it."""
        connection = self.channel.connection
        return connection is None or connection.client is None

    def _forget(self, tag: str) -> None:
        stamp = self._stamps.pop(tag, "")
        if self._detached():
            self.channel.beat.ack_later(tag, stamp)
            return
        try:
            with self.channel.conn_or_acquire() as conn:
                self.channel.beat.ack(tag, stamp, conn)
        except self.channel.connection_errors:  # Redis away: this process's beat retries
            self.channel.beat.ack_later(tag, stamp)


class Channel(stock.Channel):
    QoS = QoS
    tracked_queues: frozenset[str] | tuple[str, ...] = ()
    lapse_s: float = liveness.DEFAULT_LAPSE_S
    from_transport_options = (*stock.Channel.from_transport_options, "tracked_queues", "lapse_s")  # type: ignore[assignment]
    # kombu's helpers used here, typed: the queue names a message's exchange and routing
    # key lead to, its priority (0-9), and the list holding a queue's messages of a priority
    _lookup: Callable[..., list[str]]
    _get_message_priority: Callable[..., int]
    _q_for_pri: Callable[[str, int], str]
    priority_steps: list[int]
    _connparams: Callable[..., dict[str, Any]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cast(Any, super()).__init__(*args, **kwargs)
        self.tracked_queues = frozenset(self.tracked_queues)
        self._scripts: dict[str, Any] = {}
        self._beat: liveness.Beat | None = None
        self._beating: list[str] = []  # the lists this channel consumes, as the beat knows

    def script(self, name: str) -> Any:
        if name not in self._scripts:
            self._scripts[name] = script(self.client, name)
        return self._scripts[name]

    @property
    def beat(self) -> liveness.Beat:
        """This process's beat on this channel's Redis (one per process and Redis)."""
        if self._beat is None:
            self._beat = liveness.beat_for(self._connparams(), self.lapse_s)
        return self._beat

    @property
    def held_key(self) -> str:
        return keys.broker_held(self.beat.process)

    def lists(self, queue: str) -> list[str]:
        """The lists of a queue's messages, one per priority step."""
        return list(dict.fromkeys(self._q_for_pri(queue, pri) for pri in self.priority_steps))

    def list_of(self, message: Any) -> str:
        """The list a delivered message was popped from."""
        info = message.delivery_info
        exchange, routing_key = info["exchange"], info["routing_key"]
        queue = min(self._lookup(exchange, routing_key) or [routing_key])  # a set: one of them
        return self._q_for_pri(queue, self._get_message_priority(message._raw, reverse=False))

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        consumer = cast(Any, super()).basic_consume(queue, *args, **kwargs)
        if queue in self.tracked_queues and not kwargs.get("no_ack"):
            lists = self.lists(queue)
            self._beating += lists
            self.beat.consume(lists)
        return consumer

    def close(self) -> None:
        cast(Any, super()).close()  # (hands back what it prefetched: restore_unacked)
        if self._beat is not None and self._beating:
            self._beat.release(self._beating)
            self._beating = []

    def put_commands(self, queue: str, message: dict[str, Any]) -> list[Command]:
        """The Redis commands that publish `message` to `queue`: a job queue's message
        filed (broker_publish.lua), any other's LPUSHed, as kombu does. The fleet's own
        batch sender (workers/runtime/sending.py) merges a batch's filed publishes per list
        (`merged_publishes`)."""
        list_key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        payload = dumps(message)
        if queue not in self.tracked_queues:
            return [("lpush", (list_key, payload))]
        return [publish_command(list_key, [(payload, message["properties"]["delivery_tag"])])]

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
            for name, args in commands:
                getattr(client, name)(*args)

    def _restore(self, message: Any, leftmost: bool = False) -> None:
        self.qos.restore_by_tag(message.delivery_tag, leftmost=leftmost)

    def _purge(self, queue: str) -> int:
        lists = self.lists(queue)
        pairs = [key for list_key in lists for key in (list_key, keys.broker_queued(list_key))]
        with self.conn_or_acquire() as client:
            return int(
                self.script("broker_purge")(keys=[keys.BROKER_MESSAGES, *pairs], client=client)
            )

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._purge(queue)
        cast(Any, super())._delete(queue, *args, **kwargs)


class Transport(stock.Transport):
    Channel = Channel
