"""Sending the gateway's jobs, in batches: every request that reaches the send while the
previous batch is on its way goes in the next one (a group commit).

A request's send is two round trips to Redis (its key's reservation, then the job's
message), made from a thread because redis-py blocks. Sent one by one, a burst's requests
would queue behind each other's thread hops and round trips, their threads fighting the
event loop for the GIL, while the workers wait for the jobs. Batched, a burst costs a few
hops: every reservation of a batch in one pipeline (`apps.app_admit`, each admitted or
refused on its own) and every admitted job in one `dispatch_many` MULTI/EXEC. One request
alone is sent at once.

`dispatch_many` refuses a whole batch if any job cannot go (a model went down since the
request was routed): the batch is then sent job by job, so that each request gets its
own answer. Nothing is queued for a refused request, and its reservation is refunded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from client import dispatch, dispatch_many
from gateway.errors import APIError, invalid_job, no_route
from gateway.keys import AppKey
from router.errors import InvalidJob, NoRouteAvailable
from router.jobs import Job, Reservation
from workers.state import apps, keys
from workers.state.apps import Refused

MAX_BATCH = 200  # jobs per MULTI/EXEC: bounds one round trip's size and wait
FLUSHES = 2  # batches on their way at once (one sending while the next fills)


@dataclass
class _Pending:
    key: AppKey
    job: Job
    worst: float
    done: asyncio.Future[Job] = field(repr=False)


Outcome = Job | APIError


class Sender:
    """`await sender.send(key, job, worst)`: the job as sent (its id may be an earlier
    job's, when an idempotency key named one), or APIError, with nothing queued."""

    def __init__(self, redis: Any, blocking: Callable[..., Any]) -> None:
        self.redis = redis
        self.blocking = blocking  # runs a blocking call in the gateway's threads
        self._waiting: list[_Pending] = []
        self._flushing: set[asyncio.Task[None]] = set()  # held: a task only weakly held may vanish

    async def send(self, key: AppKey, job: Job, worst: float) -> Job:
        done: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending(key, job, worst, done))
        if len(self._flushing) < FLUSHES:
            task = asyncio.ensure_future(self._flush())
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
        return await done

    async def _flush(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            try:
                outcomes: list[Any] = await self.blocking(self.send_batch, batch)
            except Exception as exc:  # Redis away, or a bug: every request of it hears it
                outcomes = [exc] * len(batch)
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.done.done():  # its client went away (the job goes on)
                    continue
                if isinstance(outcome, BaseException):
                    pending.done.set_exception(outcome)
                else:
                    pending.done.set_result(outcome)

    def send_batch(self, batch: list[_Pending]) -> list[Outcome]:
        """Reserve every request's worst case, then dispatch the admitted jobs together."""
        reserved = apps.app_admit(
            self.redis, [(p.key.app, p.key.limits, p.worst, p.job) for p in batch]
        )
        outcomes: list[Outcome | None] = [None] * len(batch)
        going: list[tuple[int, Job, Reservation]] = []
        for index, (pending, got) in enumerate(zip(batch, reserved, strict=True)):
            if isinstance(got, Refused):
                retry = f"{max(1, round(got.retry_after_s))}"
                outcomes[index] = APIError(
                    429, got.reason, code="limit_reached", headers={"Retry-After": retry}
                )
            else:
                going.append((index, pending.job.model_copy(update={"reservation": got}), got))
        for index, outcome in self._dispatch(batch, going):
            outcomes[index] = outcome
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    def _dispatch(
        self, batch: list[_Pending], going: list[tuple[int, Job, Reservation]]
    ) -> list[tuple[int, Outcome]]:
        if not going:
            return []
        if len(going) > 1:
            try:
                handles = dispatch_many([job for _, job, _ in going])
            except (InvalidJob, NoRouteAvailable):
                pass  # one of them cannot go: each on its own, for its own answer
            except Exception as exc:
                return [self._refund(i, batch[i].key, job, r, exc) for i, job, r in going]
            else:
                return [
                    (i, self._sent(batch[i].key, job, r, handle.id))
                    for (i, job, r), handle in zip(going, handles, strict=True)
                ]
        outcomes: list[tuple[int, Outcome]] = []
        for index, job, reservation in going:
            try:
                handle = dispatch(job)
            except Exception as exc:
                outcomes.append(self._refund(index, batch[index].key, job, reservation, exc))
            else:
                outcomes.append((index, self._sent(batch[index].key, job, reservation, handle.id)))
        return outcomes

    def _sent(self, key: AppKey, job: Job, reservation: Reservation, sent_id: str) -> Job:
        if sent_id != job.id:  # an idempotency key named an earlier job: follow it
            apps.refund(self.redis, key.app, job.id, reservation)
            self.redis.delete(keys.owner(job.id))  # this one never runs: nobody owns it
            return job.model_copy(update={"id": sent_id})
        return job

    def _refund(
        self, index: int, key: AppKey, job: Job, reservation: Reservation, exc: Exception
    ) -> tuple[int, Outcome]:
        """A job that did not go: its reservation back, and the request's error."""
        apps.refund(self.redis, key.app, job.id, reservation)
        self.redis.delete(keys.owner(job.id))
        return index, _refusal(exc)


def _refusal(exc: Exception) -> APIError:
    if isinstance(exc, NoRouteAvailable):
        return no_route(exc)
    if isinstance(exc, InvalidJob):
        return invalid_job(exc)
    return APIError(
        503,
        f"the fleet's broker is not reachable ({type(exc).__name__})",
        code="broker_unavailable",
    )
