"""Following jobs' streams without a thread or a connection each: one XREAD BLOCK loop per
gateway process over every stream a request follows, and a queue per request
(docs/streaming.md).

A request registers its job and cursor (a record id: "0-0" from the start, or the
Last-Event-ID it resumes from) before it reads, so nothing written before is missed. The
loop reads every followed stream in one XREAD, each from the lowest cursor of its
followers, and hands each record to the followers it is new to. A request that registers
while the loop is blocked wakes it (CLIENT UNBLOCK, from another connection): its first
record is not held back by a long block.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

from gateway.waiter import ResultWaiter
from workers.state import keys, streams
from workers.state.connections import CONNECT_TIMEOUT_S, HEALTH_CHECK_S
from workers.state.streams import Record

log = logging.getLogger(__name__)

BLOCK_MS = 5_000  # the loop's longest wait; a new follower wakes it sooner
# How often the hub reads the stored states of every followed job, in one MGET: a final
# state's publication (which wakes its followers at once) may have been missed while the
# waiter's pub/sub reconnected.
LOOK_AGAIN_S = 2.0
MGET_KEYS = 500  # result keys per MGET


def _order(record_id: str) -> tuple[int, int]:
    ms, _, seq = record_id.partition("-")
    return int(ms), int(seq or 0)


def valid_cursor(value: str) -> bool:
    """Whether `value` is a stream record id (what Last-Event-ID carries)."""
    ms, dash, seq = value.partition("-")
    return bool(dash) and ms.isdigit() and seq.isdigit()


class Follower:
    """One request's view of a job's stream: the records after its cursor, in order."""

    def __init__(
        self, hub: StreamHub, job_id: str, cursor: str, final: asyncio.Future[Any]
    ) -> None:
        self.hub, self.job_id, self.cursor = hub, job_id, cursor
        self.final = final  # the job's final state, once published (gateway/waiter.py)
        self.records: collections.deque[Record] = collections.deque()
        self._wake: asyncio.Future[None] | None = None
        final.add_done_callback(lambda _: self._signal())

    def offer(self, record: Record) -> None:
        if _order(record.id) > _order(self.cursor):
            self.cursor = record.id
            self.records.append(record)
            self._signal()

    def _signal(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def next(self, timeout_s: float) -> Record | None:
        """The next record, or None when none comes within `timeout_s`. A job that ended
        without an `end` record in its stream (revoked before a worker took it, a job
        that did not stream, a stream past its TTL) gets its stored final state as one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if self.records:
                return self.records.popleft()
            if self.final.done():
                return await self.hub.ended(self)
            left = deadline - loop.time()
            if left <= 0:
                return None
            self._wake = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake, left)

    def close(self) -> None:
        self.hub.leave(self)


