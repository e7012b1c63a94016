"""`dispatch()` and `dispatch_many()`: validate jobs, route them, send each to the queue of
its first usable model; and `JobHandle`, which follows a job to its final Result.

The light client of the fleet. It stands above what it uses: the decisions of `router`
(which hold no I/O) and the sending and live-state code of `workers`. Importing this module
loads no Celery and no Redis client; sending loads Celery's client side and redis-py, and
nothing of the worker (no pool, no task module, no ledger, no provider adapter).
tests/test_layering.py holds it to that.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.catalog import Catalog, catalog_path, load_catalog
from router.errors import (
    BatchRefused,
    InvalidJob,
    JobFailed,
    NoRouteAvailable,
    StreamInterrupted,
)
from router.jobs import Job, parse_job
from router.policy import Hop, Route, route_job
from router.results import Delta, Result
from router.slots import earliest, horizon

_catalogs: dict[tuple[Path, float], Catalog] = {}
LOOK_AGAIN_S = 1.0  # how often a waiting caller reads the stored state itself
FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")


def current_catalog(environ: Mapping[str, str] = os.environ) -> Catalog:
    """The catalog in force, loaded again only when its file changes."""
    path = catalog_path(environ)
    key = (path, path.stat().st_mtime if path.exists() else 0.0)
    if key not in _catalogs:
        _catalogs.clear()
        _catalogs[key] = load_catalog(path)
    return _catalogs[key]


class JobHandle:
    """Follows a dispatched job to its final Result, across every escalation."""

    def __init__(self, job: Job, route: Route, async_result: Any) -> None:
        self.job = job
        self.route = route
        self._async = async_result

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def state(self) -> str:
        return str(self._async.state)

    def get(self, timeout: float | None = None, propagate: bool = True) -> Result:
        """Wait for the Result. A job that ended without an answer raises JobFailed
        (whose `.result` holds every attempt), or returns its Result with propagate=False."""
        value = self._wait(timeout)
        if isinstance(value, JobFailed):
            result = Result.model_validate(value.result or _bare(self.job, str(value)))
            if propagate:
                raise JobFailed(str(value), result.summary())
            return result
        if isinstance(value, BaseException):
            result = Result.model_validate(_bare(self.job, f"{type(value).__name__}: {value}"))
            if propagate:
                raise JobFailed(result.error or "job failed", result.summary())
            return result
        return Result.model_validate(value)

    def stream(self, timeout: float = 600.0) -> Iterator[Delta | Result]:
        """The answer as it is written, then the Result: a job dispatched with
        `"stream": True` yields its deltas as its model writes them (docs/streaming.md);
        any other yields its whole answer as one Delta when it ends. A job that ends
        without an answer raises JobFailed, as get() does. A stream that stops after part
        of the answer went out (the model's stream broke, its worker died) raises
        StreamInterrupted: nothing is repeated, and the job goes on unstreamed to a
        Result that get() gives. TimeoutError when the job does not end in `timeout` s."""
        from workers.state import streams
        from workers.state.connections import redis_client

        seen = False
        for record in streams.follow(redis_client(), self.id, streams.START, timeout):
            if record.delta is not None:
                seen = True
                yield record.delta
            elif record.error is not None:
                message = f"job {self.id}: the stream stopped: {record.error.get('message')}"
                raise StreamInterrupted(message, {"job_id": self.id, **record.error})
            elif record.end is not None:
                job = self.job
                result = stored_result(record.end, job.id, job.task_class, job.source)
                if not result.ok:
                    raise JobFailed(result.error or "job failed", result.summary())
                if not seen and (result.text or result.reasoning or result.tool_calls):
                    calls = tuple({"index": i, **c} for i, c in enumerate(result.tool_calls))
                    yield Delta(result.text or "", result.reasoning or "", calls)
                yield result

    def _wait(self, timeout: float | None) -> Any:
        """The job's final value. Celery wakes the wait when the final state is published;
        the stored state is also read again every LOOK_AGAIN_S, because the fleet
        subscribes to a job's result channel when a caller waits, not when it sends
        (workers/runtime/resultstore.py): a state published in the instant between the
        subscription and the first read would otherwise be missed."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LOOK_AGAIN_S if deadline is None else deadline - time.monotonic()
            try:
                return self._async.get(
                    timeout=max(0.0, min(LOOK_AGAIN_S, left)), propagate=False, interval=0.05
                )
            except CeleryTimeout:
                meta = self._async.backend.get_task_meta(self.id, cache=False)
                if meta.get("status") in FINAL_STATES:
                    self._async._maybe_set_cache(meta)  # (and stop listening for it)
                    return meta["result"]
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.id} not finished after {timeout} s") from None


def stored_result(meta: dict[str, Any], job_id: str, task_class: str, source: str) -> Result:
    """The Result a job's final stored state (Celery's meta, as the result key and its
    stream's `end` record hold it) carries; for one that carries none (a job that ended
    outside the fleet's code), a bare Result saying how it ended."""
    value = meta.get("result")
    if meta.get("status") == "SUCCESS" and isinstance(value, dict):
        return Result.model_validate(value)
    args = value.get("exc_message") if isinstance(value, dict) else None
    if isinstance(args, list) and len(args) == 2 and isinstance(args[1], dict) and args[1]:
        return Result.model_validate(args[1])
    error = f"job {str(meta.get('status', 'ended')).lower()}"
    if isinstance(args, list) and args:
        error = f"{error}: {args[0]}"
    return Result(job_id=job_id, task_class=task_class, source=source, ok=False, error=error)


