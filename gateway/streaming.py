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
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from workers.state import keys, streams
from workers.state.connections import CONNECT_TIMEOUT_S, HEALTH_CHECK_S
from workers.state.streams import Record

log = logging.getLogger(__name__)

BLOCK_MS = 5_000  # the loop's longest wait; a new follower wakes it sooner
LOOK_AGAIN_S = 1.0  # a follower hearing nothing this long reads its job's stored state


def _order(record_id: str) -> tuple[int, int]:
    ms, _, seq = record_id.partition("-")
    return int(ms), int(seq or 0)


def valid_cursor(value: str) -> bool:
    """Whether `value` is a stream record id (what Last-Event-ID carries)."""
    ms, dash, seq = value.partition("-")
    return bool(dash) and ms.isdigit() and seq.isdigit()


class Follower:
    """One request's view of a job's stream: the records after its cursor, in order."""

    def __init__(self, hub: StreamHub, job_id: str, cursor: str) -> None:
        self.hub, self.job_id, self.cursor = hub, job_id, cursor
        self.records: asyncio.Queue[Record] = asyncio.Queue()

    def offer(self, record: Record) -> None:
        if _order(record.id) > _order(self.cursor):
            self.cursor = record.id
            self.records.put_nowait(record)

    async def next(self, timeout_s: float) -> Record | None:
        """The next record, or None when none comes within `timeout_s`. A job that ended
        without an `end` record in its stream (revoked before a worker took it, a job
        that did not stream, a stream past its TTL) gets its stored final state as one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(self.records.get(), min(LOOK_AGAIN_S, left))
            ended = await self.hub.ended(self)
            if ended is not None:
                return ended

    async def each(self, timeout_s: float) -> AsyncIterator[Record]:
        """Every record up to the last (an `end` or an `error`), each within `timeout_s`
        of the one before (TimeoutError otherwise)."""
        while True:
            record = await self.next(timeout_s)
            if record is None:
                raise TimeoutError(f"job {self.job_id}: nothing new for {timeout_s:g} s")
            yield record
            if record.last:
                return

    def close(self) -> None:
        self.hub.leave(self)


class StreamHub:
    def __init__(self, url: str, client: aioredis.Redis) -> None:
        self.url = url
        self.client = client  # the gateway's pooled client: wakes, stored states
        self._reader: aioredis.Redis | None = None
        self._reader_id: int | None = None
        self._following: dict[str, set[Follower]] = {}
        self._task: asyncio.Task[None] | None = None
        self._blocked = False  # the loop waits in XREAD now
        self._round = 0  # the loop's XREADs so far
        self._waking = False  # a wake is on its way
        self._idle = asyncio.Event()
        self._wakes: set[asyncio.Task[None]] = set()  # held: a task only weakly held may vanish

    def follow(self, job_id: str, cursor: str = streams.START) -> Follower:
        follower = Follower(self, job_id, cursor)
        self._following.setdefault(keys.stream(job_id), set()).add(follower)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._idle.set()
        self._wake()
        return follower

    def leave(self, follower: Follower) -> None:
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
        if not follower.records.empty():
            return follower.records.get_nowait()
        return Record(id=follower.cursor, end=stored)

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._drop_reader()
