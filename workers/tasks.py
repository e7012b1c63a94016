"""The Celery task that runs one delivery of a job. Thin: the logic is in `execute.py`.

Message shape (for enqueuing from any language; JSON, Celery protocol 2):
    task name  "fleet.run_job"
    task id    the job's id (the caller's result handle follows it to the end)
    queue      any of the five; `fleet route --class C --json` tells the right one. A job
               delivered to another queue than its first model's is forwarded there.
    args       []
    kwargs     {"job": {<Job fields: task_class, messages, ...>}}
               ("state" is added by the fleet as the job travels; do not send it)
The result is the Result as JSON, or a failure whose exception is router.errors.JobFailed
carrying [message, result].
"""

from __future__ import annotations

import os
import threading
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Ignore
from celery.signals import worker_init, worker_shutdown

from router.catalog import Catalog, load_catalog
from router.errors import JobFailed
from workers import deadletter, deliveries
from workers.celery_app import TASK_RUN_JOB
from workers.config import fleet_urls
from workers.execute import Done, Failed, Forward, Gate, Step, advance, poisoned
from workers.ledger import Ledger, rows_for
from workers.providers.registry import ProviderRegistry
from workers.state import FailOpen, FleetState

_lock = threading.Lock()
_process: dict[str, Any] = {}


def _catalog() -> Catalog:
    with _lock:
        if "catalog" not in _process:
            _process["catalog"] = load_catalog()
        return _process["catalog"]


@worker_init.connect
def _remember_concurrency(sender: Any = None, **_: Any) -> None:
    # The -c the worker was started with: the HTTP connection pool is sized to it.
    _process["concurrency"] = getattr(sender, "concurrency", None)


def _registry() -> ProviderRegistry:
    catalog = _catalog()
    with _lock:
        if "registry" not in _process:
            concurrency = int(
                os.environ.get("FLEET_WORKER_CONCURRENCY") or _process.get("concurrency") or 10
            )
            _process["registry"] = ProviderRegistry(catalog, concurrency)
        return _process["registry"]


def _redis() -> Any:
    """This process's client of the state Redis (thread-safe, pooled)."""
    with _lock:
        if "redis" not in _process:
            import redis

            _process["redis"] = redis.Redis.from_url(
                fleet_urls()[1],
                socket_timeout=5,
                socket_connect_timeout=5,
                health_check_interval=30,
            )
        return _process["redis"]


def _gate() -> Gate:
    """The fleet's live state (limits, cooldowns, budgets) on the state Redis."""
    catalog, client = _catalog(), _redis()
    with _lock:
        if "gate" not in _process:
            _process["gate"] = FailOpen(FleetState(client, catalog))
        return _process["gate"]


def _ledger() -> Ledger:
    with _lock:
        if "ledger" not in _process:
            _process["ledger"] = Ledger()  # FLEET_LEDGER_URL, or ledger.db in the data dir
        return _process["ledger"]


@worker_shutdown.connect
def _close_adapters(**_: Any) -> None:
    registry = _process.pop("registry", None)
    if registry is not None:
        registry.close()


def describe(job: dict[str, Any], hop: str | None = None) -> str:
    """What Flower and the logs show of a job: never its prompt, never a key."""
    where = f" next={hop}" if hop else ""
    return (
        f"{{'job': {job.get('id')!r}, 'class': {job.get('task_class')!r},"
        f" 'source': {job.get('source', 'app')!r}{where}}}"
    )


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


@shared_task(bind=True, name=TASK_RUN_JOB, max_retries=None, throws=(JobFailed,))
def run_job(self: Task, job: dict[str, Any], state: dict[str, Any] | None = None) -> Any:
    job = {**job, "id": job.get("id") or self.request.id}
    redis = _redis()
    delivery = deliveries.begin(
        redis, job["id"], (state or {}).get("sends", 0), self.backend.get_key_for_task(job["id"])
    )
    if delivery.finished:
        raise Ignore()  # a stale copy of a finished job: its caller has its answer
    if delivery.poisoned:
        step: Step = poisoned(job, state, delivery.count)
    else:
        step = advance(
            _catalog(),
            job,
            state,
            here=(self.request.delivery_info or {}).get("routing_key"),
            providers=_registry(),
            gate=_gate(),
            worker=self.request.hostname,
        )
    if isinstance(step, Done | Failed):  # every attempt, once (record() never raises)
        _ledger().record(rows_for(step.result, job, _catalog()))
    if isinstance(step, Failed):
        deadletter.bury(redis, job, step.result.summary())
    if isinstance(step, Done):
        return Reply(step.result.summary())
    if isinstance(step, Forward):
        raise self.retry(
            kwargs={"job": job, "state": step.state},
            queue=step.queue,
            countdown=step.countdown_s,  # 0: at once (None would mean Celery's 180 s)
            max_retries=None,
            argsrepr="()",
            kwargsrepr=describe(job, step.queue),
        )
    assert isinstance(step, Failed)
    raise JobFailed(step.result.error or "job failed", step.result.summary())
