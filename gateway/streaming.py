"""Following jobs' streams without a thread or a connection each: a few XREAD BLOCK
loops per gateway process, each over up to STREAMS_PER_READER of the streams its
requests follow, and a queue per request (docs/streaming.md).

A request registers its job and cursor (a record id: "0-0" from the start, or the
Last-Event-ID it resumes from) before it reads, so nothing written before is missed. A
reader reads its streams in one XREAD, each from where it read it last (moved back for a
follower that resumes from further back), and hands each record to the followers it is
new to. A request that registers while its reader is blocked wakes it (CLIENT UNBLOCK,
from another connection): its first record is not held back by a long block.

Why several readers of a bounded size, and a pause between rounds: an XREAD costs Redis
time for every stream it names, and a reader whose streams are written to one by one
goes round once per record. One reader over 1,000 streams at 500 records a second kept
Redis busy 2.8 ms a round and put tokens up to half a second late.
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

BLOCK_MS = 5_000  # a reader's longest wait; a new follower wakes it sooner
STREAMS_PER_READER = 100  # a reader's XREAD names at most this many streams
ROUND_S = 0.005  # a reader's rounds start at least this far apart: records gather
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
        self._following: dict[str, set[Follower]] = {}
        self._readers: list[_Reader] = []
        self._reader_of: dict[str, _Reader] = {}  # stream key -> the reader that reads it
        self._looking: asyncio.Task[None] | None = None

    async def follow(self, job_id: str, cursor: str = streams.START) -> Follower:
        follower = Follower(self, job_id, cursor, await self.waiter.watch(job_id))
        key = keys.stream(job_id)
        self._following.setdefault(key, set()).add(follower)
        reader = self._reader_of.get(key)
        if reader is None:
            reader = min(self._readers, key=lambda r: len(r.read_at), default=None)
            if reader is None or len(reader.read_at) >= STREAMS_PER_READER:
                reader = _Reader(self)
                self._readers.append(reader)
            self._reader_of[key] = reader
        reader.add(key, cursor)
        if self._looking is None or self._looking.done():
            self._looking = asyncio.get_running_loop().create_task(self._look_again())
        return follower

    def leave(self, follower: Follower) -> None:
        self.waiter.unwatch(follower.job_id, follower.final)
        key = keys.stream(follower.job_id)
        found = self._following.get(key)
        if found is not None:
            found.discard(follower)
            if not found:
                del self._following[key]
                self._reader_of.pop(key).remove(key)

    def hand_on(self, key: str, records: list[Record]) -> None:
        for follower in list(self._following.get(key, ())):
            for record in records:
                follower.offer(record)

    async def ended(self, follower: Follower) -> Record | None:
        """The job's last record, when its stored state is final: read again from the
        stream (a record its reader has not handed on yet), else the stored state itself."""
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

    async def close(self) -> None:
        for reader in self._readers:
            reader.closed = True
            reader._idle.set()
        tasks = [r.task for r in self._readers] + [self._looking]
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for reader in self._readers:
            await reader.disconnect()


class _Reader:
    """One XREAD BLOCK loop, on a connection of its own, over a bounded set of streams."""

    def __init__(self, hub: StreamHub) -> None:
        self.hub = hub
        self.read_at: dict[str, str] = {}  # stream key -> the cursor its next XREAD reads from
        self.task: asyncio.Task[None] | None = None
        self.closed = False  # the hub closes: the loop ends, whatever became of its cancel
        self._connection: aioredis.Redis | None = None
        self._client_id: int | None = None
        self._blocked = False  # the loop waits in XREAD now
        self._round = 0  # its XREADs so far
        self._waking = False  # a wake is on its way
        self._idle = asyncio.Event()
        self._wakes: set[asyncio.Task[None]] = set()  # held: a task only weakly held may vanish

    def add(self, key: str, cursor: str) -> None:
        at = self.read_at.get(key)
        if at is None or _order(cursor) < _order(at):
            self.read_at[key] = cursor  # (a follower resuming from further back)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())
        self._idle.set()
        self._wake()

    def remove(self, key: str) -> None:
        self.read_at.pop(key, None)

    def _wake(self) -> None:
        if not self._blocked or self._waking or self._client_id is None:
            return
        self._waking = True
        task = asyncio.get_running_loop().create_task(self._unblock(self._client_id, self._round))
        self._wakes.add(task)
        task.add_done_callback(self._wakes.discard)

    async def _unblock(self, client_id: int, round_: int) -> None:
        """Wake the XREAD of round `round_`: again, until Redis says it woke it, while
        that XREAD may still be on its way to Redis."""
        try:
            for _ in range(100):
                if not self._blocked or self._round != round_:
                    return
                if await self.hub.client.client_unblock(client_id):
                    return
                await asyncio.sleep(0.001)
        except Exception as exc:  # the loop's own timeout wakes it
            log.debug("stream reader not woken: %r", exc)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.closed:
            started = loop.time()
            try:
                got = await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: followers hear of final states meanwhile
                if self.closed:
                    # A cancel that met redis-py's connect timeout comes out of it as a
                    # TimeoutError (Python 3.11's asyncio.timeout): the loop ends anyway.
                    break
                log.warning("stream reader: %r", exc)
                await self.disconnect()
                await asyncio.sleep(0.2)
                continue
            if got:  # records come: let the next round gather more of them
                await asyncio.sleep(max(0.0, started + ROUND_S - loop.time()))

    async def _read(self) -> bool:
        if not self.read_at:
            self._idle.clear()
            await self._idle.wait()
            if self.closed:
                return False
        connection = await self._connect()
        self._blocked, self._waking = True, False
        self._round += 1
        asked: Any = dict(self.read_at)
        try:
            found: Any = await connection.xread(asked, block=BLOCK_MS)
        finally:
            self._blocked = False
        for raw_key, entries in found or []:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            records = [streams.parse(raw_id, fields) for raw_id, fields in entries]
            # (not past a cursor a follower that came meanwhile moved back)
            if records and self.read_at.get(key) == asked[key]:
                self.read_at[key] = records[-1].id
            self.hub.hand_on(key, records)
        return bool(found)

    async def _connect(self) -> aioredis.Redis:
        if self._connection is None:
            # Its own connection, without a socket timeout: it waits up to BLOCK_MS.
            connection = aioredis.Redis.from_url(
                self.hub.url,
                single_connection_client=True,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                health_check_interval=HEALTH_CHECK_S,
            )
            self._client_id = int(await connection.client_id())
            self._connection = connection
        return self._connection

    async def disconnect(self) -> None:
        connection, self._connection, self._client_id = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.aclose()
