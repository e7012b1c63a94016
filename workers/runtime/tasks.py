"""The Celery task that runs one delivery of a job. Thin: the logic is in `step.py`, the
message's shape in `sending.py`.

A delivery: count it (a stale or superseded copy runs nothing; a poisoned one fails),
bill the calls earlier deliveries of its message left in flight when their workers died
(`orphans.py`), take one step down the chain (at most one provider call, marked in flight
as it leaves: workers/state/inflight.py), and turn the step into a Celery action: return
the Result, forward the job to its next queue, or fail. A finished job's ledger rows and
dead letter are attached to its final state, which the result store writes in one atomic
script: nothing on the task's path writes a database. A streaming job's delivery streams
its call when no earlier delivery's text went out (workers/state/streams.py), and its
final state ends its stream.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

from celery import Task, shared_task
from celery.exceptions import Ignore, Reject
from celery.signals import worker_init, worker_ready, worker_shutdown
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.catalog import Catalog, load_catalog
from router.errors import JobFailed
from router.jobs import Reservation
from router.results import Result
from router.travel import TravellingState
from workers.config import fleet_urls
from workers.ledger.rows import encode_rows, rows_for
from workers.providers.base import Caller, calling_for
from workers.providers.registry import ProviderRegistry
from workers.runtime import liveness, orphans
from workers.runtime.resultstore import Bookkeeping, FleetRedisBackend, attach
from workers.runtime.sending import TASK_RUN_JOB, Outgoing, send
from workers.runtime.serving import Announcer
from workers.runtime.step import (
    REVOKED,
    Done,
    Failed,
    Forward,
    Gate,
    Step,
    advance,
    first_call,
    poisoned,
    revoked,
)
from workers.state import apps, beathealth, deadletter, deliveries, keys, streams
from workers.state.connections import new_client, preload, redis_client
from workers.state.deadletter import NOT_FILED
from workers.state.inflight import Superseded, Unmarked
from workers.state.limits import FailOpen, FleetState
from workers.state.vector_cache import VectorCache

log = logging.getLogger(__name__)
_lock = threading.Lock()


@dataclass
class _Process:
    """What this process builds once and shares between its deliveries."""

    catalog: Catalog | None = None
    registry: ProviderRegistry | None = None
    announcer: Announcer | None = None  # what this worker serves, said once a beat
    state: FleetState | None = None
    gate: Gate | None = None
    concurrency: int | None = None  # the -c the worker was started with


_process = _Process()
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _on(signal: Any) -> Callable[[_Fn], _Fn]:
    """`@signal.connect` with its type kept (Celery has no type hints)."""

    def connect(fn: _Fn) -> _Fn:
        signal.connect(fn)
        return fn

    return connect


def _task(**options: Any) -> Callable[[Callable[..., Any]], Task]:
    """`@shared_task(**options)`, typed (Celery has no type hints)."""
    return cast(Callable[[Callable[..., Any]], Task], shared_task(**options))


def _catalog() -> Catalog:
    with _lock:
        if _process.catalog is None:
            _process.catalog = load_catalog()
        return _process.catalog


@_on(worker_init)
def _remember_concurrency(sender: Any = None, **_: Any) -> None:
    # The -c the worker was started with: the HTTP connection pool is sized to it.
    _process.concurrency = getattr(sender, "concurrency", None)


@_on(worker_ready)
def _warm_up(sender: Any = None, **_: Any) -> None:
    """Build what the first delivery would build (catalog, provider clients, live state,
    the Lua scripts in Redis' cache) before the first message: done lazily, a fresh
    worker's first job took about 0.5 s instead of 15 ms, and a worker killed again in
    that time (a crash loop, a chaos run) took its first jobs down with it each time,
    until they were poisoned. A prefork pool's children build their own on first use."""
    pool = type(getattr(getattr(sender, "controller", None), "pool", None)).__module__
    if "prefork" in pool:
        return
    try:
        _registry()
        _gate()
        preload(redis_client(), ["begin", "admit", "mark", "store_result", "broker_delivered"])
    except Exception as exc:  # Redis away: the first delivery will do it
        log.info("warm-up skipped: %r", exc)


@_on(worker_ready)
def _announce(sender: Any = None, **_: Any) -> None:
    """Say, once a beat, what of its queues' models this worker cannot serve from here
    (workers/runtime/serving.py), from the process that consumes them."""
    app = getattr(sender, "app", None)
    if app is None:
        return
    queues = list(app.amqp.queues.consume_from or {})
    lapse = (app.conf.broker_transport_options or {}).get("lapse_s", liveness.DEFAULT_LAPSE_S)
    # a client of its own: the announcer's thread never waits for a delivery's connection
    announcer = Announcer(_catalog(), queues, new_client(fleet_urls()[1]), lapse)
    with _lock:
        if _process.announcer is not None:
            return
        _process.announcer = announcer
    announcer.start()


def _active_tags() -> set[str]:
    """The delivery tags of the jobs this worker runs now (Celery's own record, in the
    process that holds the messages, a prefork pool's parent too)."""
    from celery.worker.state import active_requests

    return {str(r.message.delivery_tag) for r in list(active_requests)}


liveness.active_tags = _active_tags


@_on(worker_shutdown)
def _stop(**_: Any) -> None:
    with _lock:
        registry, _process.registry = _process.registry, None
        announcer, _process.announcer = _process.announcer, None
    if announcer is not None:
        announcer.stop()
        announcer.client.close()
    if registry is not None:
        registry.close()


def _registry() -> ProviderRegistry:
    catalog = _catalog()
    with _lock:
        if _process.registry is None:
            concurrency = int(
                os.environ.get("FLEET_WORKER_CONCURRENCY") or _process.concurrency or 10
            )
            _process.registry = ProviderRegistry(catalog, concurrency)
        return _process.registry


def _state() -> FleetState:
    """The fleet's live state (limits, cooldowns, budgets) on the state Redis."""
    catalog = _catalog()
    with _lock:
        if _process.state is None:
            _process.state = FleetState(redis_client(), catalog)
        return _process.state


def _gate() -> Gate:
    """The live state as a delivery uses it: open when the state Redis is unreachable."""
    state = _state()
    with _lock:
        if _process.gate is None:
            _process.gate = FailOpen(state)
        return _process.gate


def _vector_cache() -> VectorCache | None:
    """The fleet's embedding cache on the state Redis (None when the catalog turns it off)."""
    config = _catalog().policy.embedding_cache
    if not config.enabled:
        return None
    return VectorCache(_state().redis, config.ttl_s, config.max_entries)


class Reply:
    """run_job's return value. The result backend stores the whole Result (kombu's JSON
    encoder calls `__json__`), but Celery's task-succeeded event (what Flower shows) and
    the worker's log line carry repr(return value): only the outcome, never the answer
    text, which can quote the prompt."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary

    def __json__(self) -> dict[str, Any]:
        return self.summary

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"{{'job': {s.get('job_id')!r}, 'ok': {s.get('ok')!r}, 'model': {s.get('model')!r},"
            f" 'queue_path': {s.get('queue_path')!r}, 'total_tokens': {s.get('total_tokens')!r}}}"
        )


def _bookkeeping(
    job: dict[str, Any], result: Result, summary: dict[str, Any], delivery: tuple[str, int] | None
) -> Bookkeeping:
    """A finished job's ledger rows, its dead letter if it failed, the settlement of what
    its app's budget set aside for it, and how a job beat fired ended, to go with its
    final state."""
    rows = rows_for(result, job, _catalog())
    settle_keys: tuple[str, ...] = ()
    settle_usd = None
    reserved = job.get("reservation")
    if job.get("app") and reserved:
        reservation = Reservation.model_validate(reserved)
        settle_keys = tuple(apps.settle_keys(job["app"], job["id"], reservation))
        settle_usd = sum(row["cost_usd"] for row in rows) - reservation.usd
    failed = not (result.ok or result.error == REVOKED)
    return Bookkeeping(
        rows=encode_rows(rows),
        dead_letter=deadletter.entry(job, summary) if failed else "",
        settle_keys=settle_keys,
        settle_usd=settle_usd,
        filing=deadletter.filing(job, _catalog().policy.dead_letters) if failed else NOT_FILED,
        beat=beathealth.run_of(job, result) if result.ok or failed else None,
        delivery=delivery,
        stream=bool(job.get("stream")),
    )


def _max_hold_s(app: Any) -> float:
    """The longest countdown a forward may carry. A job waiting for its countdown sits
    unacked in a worker, and once the visibility timeout passes Redis hands it to
    another worker too: both would run it. A longer wait (a Retry-After, a model's
    cooldown) is made of several shorter hops: each delivery looks again and forwards
    the job again (the ETA's wait plus one attempt stays within the timeout)."""
    options = app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", 3600)) / 2


def _forward(app: Any, job: dict[str, Any], step: Forward) -> None:
    """Send the job's next message (same task id) to the queue of its next model.

    Not Celery's `retry()`: that also writes a RETRY state and sends a task-retried
    event after the next message is out, and when the next delivery finishes first (an
    escalation takes a few ms) the late event makes Flower show the finished job as
    RETRY for good. Here the next message is the only trace of the hop; the job's state
    stays STARTED until a delivery ends it."""
    message = Outgoing(
        job=job,
        state=step.state,
        queue=step.queue,
        model=step.queue,
        priority=job.get("priority"),
        countdown_s=min(step.countdown_s, _max_hold_s(app)),  # 0: at once
    )
    try:
        send(app, message)
    except Exception as exc:  # the broker is away: keep this message rather than drop it
        log.warning("job %s: forward to %s not sent (%r); requeued", job["id"], step.queue, exc)
        raise Reject(f"forward not sent: {type(exc).__name__}", requeue=True) from None


def _end_revoked(
    task: Task, job: dict[str, Any], result: Result, delivery: tuple[str, int]
) -> NoReturn:
    """Store REVOKED as the job's final state, with its bookkeeping (the attempts it made,
    and the settlement of its reservation), and end this delivery."""
    attach(job["id"], _bookkeeping(job, result, result.summary(), delivery))
    backend = task.backend
    assert isinstance(backend, FleetRedisBackend)
    backend.store_revoked(result)
    raise Ignore()


def _step(
    task: Task,
    job: dict[str, Any],
    travel: TravellingState | None,
    here: str | None,
    first: str | None,
    delivery: deliveries.Delivery,
) -> Step:
    """The delivery's step down the chain (none for a poisoned message: it fails)."""
    sends = travel.sends if travel is not None else 0
    if delivery.poisoned:
        return poisoned(job, travel, delivery.count)
    sink = _sink(job, first_message=sends == 0 and delivery.count == 1)
    # Its provider call says which job and delivery it is for, and which process makes it
    # (X-Fleet-Job).
    caller = Caller(job["id"], sends, delivery.count, deliveries.this_process())
    try:
        with calling_for(caller):
            return advance(
                _catalog(),
                job,
                travel,
                here=here,
                providers=_registry(),
                gate=_gate(),
                worker=task.request.hostname,
                admitted={first: delivery.admitted} if first and delivery.admitted else None,
                sink=sink,
                cache=_vector_cache() if "input" in job else None,
            )
    except Superseded:
        _superseded(job, sends, "before its call left")
    except Unmarked as exc:
        # Redis went away between the delivery's first round trip and its call: hand the
        # message back, as that round trip does (its slot stays taken, for its window).
        log.warning("job %s: call not marked in flight (%s); requeued", job["id"], exc)
        raise Reject(f"state store unreachable: {exc}", requeue=True) from None


def _sink(job: dict[str, Any], first_message: bool) -> streams.StreamWriter | None:
    """Where this delivery's call streams, for a streaming job whose stream holds no text
    yet (None: the call is made whole; a Redis that cannot be reached makes it whole too,
    and the job's final state still ends its stream)."""
    if not job.get("stream"):
        return None
    try:
        if streams.claim(redis_client(), job["id"], fresh=first_message):
            return streams.StreamWriter(redis_client(), job["id"])
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("job %s: not streamed (%r)", job["id"], exc)
    return None


def _still_current(job_id: str, sends: int, count: int) -> bool:
    """Whether this delivery is still its message's latest (a Redis that cannot be reached
    cannot say otherwise: the forward's own send then meets it and hands the message back)."""
    try:
        return deliveries.current(redis_client(), job_id, sends, count)
    except (RedisConnectionError, RedisTimeoutError):
        return True


def _superseded(job: dict[str, Any], sends: int, when: str) -> NoReturn:
    """This delivery's worker lost the message (its beat lapsed while it lived, cut off
    from Redis or stalled: workers/runtime/liveness.py) and a later delivery has the job:
    end this one with nothing stored, sent or billed (the later delivery bills a call this
    one marked in flight as orphaned)."""
    log.warning(
        "job %s: message %d was delivered to another worker while this one held it;"
        " this delivery stops %s",
        job["id"],
        sends,
        when,
    )
    raise Ignore()


@_task(bind=True, name=TASK_RUN_JOB, throws=(JobFailed,))
def run_job(self: Task, job: dict[str, Any], state: dict[str, Any] | None = None) -> Any:
    job = {**job, "id": job.get("id") or self.request.id}
    # The message's state, parsed once here (none: the job is routed on arrival).
    travel = TravellingState.model_validate(state) if state else None
    sends = travel.sends if travel is not None else 0
    here = (self.request.delivery_info or {}).get("routing_key")
    # The delivery's first round trip counts it and, when it will call a model here and
    # now, takes that model's slot too.
    first = first_call(job, travel, here=here, providers=_registry(), now=time.time())
    admit = None
    if first is not None:
        tokens = travel.prompt_tokens if travel is not None else 0
        admit = _state().admit_call(str(job.get("task_class")), first, tokens)
    try:
        delivery = deliveries.begin(redis_client(), job["id"], sends, admit)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        # Redis went away (or is still loading its data after a restart) at the delivery's
        # first round trip: nothing ran. Storing a FAILURE here would end the job with no
        # Result and no dead letter; handing the message back keeps it (and a requeue that
        # cannot reach Redis is made by this process's beat once Redis answers).
        log.warning("job %s: state store unreachable at delivery (%r); requeued", job["id"], exc)
        raise Reject(f"state store unreachable: {type(exc).__name__}", requeue=True) from None
    # Calls earlier deliveries of this message left in flight (their workers died) may have
    # been billed: the ledger gets them as orphaned, whatever this delivery does.
    if delivery.orphans:
        orphans.bill(redis_client(), _gate(), _catalog(), job, travel, delivery.orphans)
    # A stale copy of a finished job (its caller has the answer, and the ledger its rows,
    # which went with the final state), or a copy of a message already forwarded.
    if delivery.finished or delivery.superseded:
        raise Ignore()
    this = (keys.deliveries(job["id"], sends), delivery.count)
    if delivery.revoked:  # its app revoked it: end it here, with what it spent so far
        _end_revoked(self, job, revoked(job, travel), this)
    step = _step(self, job, travel, here, first, delivery)
    if isinstance(step, Failed) and step.result.error == REVOKED:  # stopped mid-stream
        _end_revoked(self, job, step.result, this)
    if isinstance(step, Done):
        summary = step.result.summary()
        attach(job["id"], _bookkeeping(job, step.result, summary, this))
        return Reply(summary)
    if isinstance(step, Forward):
        if not _still_current(job["id"], sends, delivery.count):
            _superseded(job, sends, "before its forward")
        _forward(self.app, job, step)
        raise Ignore()  # this message is done with: acked, no state written, no event
    assert isinstance(step, Failed)
    summary = step.result.summary()
    attach(job["id"], _bookkeeping(job, step.result, summary, this))
    raise JobFailed(step.result.error or "job failed", summary)