def _bare(job: Job, error: str) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "task_class": job.task_class,
        "source": job.source,
        "ok": False,
        "error": error,
    }


@dataclass(frozen=True)
class _Routed:
    job: Job
    decision: Route  # rules 1-4: the chain the job travels with
    first: Hop  # rules 5-6: where it starts now


def dispatch(job: Job | dict[str, Any], *, app: Any = None) -> JobHandle:
    """Validate, route and enqueue `job`; InvalidJob or NoRouteAvailable if it cannot go
    (nothing is queued, and its idempotency key stays free)."""
    catalog = current_catalog()
    return _send(catalog, [_route(catalog, job)], app)[0]


def dispatch_many(jobs: Sequence[Job | dict[str, Any]], *, app: Any = None) -> list[JobHandle]:
    """Validate, route and enqueue a batch (a cron fan-out, a swarm of sub-agents) in one
    pipelined round trip to the broker. Every job is checked as `dispatch` checks it;
    when any cannot go, BatchRefused names each one (`job <index>: <why>`) and nothing of
    the batch is queued. Handles come back in the order of `jobs`."""
    catalog = current_catalog()
    routed: list[_Routed] = []
    errors: list[tuple[int, str]] = []
    for index, job in enumerate(jobs):
        try:
            routed.append(_route(catalog, job))
        except (InvalidJob, NoRouteAvailable) as exc:
            errors.append((index, str(exc)))
    if errors:
        raise BatchRefused(errors, len(jobs))
    ids = [r.job.id for r in routed]
    if len(set(ids)) != len(ids):
        dup = next(i for i, job_id in enumerate(ids) if ids.index(job_id) != i)
        raise BatchRefused([(dup, f"job id {ids[dup]!r} appears twice in the batch")], len(ids))
    return _send(catalog, routed, app)


def _route(catalog: Catalog, data: Job | dict[str, Any]) -> _Routed:
    job = parse_job(data)
    decision = route_job(catalog, job)
    return _Routed(job, decision, first_usable(catalog, job, decision))


def _send(catalog: Catalog, routed: list[_Routed], app: Any) -> list[JobHandle]:
    """Claim the idempotency keys of routed jobs, send the jobs that own theirs, and
    release the keys again if the send fails."""
    from workers.runtime.celery_app import get_app
    from workers.runtime.sending import Outgoing, send_many, travelling_state
    from workers.state import idempotency
    from workers.state.connections import redis_client

    app = app or get_app()
    keyed = [(str(r.job.idempotency_key), r.job.id) for r in routed if r.job.idempotency_key]
    redis = redis_client() if keyed else None
    owners = dict(zip(keyed, idempotency.claim(redis, keyed), strict=True))
    handles: list[JobHandle] = []
    outgoing, claimed = [], []
    for r in routed:
        key = (str(r.job.idempotency_key), r.job.id)
        owner = owners.get(key, r.job.id)
        if owner != r.job.id:  # sent before: follow that job, send nothing new
            first = r.job.model_copy(update={"id": owner})
            handles.append(JobHandle(first, route_job(catalog, first), _async_result(app, owner)))
            continue
        if key in owners:
            claimed.append(key)
        outgoing.append(
            Outgoing(
                job=r.job.model_dump(mode="json", exclude_none=True),
                state=travelling_state(r.decision),
                queue=r.first.queue,
                model=r.first.model,
                priority=r.job.priority,
            )
        )
        handles.append(JobHandle(r.job, r.decision, None))
    try:
        sent = iter(send_many(app, outgoing))
    except BaseException:
        if claimed:
            idempotency.release(redis, claimed)
        raise
    for handle in handles:
        if handle._async is None:
            handle._async = next(sent)
    return handles


def _async_result(app: Any, job_id: str) -> Any:
    from celery.result import AsyncResult

    return AsyncResult(job_id, app=app)


def first_usable(catalog: Catalog, job: Job, decision: Route) -> Hop:
    """The first hop live state allows now (as of a second ago; a model resting for a
    capability the job needs is not allowed). NoRouteAvailable when
    none will be usable within the policy's max wait: the job fails fast, with every
    model's reason."""
    from workers.state.live import live_view

    models = [h.model for h in decision.chain]
    blocked = live_view(catalog).blocks(job.task_class, models, decision.needs)
    for hop in decision.chain:
        if hop.model not in blocked:
            return hop
    limit = horizon(time.time(), catalog.policy.max_wait_s, job.deadline)
    found = earliest(blocked, limit)
    if found is None:
        reasons = [*decision.dropped, *((m, b.reason) for m, b in blocked.items())]
        raise NoRouteAvailable(job.task_class, reasons)
    return next(hop for hop in decision.chain if hop.model == found[1])  # the worker waits
