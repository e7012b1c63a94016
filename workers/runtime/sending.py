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
from collections.abc import Sequence
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


def send(app: Any, message: Outgoing, producer: Any = None) -> Any:
    """Publish one job's message; its AsyncResult."""
    return app.send_task(
        TASK_RUN_JOB,
        kwargs={"job": message.job, "state": message.state},
        task_id=message.job["id"],
        queue=message.queue,
        priority=message.priority,
        argsrepr="()",
        kwargsrepr=describe(message.job, message.model),
        producer=producer,
    )


def send_many(app: Any, messages: Sequence[Outgoing]) -> list[Any]:
    """Publish every message in one batch: on a Redis broker one pipelined round trip
    (kombu's Producer.batch), messages and their task-sent events together. Either all
    are sent or the error is raised (an unflushed batch is discarded)."""
    if not messages:
        return []
    with app.producer_or_acquire() as producer, producer.batch(max_size=4 * len(messages) + 4):
        return [send(app, m, producer) for m in messages]