class StreamHub:
    def __init__(self, url: str, waiter: ResultWaiter) -> None:
        self.url = url
        self.waiter = waiter  # its pub/sub tells a follower its job's final state
        self.client = waiter.client  # the gateway's pooled client: wakes, stored states
        self._reader: aioredis.Redis | None = None
        self._reader_id: int | None = None
        self._following: dict[str, set[Follower]] = {}
        self._task: asyncio.Task[None] | None = None
        self._looking: asyncio.Task[None] | None = None
        self._blocked = False  # the loop waits in XREAD now
        self._round = 0  # the loop's XREADs so far
        self._waking = False  # a wake is on its way
        self._idle = asyncio.Event()
        self._wakes: set[asyncio.Task[None]] = set()  # held: a task only weakly held may vanish

    async def follow(self, job_id: str, cursor: str = streams.START) -> Follower:
        follower = Follower(self, job_id, cursor, await self.waiter.watch(job_id))
        self._following.setdefault(keys.stream(job_id), set()).add(follower)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
            self._looking = asyncio.get_running_loop().create_task(self._look_again())
        self._idle.set()
        self._wake()
        return follower

    def leave(self, follower: Follower) -> None:
        self.waiter.unwatch(follower.job_id, follower.final)
        key = keys.stream(follower.job_id)
        found = self._following.get(key)
        if found is not None:
            found.discard(follower)
            if not found:
                del self._following[key]

    async def ended(self, follower: Follower) -> Record | None:
        """The job's last record, when its stored state is final: read again from the
        stream (a record the loop has not handed on yet), else the stored state itself."""
        stored = streams.final_state(await self.client.get(keys.result(follower.job_id)))
        if stored is None:
            return None
        found: Any = await self.client.xread({keys.stream(follower.job_id): follower.cursor})
        for _key, entries in found or []:
            for raw_id, fields in entries:
                follower.offer(streams.parse(raw_id, fields))
        if follower.records:
            return follower.records.popleft()
        return Record(id=follower.cursor, end=stored)

    async def _look_again(self) -> None:
        """Every LOOK_AGAIN_S, the stored states of the jobs whose final state no follower
        has heard of, in MGETs: a final one is handed to its followers."""
        while True:
            await asyncio.sleep(LOOK_AGAIN_S)
            waiting: dict[str, list[Follower]] = {}
            for followers in list(self._following.values()):
                for follower in followers:
                    if not follower.final.done():
                        waiting.setdefault(follower.job_id, []).append(follower)
            jobs = list(waiting)
            for start in range(0, len(jobs), MGET_KEYS):
                part = jobs[start : start + MGET_KEYS]
                try:
                    found = await self.client.mget([keys.result(j) for j in part])
                except Exception as exc:  # Redis away: the next look
                    log.debug("stored states not read: %r", exc)
                    break
                for job_id, raw in zip(part, found, strict=True):
                    stored = streams.final_state(raw)
                    for follower in waiting[job_id] if stored is not None else ():
                        if not follower.final.done():
                            follower.final.set_result(stored)

    def _wake(self) -> None:
        if not self._blocked or self._waking or self._reader_id is None:
            return
        self._waking = True
        task = asyncio.get_running_loop().create_task(self._unblock(self._reader_id, self._round))
        self._wakes.add(task)
        task.add_done_callback(self._wakes.discard)

    async def _unblock(self, reader_id: int, round_: int) -> None:
        """Wake the loop's XREAD of round `round_`: again, until Redis says it woke it,
        while that XREAD may still be on its way to Redis."""
        try:
            for _ in range(100):
                if not self._blocked or self._round != round_:
                    return
                if await self.client.client_unblock(reader_id):
                    return
                await asyncio.sleep(0.001)
        except Exception as exc:  # the loop's own timeout wakes it
            log.debug("stream reader not woken: %r", exc)

    async def _loop(self) -> None:
        while True:
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: followers read stored states meanwhile
                log.warning("stream reader: %r", exc)
                await self._drop_reader()
                await asyncio.sleep(0.2)

    async def _read(self) -> None:
        if not self._following:
            self._idle.clear()
            await self._idle.wait()
        reader = await self._connect()
        cursors: Any = {
            key: min((f.cursor for f in followers), key=_order)
            for key, followers in self._following.items()
        }
        if not cursors:
            return
        self._blocked, self._waking = True, False
        self._round += 1
        try:
            found: Any = await reader.xread(cursors, block=BLOCK_MS)
        finally:
            self._blocked = False
        for raw_key, entries in found or []:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            records = [streams.parse(raw_id, fields) for raw_id, fields in entries]
            for follower in list(self._following.get(key, ())):
                for record in records:
                    follower.offer(record)

    async def _connect(self) -> aioredis.Redis:
        if self._reader is None:
            # Its own connection, without a socket timeout: it waits up to BLOCK_MS.
            reader = aioredis.Redis.from_url(
                self.url,
                single_connection_client=True,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                health_check_interval=HEALTH_CHECK_S,
            )
            self._reader_id = int(await reader.client_id())
            self._reader = reader
        return self._reader

    async def _drop_reader(self) -> None:
        reader, self._reader, self._reader_id = self._reader, None, None
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader.aclose()

    async def close(self) -> None:
        for task in (self._task, self._looking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self._drop_reader()
