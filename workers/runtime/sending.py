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

import base64
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router.travel import TravellingState
from router.travel import travelling_state as travelling_state  # what senders start with

TASK_RUN_JOB = "fleet.run_job"
EVENTS_EXCHANGE = "celeryev"  # Celery's event exchange (Flower listens there)


def describe(job: dict[str, Any], hop: str | None = None) -> str:
    """What Flower and the logs show of a job: never its prompt, never a key."""
    where = f", 'next': {hop!r}" if hop else ""
    return (
        f"{{'job': {job.get('id')!r}, 'class': {job.get('task_class')!r},"
        f" 'source': {job.get('source', 'app')!r}{where}}}"
    )


@dataclass(frozen=True)
class Outgoing:
    """One job's message, ready to send to `queue`."""

    job: dict[str, Any]  # the Job as JSON
    state: TravellingState
    queue: str  # the first usable model's
    model: str  # what Flower and the logs name as where the job goes next
    priority: int | None = None
    countdown_s: float = 0.0  # deliver no earlier than this from now


def send(app: Any, message: Outgoing) -> Any:
    """Publish one job's message (its task-sent event too, for Flower); its AsyncResult."""
    return send_many(app, [message])[0]


def send_many(app: Any, messages: Sequence[Outgoing]) -> list[Any]:
    """Publish every message (each with its task-sent event, for Flower); their
    AsyncResults, in order. On a Redis broker the messages and events are one
    transaction (MULTI/EXEC) in one round trip: all are sent or none, and a broker that
    is away is retried as the app's publish retry policy says. On RabbitMQ each message
    goes through kombu's producer.

    Celery's `send_task` is skipped for its message builder and publisher
    (`app.amqp.create_task_message`, `send_task_message`): it would also look the task
    up in the registry, route options the fleet has already routed, re-declare the queue
    on every publish, and subscribe to each result's channel as it sends (a round trip
    per job, outside any pipeline). A caller that waits subscribes then instead."""
    from celery.result import AsyncResult

    if not messages:
        return []
    with app.producer_or_acquire() as producer, producer.connection._reraise_as_library_errors():
        if producer.connection.transport.driver_type == "redis":
            _RedisBatch(app, producer.channel).send(messages)
        else:
            for m in messages:
                app.amqp.send_task_message(
                    producer,
                    TASK_RUN_JOB,
                    _task_message(app, m),
                    queue=m.queue,
                    priority=m.priority,
                    declare=[],  # workers declare their queues
                )
    return [AsyncResult(m.job["id"], app=app) for m in messages]


def _task_message(app: Any, m: Outgoing) -> Any:
    """Celery's protocol-2 message for one job (headers, properties, body, sent event)."""
    return app.amqp.create_task_message(
        m.job["id"],
        TASK_RUN_JOB,
        (),
        {"job": m.job, "state": m.state.wire()},
        argsrepr="()",
        kwargsrepr=describe(m.job, m.model),
        create_sent_event=app.conf.task_send_sent_event,
        countdown=m.countdown_s or None,
    )


class _RedisBatch:
    """Messages and their task-sent events written straight into one Redis pipeline.

    Each envelope has exactly the fields kombu's Redis channel writes for a publish
    (prepare_message, then what basic_publish adds: base64 body, delivery tag, delivery
    info); tests/test_dispatch.py holds a batched message and event to what kombu itself
    writes. What is skipped is kombu's per-publish machinery (producer, retry and declare
    wrappers, a Redis client object per publish), which costs more than the message."""

    def __init__(self, app: Any, channel: Any) -> None:
        from celery.utils.nodenames import anon_nodename

        self.app, self.channel = app, channel
        self.hostname = anon_nodename()
        self.pid = os.getpid()

    def send(self, messages: Sequence[Outgoing]) -> None:
        from redis.exceptions import ConnectionError, TimeoutError

        from workers.runtime.transport import merged_publishes

        writes: list[tuple[str, tuple[Any, ...]]] = []  # (command, its arguments)
        topic = self.channel._get_publish_topic(EVENTS_EXCHANGE, "task.sent")
        # the fleet's transport files each job message as it is published (transport.py)
        put = getattr(self.channel, "put_commands", self._lpush)
        for m in messages:
            headers, properties, body, sent = _task_message(self.app, m)
            properties["delivery_mode"] = 2
            priority = m.priority or 0  # as kombu: no priority is priority 0
            writes += put(m.queue, _envelope(body, headers, properties, priority, "", m.queue))
            if sent:
                writes.append(("publish", (topic, self._event(sent, m.queue))))
        writes = _coalesce(merged_publishes(writes))
        policy = self.app.conf.task_publish_retry_policy or {}
        for wait in [*_backoff(policy), None]:
            try:
                pipe = self.channel.client.pipeline(transaction=True)
                for command, args in writes:
                    getattr(pipe, command)(*args)
                pipe.execute()
                return
            except (ConnectionError, TimeoutError):
                if wait is None:
                    raise
                time.sleep(wait)

    def _lpush(self, queue: str, envelope: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
        """kombu's stock channel: the message's LPUSH, nothing else."""
        key = self.channel._q_for_pri(queue, envelope["properties"]["priority"])
        return [("lpush", (key, json.dumps(envelope)))]

    def _event(self, fields: dict[str, Any], queue: str) -> str:
        from celery.events.event import Event
        from celery.utils.time import utcoffset

        event = Event(
            "task-sent",
            hostname=self.hostname,
            utcoffset=utcoffset(),
            pid=self.pid,
            clock=self.app.clock.forward(),
            **{**fields, "queue": queue, "exchange": "", "routing_key": queue},
        )
        headers = {"hostname": self.hostname}
        envelope = _envelope(event, headers, {"delivery_mode": 1}, 0, EVENTS_EXCHANGE, "task.sent")
        return json.dumps(envelope)


def _coalesce(writes: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, tuple[Any, ...]]]:
    """The same writes in fewer commands: one LPUSH per list (LPUSH k a b is LPUSH k a then
    LPUSH k b: the order on each list is kept); the rest as they come. Inside one MULTI/EXEC
    the order across keys does not matter; each command costs the client a pack and a reply
    to parse, about as much as its payload. (The fleet's transport merges its filed
    publishes per list itself: transport.merged_publishes.)"""
    pushes: dict[Any, list[Any]] = {}
    rest: list[tuple[str, tuple[Any, ...]]] = []
    for command, args in writes:
        if command == "lpush" and len(args) == 2:
            pushes.setdefault(args[0], []).append(args[1])
        else:
            rest.append((command, args))
    return [*(("lpush", (key, *values)) for key, values in pushes.items()), *rest]


def _backoff(policy: dict[str, Any]) -> list[float]:
    """The waits between tries that a kombu retry policy describes."""
    start, step = float(policy.get("interval_start", 0)), float(policy.get("interval_step", 0.2))
    most = float(policy.get("interval_max", 1))
    return [min(start + i * step, most) for i in range(int(policy.get("max_retries", 3)))]


def _envelope(
    body: Any,
    headers: dict[str, Any],
    properties: dict[str, Any],
    priority: int,
    exchange: str,
    routing_key: str,
) -> dict[str, Any]:
    """What kombu's Redis channel writes (as JSON) for one published message."""
    encoded = base64.b64encode(json.dumps(body).encode()).decode()
    properties = {
        **properties,
        "delivery_info": {"exchange": exchange, "routing_key": routing_key},
        "priority": priority,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    envelope = {
        "body": encoded,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    return envelope
