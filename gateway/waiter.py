"""Waiting for jobs without a thread each: one Redis pub/sub connection per gateway
process, subscribed once to every job's result channel (a pattern), and a future per
waiting request.

A job's state is published on its channel as it is stored (store_result.lua). A waiter
registers its future, then reads the stored state, so a state stored before it came is
found by the read. Subscribing per job would put a SUBSCRIBE and an UNSUBSCRIBE on the
one connection for every request, in turn with the reader: under a burst the requests
queue behind each other there. Each waiter also reads again every LOOK_AGAIN_S, so a
publication missed while the connection reconnects is not waited for in vain.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis

from workers.state import keys
from workers.state.connections import CONNECT_TIMEOUT_S, HEALTH_CHECK_S, SOCKET_TIMEOUT_S
from workers.state.streams import final_state, stored_state

LOOK_AGAIN_S = 1.0
CONNECTIONS = 32  # to the state Redis, shared by every waiting request


class ResultWaiter:
    def __init__(self, url: str, connections: int = CONNECTIONS) -> None:
        # A blocking pool: hundreds of waiters share a few connections, each waiting its
        # turn for one instead of failing with "too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=connections,
            timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            health_check_interval=HEALTH_CHECK_S,
        )
        self.client = aioredis.Redis(connection_pool=pool)
        # The pub/sub connection is one of its own, and (un)subscriptions take turns on
        # it: redis-py's PubSub opens its connection on first use, and concurrent first
        # uses would each open one.
        self._pubsub_client = aioredis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=HEALTH_CHECK_S
        )
        self.pubsub = self._pubsub_client.pubsub(ignore_subscribe_messages=True)
        self._subscribing = asyncio.Lock()
        self._waiting: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed = False  # its reader ends, whatever became of its cancel

    async def stored(self, job_id: str) -> dict[str, Any] | None:
        """The job's stored state (Celery's meta), or None."""
        raw = await self.client.get(keys.result(job_id))
        return stored_state(raw)

    async def watch(self, job_id: str) -> asyncio.Future[dict[str, Any]]:
        """A future that gets the job's final state when it is published (a reader of the
        job's stream waits on it too: gateway/streaming.py). `unwatch` it when done."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(keys.result(job_id), []).append(future)
        try:
            await self._start_reader()
        except BaseException:
            self.unwatch(job_id, future)
            raise
        return future

    def unwatch(self, job_id: str, future: asyncio.Future[dict[str, Any]]) -> None:
        channel = keys.result(job_id)
        waiters = self._waiting.get(channel, [])
        if future in waiters:
            waiters.remove(future)
        if not waiters:
            self._waiting.pop(channel, None)

    async def wait(self, job_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The job's final stored state, or None if it is not final within `timeout_s`."""
        future = await self.watch(job_id)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                meta = final_state(await self.client.get(keys.result(job_id)))
                if meta is not None:
                    return meta
                left = deadline - loop.time()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(future), min(LOOK_AGAIN_S, left))
        finally:
            self.unwatch(job_id, future)

    async def _start_reader(self) -> None:
        # One subscription and one reader for the life of the process, from the first
        # waiter on.
        if self._reader is not None and not self._reader.done():
            return
        async with self._subscribing:
            if self._reader is None or self._reader.done():
                await self.pubsub.psubscribe(keys.result("*"))
                self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        # (A cancel that meets redis-py's timeouts may come out as a TimeoutError:
        # gateway/streaming.py's readers end on the same flag.)
        while not self._closed:
            if not self.pubsub.subscribed:
                await asyncio.sleep(0.01)
                continue
            try:
                message = await self.pubsub.get_message(timeout=1.0)
            except Exception:  # the connection dropped: the waiters' own reads go on
                await asyncio.sleep(0.2)
                continue
            if not message or message.get("type") != "pmessage":
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            meta = final_state(message["data"])
            if meta is None:
                continue
            for future in self._waiting.get(channel, []):
                if not future.done():
                    future.set_result(meta)

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        await self._pubsub_client.aclose()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()  # (a pool given is not closed with it)
