"""Worker processes' liveness on the broker's Redis: a message a worker took stays its own
while the worker beats, and goes back to its queue as soon as the beat lapses.

A visibility timeout cannot tell a dead worker from a slow call: too short, and a live
worker's long call (a long-context prompt, a reasoning model) is made again and again;
too long (kombu's 600 s), and a killed worker's jobs wait ten minutes. Here each worker
process beats instead (scripts/broker_beat.lua), every quarter of its lapse
(FLEET_WORKER_LAPSE_S, 4 s by default), from a thread of its own: the event loop, a solo
pool's task or a saturated threads pool cannot stop it (a prefork pool's calls run in
its children, the beat in the parent that holds the messages). Each beat also recovers:
the messages of every process whose beat lapsed go back to the front of their lists, at
once, to be taken by any live worker. At exit (a clean shutdown) a process gives back
what it still holds. Redis' clock times it all, so hosts' clocks do not matter.

A process whose beat lapsed while it lived (cut off from Redis longer than its lapse) has
lost its messages to others; it learns so at its next beat and logs it. Its late acks
change nothing (broker_ack.lua), and its deliveries, superseded by the later ones, neither
answer nor bill (workers/state/deliveries.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

from workers.state import keys
from workers.state.connections import script
from workers.state.deliveries import this_process

log = logging.getLogger(__name__)


def _none_active() -> set[str]:
    return set()


# The delivery tags this process is running now. A Celery worker sets it (workers/runtime/
# tasks.py): a channel closed under its tasks (Redis restarted) could not hand back what
# it held, and what it still runs will ack later, while what it had only reserved never
# will (Celery drops it); only the latter is given back, or a live task's job would run
# twice.
active_tags: Callable[[], set[str]] = _none_active

DEFAULT_LAPSE_S = 4.0
BEATS_PER_LAPSE = 4


class Beat:
    """One process's beat on one broker Redis, from a daemon thread while the process
    consumes job queues."""

    def __init__(self, connparams: dict[str, Any], lapse_s: float) -> None:
        self.process = this_process()
        self._pid = os.getpid()  # (a forked child inherits this object, not the beat)
        self.lapse_ms = int(lapse_s * 1000)
        self.interval_s = lapse_s / BEATS_PER_LAPSE
        # A connection of its own, with timeouts: a beat never waits behind the event loop's
        # BRPOP, and one that cannot reach Redis gives up within the lapse.
        params = {
            **connparams,
            "socket_timeout": lapse_s / 2,
            "socket_connect_timeout": lapse_s / 2,
            "max_connections": 2,
        }
        self.client = redis.Redis(connection_pool=redis.ConnectionPool(**params))
        self._lists: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable = False  # the last beat could not reach Redis
        self._registered = False
        self.holding = 0  # messages this process held at its last beat
        # acks and hand-backs that could not reach Redis (a restart): done at the next beat
        # that can, or the messages would stay held by a live process for good
        self._acks: dict[str, str] = {}
        self._give_backs: dict[str, str] = {}
        self._idle_since: dict[str, float] = {}  # a pending hand-back's task seen not running

    def consume(self, lists: list[str]) -> None:
        """A channel of this process consumes `lists`: beat, and watch them."""
        with self._lock:
            self._lists.update(lists)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="fleet-liveness", daemon=True
                )
                self._thread.start()

    def release(self, lists: list[str]) -> None:
        """A channel closed: stop watching its lists (the beat goes on while this process
        holds messages, and ends after the next one if it holds none)."""
        with self._lock:
            self._lists.subtract(lists)
            self._lists += Counter()  # drop the zeros
        self._wake.set()

    def ack(self, tag: str, stamp: str, client: Any) -> None:
        """Forget a message this process held (broker_ack.lua)."""
        script(client, "broker_ack")(
            keys=[keys.BROKER_MESSAGES, keys.broker_held(self.process)], args=[tag, stamp]
        )

    def give_back(self, tag: str, where: str, client: Any) -> None:
        """Put a message this process holds back in its list (broker_restore.lua)."""
        script(client, "broker_restore")(
            keys=[keys.BROKER_MESSAGES, keys.BROKER_POSITIONS, keys.broker_held(self.process)],
            args=[tag, where, keys.BROKER_QUEUED_PREFIX],
        )

    def ack_later(self, tag: str, stamp: str) -> None:
        with self._lock:
            self._acks[tag] = stamp
            self._give_backs.pop(tag, None)  # its task ended: nothing to give back
            self._idle_since.pop(tag, None)
        log.warning("liveness: an ack could not reach Redis; the beat will make it")

    def give_back_later(self, tag: str, where: str) -> None:
        with self._lock:
            self._give_backs[tag] = where
        log.warning("liveness: a hand-back could not reach Redis; the beat will make it")

    def _settle_pending(self) -> None:
        # A hand-back waits while its task runs, and a lapse after: a task that just ended
        # acks from the event loop, which may still be reconnecting.
        running = active_tags() if self._give_backs else set()
        now = time.monotonic()
        with self._lock:
            acks, self._acks = self._acks, {}
            for tag in self._give_backs:
                if tag in running:
                    self._idle_since.pop(tag, None)
                else:
                    self._idle_since.setdefault(tag, now)
            due = {
                t for t, since in self._idle_since.items() if now - since >= self.lapse_ms / 1000
            }
            backs = {t: w for t, w in self._give_backs.items() if t in due}
            self._give_backs = {t: w for t, w in self._give_backs.items() if t not in due}
            self._idle_since = {t: s for t, s in self._idle_since.items() if t in self._give_backs}
        for tag, stamp in acks.items():
            try:
                self.ack(tag, stamp, self.client)
            except redis.RedisError:
                self.ack_later(tag, stamp)
        for tag, where in backs.items():
            try:
                self.give_back(tag, where, self.client)
            except redis.RedisError:
                self.give_back_later(tag, where)

    def beat(self, lists: list[str] | None = None) -> list[Any]:
        """One beat, watching `lists` (default: those this process consumes):
        broker_beat.lua's reply."""
        if lists is None:
            with self._lock:
                lists = sorted(self._lists)
        reply: list[Any] = script(self.client, "broker_beat")(
            keys=[
                keys.BROKER_HOLDERS,
                keys.BROKER_LIVENESS,
                keys.BROKER_MESSAGES,
                keys.BROKER_POSITIONS,
                keys.BROKER_POPPED,
                *lists,
            ],
            args=[
                self.process,
                self.lapse_ms,
                keys.BROKER_QUEUED_PREFIX,
                keys.BROKER_HELD_PREFIX,
                "1" if self._unreachable else "0",
            ],
        )
        return reply

    def _run(self) -> None:
        while True:
            try:
                self._report(self.beat())
                self._unreachable = False
                self._settle_pending()
            except redis.RedisError as exc:
                if not self._unreachable:
                    log.warning("liveness: the broker's Redis is unreachable (%r)", exc)
                self._unreachable = True
            with self._lock:
                pending = self._acks or self._give_backs
                if not (self._lists or self.holding or self._unreachable or pending):
                    self._leave()
                    self._thread = None
                    return
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _report(self, reply: list[Any]) -> None:
        new, self.holding, restored, *dead = reply
        if new and self._registered:
            log.warning(
                "liveness: this worker's beat lapsed (it could not beat for %.1f s): the"
                " jobs it held were put back for other workers; its late answers are dropped",
                self.lapse_ms / 1000,
            )
        self._registered = True
        for process, count in zip(dead[::2], dead[1::2], strict=True):
            name = process.decode() if isinstance(process, bytes) else process
            log.warning(
                "liveness: worker %s stopped beating: %d jobs it held put back", name, count
            )
        if restored and not dead:
            log.warning("liveness: %d messages popped but never taken put back", restored)

    def _leave(self) -> None:
        """Give back what this process holds and stop being a holder (one step)."""
        try:
            script(self.client, "broker_leave")(
                keys=[
                    keys.BROKER_HOLDERS,
                    keys.BROKER_MESSAGES,
                    keys.BROKER_POSITIONS,
                    keys.broker_held(self.process),
                ],
                args=[self.process, keys.BROKER_QUEUED_PREFIX],
            )
        except redis.RedisError as exc:  # its messages come back by its lapse instead
            log.info("liveness: could not leave cleanly (%r)", exc)
        self._registered = False

    def exit(self) -> None:
        """At a clean exit: give back at once what this process still holds."""
        if os.getpid() == self._pid:
            self._leave()


_beats: dict[tuple[Any, ...], Beat] = {}
_beats_lock = threading.Lock()


def beat_for(connparams: dict[str, Any], lapse_s: float) -> Beat:
    """This process's beat on the Redis `connparams` name."""
    where = tuple(connparams.get(name) for name in ("host", "port", "path", "db", "username"))
    key = (os.getpid(), *where)
    with _beats_lock:
        found = _beats.get(key)
        if found is None:
            found = _beats[key] = Beat(connparams, lapse_s)
            atexit.register(found.exit)
        return found
