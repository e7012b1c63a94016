"""One delivery of a job: try the next model of its chain and say what happens next.

Plain functions, no Celery: the task in `workers/tasks.py` feeds a delivery in and turns
the returned step into a Celery action (return, retry on another queue, or fail).

The job's route is computed once (at dispatch, or on first delivery for jobs enqueued by
name from elsewhere) and travels in `state`; rules 1-4 were applied to it then, so
escalation can never leave the allowed tiers. Each delivery makes at most one provider
call, so a delivery never outlives one attempt's timeout (and Redis' visibility timeout).

Order of tries: the chain, first to last, once each; then, once more, the models whose
failure was transient, each after its Retry-After (rate limit) or a short backoff. A model
whose key is unset is skipped without a call; an unusable model (bad key, unknown model)
is not tried again; a bad request ends the job at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.catalog import Catalog
from router.errors import InvalidJob, NoRouteAvailable
from router.jobs import Job, parse_job
from router.policy import Route, route_job
from router.results import Attempt, Result
from workers.providers.base import CompletionRequest, Provider, ProviderError

TRIES_PER_MODEL = 2
RETRY_BACKOFF_S = 1.0  # before a second try of a model that gave no Retry-After


@dataclass(frozen=True)
class Done:
    result: Result


@dataclass(frozen=True)
class Failed:
    result: Result


@dataclass(frozen=True)
class Forward:
    """Send the job (with its updated state) to `queue`, after `countdown_s`."""

    queue: str
    countdown_s: float
    state: dict[str, Any]


Step = Done | Failed | Forward


@dataclass(frozen=True)
class Target:
    """A model as a worker calls it: its adapter, the provider's name for it, the timeout."""

    provider: Provider
    upstream: str
    timeout_s: float


# model id -> Target; raises ProviderError when the model cannot be called from here
# (its key is unset, say).
ProviderLookup = Callable[[str], Target]


def state_for(decision: Route, now: float | None = None) -> dict[str, Any]:
    """The travelling state of a freshly routed job."""
    return {
        "chain": [hop.as_dict() for hop in decision.chain],
        "temperature": decision.temperature,
        "max_tokens": decision.max_tokens,
        "attempts": [],
        "dispatched_at": time.time() if now is None else now,
    }


def advance(
    catalog: Catalog,
    job_data: dict[str, Any],
    state: dict[str, Any] | None,
    *,
    here: str | None,
    providers: ProviderLookup,
    worker: str | None = None,
    now: Callable[[], float] = time.time,
) -> Step:
    """Run this delivery of a job: at most one provider call."""
    try:
        job = parse_job(job_data)
        state = state or state_for(route_job(catalog, job), now())
    except (InvalidJob, NoRouteAvailable) as exc:
        return Failed(_result(job_data, {}, [], now(), error=str(exc)))
    attempts = [Attempt.model_validate(a) for a in state["attempts"]]

    def end(**fields: Any) -> Result:
        return _result(job_data, state or {}, attempts, now(), **fields)

    called = False
    while True:
        if job.deadline is not None and now() > job.deadline.timestamp():
            return Failed(end(error="deadline passed"))
        pick = _next_hop(state["chain"], attempts, now())
        if pick is None:
            return Failed(end(error=_exhausted(attempts)))
        hop, countdown = pick
        # One provider call per delivery: a further try travels as a new message.
        if called or hop["queue"] != here or countdown > 0:
            return Forward(hop["queue"], countdown, {**state, "attempts": _dump(attempts)})
        attempt, text = _try(job, state, hop, len(attempts) + 1, providers, worker, now)
        attempts.append(attempt)
        if attempt.outcome == "ok":
            return Done(end(text=text, model=hop["model"]))
        if attempt.action == "fail":
            return Failed(end(error=f"{hop['model']}: {attempt.error}"))
        called = attempt.outcome == "error"  # a skip (no key) made no call: go on here


def _try(
    job: Job,
    state: dict[str, Any],
    hop: dict[str, str],
    number: int,
    providers: ProviderLookup,
    worker: str | None,
    now: Callable[[], float],
) -> tuple[Attempt, str | None]:
    base = {"number": number, "worker": worker, **hop}
    started = now()
    try:
        target = providers(hop["model"])
    except ProviderError as exc:
        skipped = Attempt(outcome="skipped", started_at=started, **_error_fields(exc), **base)
        return skipped, None
    request = CompletionRequest(
        model=target.upstream,
        messages=job.model_dump(mode="json")["messages"],
        temperature=state.get("temperature"),
        max_tokens=state.get("max_tokens"),
        timeout_s=target.timeout_s,
    )
    clock = time.perf_counter()
    try:
        completion = target.provider.complete(request)
    except ProviderError as exc:
        latency = (time.perf_counter() - clock) * 1000
        failed = Attempt(
            outcome="error", latency_ms=latency, started_at=started, **_error_fields(exc), **base
        )
        return failed, None
    latency = (time.perf_counter() - clock) * 1000
    ok = Attempt(
        outcome="ok",
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        tokens_estimated=completion.tokens_estimated,
        provider_cost_usd=completion.provider_cost_usd,
        latency_ms=latency,
        started_at=started,
        **base,
    )
    return ok, completion.text


def _error_fields(exc: ProviderError) -> dict[str, Any]:
    return {
        "error_kind": exc.kind,
        "error": exc.message[:300],
        "action": exc.action,
        "retry_after_s": exc.retry_after_s,
    }


def _next_hop(
    chain: list[dict[str, str]], attempts: list[Attempt], now: float
) -> tuple[dict[str, str], float] | None:
    """The next model to try and how long to wait for it, or None when the chain is spent."""
    tried: dict[str, list[Attempt]] = {}
    for attempt in attempts:
        tried.setdefault(attempt.model, []).append(attempt)
    for hop in chain:  # first pass: every model once
        if hop["model"] not in tried:
            return hop, 0.0
    for hop in chain:  # second pass: transient failures, after their Retry-After
        history = tried[hop["model"]]
        last = history[-1]
        if last.action == "retry" and len(history) < TRIES_PER_MODEL:
            wait = last.retry_after_s if last.retry_after_s is not None else RETRY_BACKOFF_S
            ready_at = last.started_at + last.latency_ms / 1000 + wait
            return hop, max(0.0, ready_at - now)
    return None


def _exhausted(attempts: list[Attempt]) -> str:
    reasons = "; ".join(f"{a.model}: {a.error_kind} ({a.error})" for a in attempts)
    return f"every model failed: {reasons}" if attempts else "no model left to try"


def _dump(attempts: list[Attempt]) -> list[dict[str, Any]]:
    return [a.model_dump(mode="json") for a in attempts]


def _result(
    job_data: dict[str, Any],
    state: dict[str, Any],
    attempts: list[Attempt],
    finished_at: float,
    *,
    text: str | None = None,
    model: str | None = None,
    error: str | None = None,
) -> Result:
    return Result(
        job_id=str(job_data.get("id", "")),
        task_class=str(job_data.get("task_class", "")),
        source=str(job_data.get("source", "app")),
        ok=error is None,
        text=text,
        model=model,
        error=error,
        attempts=attempts,
        dispatched_at=state.get("dispatched_at"),
        finished_at=finished_at,
    )
