"""Waiting for jobs without a thread each: one Redis pub/sub connection per gateway
process, on which every waiting request subscribes to its job's result channel.

The final state is published on the channel as it is stored (store_result.lua); a
waiter subscribes first and then reads the stored state, so a state stored before the
subscription is found by the read. Each waiter also reads again every LOOK_AGAIN_S: a
state published in the instant between the subscription and the read is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import redis.asyncio as aioredis

from workers.state import keys
from workers.state.connections import CONNECT_TIMEOUT_S, HEALTH_CHECK_S

FINAL = ("SUCCESS", "FAILURE", "REVOKED")
LOOK_AGAIN_S = 1.0


class ResultWaiter:
    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=HEALTH_CHECK_S
        )
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self._waiting: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def stored(self, job_id: str) -> dict[str, Any] | None:
        """The job's stored state (Celery's meta), or None."""
        raw = await self.client.get(keys.result(job_id))
        return _meta(raw)

    async def wait(self, job_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The job's final stored state, or None if it is not final within `timeout_s`."""
        channel = keys.result(job_id)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiters = self._waiting.setdefault(channel, [])
        waiters.append(future)
        try:
            if len(waiters) == 1:
                await self.pubsub.subscribe(channel)
            self._start_reader()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                meta = await self.stored(job_id)
                if meta is not None and meta.get("status") in FINAL:
                    return meta
                left = deadline - loop.time()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(future), min(LOOK_AGAIN_S, left))
        finally:
            waiters.remove(future)
            if not waiters:
                del self._waiting[channel]
                with contextlib.suppress(Exception):
                    await self.pubsub.unsubscribe(channel)

    def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while self._waiting:
            try:
                message = await self.pubsub.get_message(timeout=1.0)
            except Exception:  # the connection dropped: the waiters' own reads go on
                await asyncio.sleep(0.2)
                continue
            if not message or message.get("type") != "message":
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            meta = _meta(message["data"])
            if meta is None or meta.get("status") not in FINAL:
                continue
            for future in self._waiting.get(channel, []):
                if not future.done():
                    future.set_result(meta)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        await self.client.aclose()


def _meta(raw: Any) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None
