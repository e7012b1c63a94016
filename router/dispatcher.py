"""`dispatch()`: validate a job, route it, and send it to its first model's queue.

This is the only module of `router/` that talks to the broker: it imports Celery lazily
(via `workers.celery_app`) so the decision code stays free of I/O.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from router.catalog import Catalog, catalog_path, load_catalog
from router.errors import JobFailed, NoRouteAvailable
from router.jobs import Job, parse_job
from router.policy import Hop, Route, route_job
from router.results import Result

_catalogs: dict[tuple[Path, float], Catalog] = {}
IDEMPOTENCY_S = 86_400  # how long an idempotency key names its first job


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
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            value = self._async.get(timeout=timeout, propagate=False, interval=0.05)
        except CeleryTimeout:
            raise TimeoutError(f"job {self.id} not finished after {timeout} s") from None
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


def _bare(job: Job, error: str) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "task_class": job.task_class,
        "source": job.source,
        "ok": False,
        "error": error,
    }


def dispatch(job: Job | dict[str, Any], *, app: Any = None) -> JobHandle:
    """Validate, route and enqueue `job`; InvalidJob or NoRouteAvailable if it cannot go."""
    from workers.celery_app import TASK_RUN_JOB, get_app
    from workers.execute import state_for
    from workers.tasks import describe

    job = parse_job(job)
    catalog = current_catalog()
    if job.idempotency_key:
        first_id = _claim(catalog, job)
        if first_id != job.id:  # sent before: follow that job, run nothing new
            owner = job.model_copy(update={"id": first_id})
            return JobHandle(owner, route_job(catalog, owner), _async_result(app, first_id))
    decision = route_job(catalog, job)  # rules 1-4: the chain the job travels with
    first = first_usable(catalog, job, decision)  # rules 5-6: where it starts now
    app = app or get_app()
    payload = job.model_dump(mode="json", exclude_none=True)
    state = state_for(decision)
    async_result = app.send_task(
        TASK_RUN_JOB,
        kwargs={"job": payload, "state": state},
        task_id=job.id,
        queue=first.queue,
        priority=job.priority,
        argsrepr="()",
        kwargsrepr=describe(payload, first.model),
    )
    return JobHandle(job, decision, async_result)


def _claim(catalog: Catalog, job: Job) -> str:
    """The id of the job that owns this idempotency key: this one, unless one came first."""
    from workers.keys import idempotency
    from workers.live import live_view

    redis = live_view(catalog).state.redis
    key = idempotency(str(job.idempotency_key))
    if redis.set(key, job.id, nx=True, ex=IDEMPOTENCY_S):
        return job.id
    owner = redis.get(key)
    return owner.decode() if owner else job.id


def _async_result(app: Any, job_id: str) -> Any:
    from celery.result import AsyncResult

    from workers.celery_app import get_app

    return AsyncResult(job_id, app=app or get_app())


def first_usable(catalog: Catalog, job: Job, decision: Route) -> Hop:
    """The first hop live state allows now. NoRouteAvailable when none will be usable
    within the policy's max wait: the job fails fast, with every model's reason."""
    from workers.live import live_view

    blocked = live_view(catalog).blocks(job.task_class, [h.model for h in decision.chain])
    for hop in decision.chain:
        if hop.model not in blocked:
            return hop
    now = time.time()
    horizon = now + catalog.policy.max_wait_s
    if job.deadline is not None:
        horizon = min(horizon, job.deadline.timestamp())
    soon = [
        (b.until, hop) for hop in decision.chain
        if (b := blocked[hop.model]).until is not None and b.until <= horizon
    ]  # fmt: skip
    if not soon:
        reasons = [*decision.dropped, *((m, b.reason) for m, b in blocked.items())]
        raise NoRouteAvailable(job.task_class, reasons)
    return min(soon, key=lambda pair: pair[0])[1]  # the worker waits for that slot
