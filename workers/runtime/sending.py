"""The client side of the runtime: the `fleet.run_job` message a job travels in, and
sending it. Imported by dispatchers (apps, the gateway, beat) and by the worker alike;
it loads Celery's client side only (no worker, no pool, no ledger, no provider).

Message shape (for enqueuing from any language: docs/enqueue-from-any-language.md):
    task name  "fleet.run_job"
    task id    the job's id (the caller's result handle follows it to the end)
    queue      any of the five; a job delivered to another queue than its first model's
               is forwarded there
    args       []
    kwargs     {"job": {<Job fields>}, "state": {<travelling state>}}
               (`state` is added by the fleet; a job sent without it is routed on arrival)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from router.policy import Route

TASK_RUN_JOB = "fleet.run_job"


def describe(job: dict[str, Any], hop: str | None = None) -> str:
    """What Flower and the logs show of a job: never its prompt, never a key."""
    where = f" next={hop}" if hop else ""
    return (
        f"{{'job': {job.get('id')!r}, 'class': {job.get('task_class')!r},"
        f" 'source': {job.get('source', 'app')!r}{where}}}"
    )


def travelling_state(decision: Route, now: float | None = None) -> dict[str, Any]:
    """The state a freshly routed job travels with: its chain (rules 1-4 applied once),
    sampling parameters, attempts so far, and when it was dispatched."""
    return {
        "chain": [hop.as_dict() for hop in decision.chain],
        "temperature": decision.temperature,
        "max_tokens": decision.max_tokens,
        "attempts": [],
        "prompt_tokens": decision.prompt_tokens,
        "dispatched_at": time.time() if now is None else now,
    }


@dataclass(frozen=True)
class Outgoing:
    """One job's message, ready to send to `queue`."""

    job: dict[str, Any]  # the Job as JSON
    state: dict[str, Any]
    queue: str  # the first usable model's
    model: str
    priority: int | None = None


def send(app: Any, message: Outgoing) -> Any:
    """Publish one job's message (its task-sent event too, for Flower); its AsyncResult."""
    return send_many(app, [message])[0]


def send_many(app: Any, messages: Sequence[Outgoing]) -> list[Any]:
    """Publish every message; their AsyncResults, in order. On a Redis broker a batch of
    several is one pipelined round trip (kombu's Producer.batch), messages and task-sent
    events together: all are sent, or the error is raised and the unflushed rest dropped.

    Celery's `send_task` is skipped for its message builder and publisher
    (`app.amqp.create_task_message`, `send_task_message`): it would also look the task
    up in the registry, route options the fleet has already routed, re-declare the queue
    on every publish, and subscribe to each result's channel as it sends (a round trip
    per job, outside the pipeline). A caller that waits subscribes then instead."""
    from celery.result import AsyncResult

    if not messages:
        return []
    amqp = app.amqp
    sent_event = app.conf.task_send_sent_event
    with app.producer_or_acquire() as producer, producer.connection._reraise_as_library_errors():
        batched = len(messages) > 1
        # Buffered messages meet the broker when the batch is flushed, at its end: a
        # retry per publish would retry nothing.
        with producer.batch(max_size=4 * len(messages) + 4) if batched else _nothing():
            for m in messages:
                task = amqp.create_task_message(
                    m.job["id"],
                    TASK_RUN_JOB,
                    (),
                    {"job": m.job, "state": m.state},
                    argsrepr="()",
                    kwargsrepr=describe(m.job, m.model),
                    create_sent_event=sent_event,
                )
                amqp.send_task_message(
                    producer,
                    TASK_RUN_JOB,
                    task,
                    queue=m.queue,
                    priority=m.priority,
                    declare=[],  # workers declare their queues; a Redis list needs none
                    retry=False if batched else None,  # None: the app's publish retries
                )
    return [AsyncResult(m.job["id"], app=app) for m in messages]


@contextmanager
def _nothing() -> Iterator[None]:
    yield
