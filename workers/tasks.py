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

import logging
import os
import threading
import time
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Task, shared_task
from celery.exceptions import Ignore, Reject
from celery.signals import worker_init, worker_shutdown
from celery.worker.request import Request

from router.catalog import Catalog, load_catalog
from router.errors import JobFailed
from router.results import Result
from workers import deadletter, deliveries
from workers.celery_app import TASK_RUN_JOB
from workers.config import fleet_urls
from workers.execute import Done, Failed, Forward, Gate, Step, advance, poisoned
from workers.ledger import Ledger, rows_for
from workers.providers.registry import ProviderRegistry
from workers.state import FailOpen, FleetState

log = logging.getLogger(__name__)
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


def settle(
    job: dict[str, Any],
    summary: dict[str, Any],
    failed: bool,
    only_new: bool = False,
    *,
    ledger: Ledger | None = None,
    client: Any = None,
) -> None:
    """Write a finished job's attempts to the ledger (record() never raises) and, if it
    failed, file it as a dead letter (`only_new`: unless it is filed already)."""
    (ledger or _ledger()).record(rows_for(Result.model_validate(summary), job, _catalog()))
    if not failed:
        return
    for wait in (0.2, 0.5, 1.0, 2.0, 0.0):  # the state was stored a moment ago: a blip
        try:
            deadletter.bury(client or _redis(), job, summary, only_new=only_new)
            return
        except Exception as exc:
            if not wait:
                log.error("dead letter %s not filed: %s", job.get("id"), type(exc).__name__)
            time.sleep(wait)


class JobTask(Task):
    """run_job's task class. The ledger and the dead-letter store are written once the
    job's final state is stored: Celery calls on_success / on_failure after the result
    backend write and before the message is acked. Written before it (in the task), a
    worker killed in between would leave rows of a run whose answer was never stored:
    the job, delivered and run again, would be billed by the first run's rows while its
    caller got the second run's Result. Written after it, a worker killed in between
    leaves a stored result and an unacked message: the redelivery finds the job finished
    and writes what is missing (ledger rows are insert-or-ignore). So the rows and the
    dead letter land a moment after the caller has its answer."""

    Request = "workers.tasks:JobRequest"

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        if isinstance(retval, Reply):
            settle(_job_of(kwargs, task_id), retval.summary, failed=False)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        if isinstance(exc, JobFailed) and exc.result:
            settle(_job_of(kwargs, task_id), exc.result, failed=True)


class JobRequest(Request):
    """run_job's request, in the worker's main process. When a pool process dies after
    storing a job's SUCCESS, Celery acks the message (running the job again would answer
    it twice), so no redelivery comes to write what that process had not written yet:
    its ledger rows (JobTask.on_success). They are written here, from the stored result.
    (A process dying after storing a FAILURE is requeued: its redelivery does that.)"""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, **kwargs: Any) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # (unwrapped)
        if isinstance(exc, WorkerLostError):
            self._write_what_was_lost()
        return super().on_failure(exc_info, send_failed_event=send_failed_event, **kwargs)

    def _write_what_was_lost(self) -> None:
        import redis

        # Clients of its own: pool processes forked later must not inherit cached ones.
        client = redis.Redis.from_url(fleet_urls()[1], socket_timeout=5)
        ledger = Ledger()
        try:
            stored = deliveries.stored_result(
                client.get(self.task.backend.get_key_for_task(self.id)) or b""
            )
            if stored is not None:
                job = _job_of(self.kwargs, self.id)
                settle(job, *stored, only_new=True, ledger=ledger, client=client)
        except Exception:
            log.exception("job %s: could not write what its lost process had not", self.id)
        finally:
            ledger.close()
            client.close()


def _max_hold_s(app: Any) -> float:
    """The longest countdown a forward may carry. A job waiting for its countdown sits
    unacked in a worker, and once the visibility timeout passes Redis hands it to
    another worker too: both would run it. A longer wait (a Retry-After, a model's
    cooldown) is made of several shorter hops: each delivery looks again and forwards
    the job again (the ETA's wait plus one attempt stays within the timeout)."""
    options = app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", 3600)) / 2


def _job_of(kwargs: Any, task_id: str) -> dict[str, Any]:
    job = dict((kwargs or {}).get("job") or {})
    return {**job, "id": job.get("id") or task_id}


@shared_task(bind=True, base=JobTask, name=TASK_RUN_JOB, max_retries=None, throws=(JobFailed,))
def run_job(self: Task, job: dict[str, Any], state: dict[str, Any] | None = None) -> Any:
    job = {**job, "id": job.get("id") or self.request.id}
    redis = _redis()
    delivery = deliveries.begin(
        redis, job["id"], (state or {}).get("sends", 0), self.backend.get_key_for_task(job["id"])
    )
    if delivery.finished:  # a stale copy of a finished job: its caller has its answer
        stored = deliveries.stored_result(delivery.meta or b"")
        if stored is not None:  # write what its worker had not when it died
            settle(job, *stored, only_new=True)
        raise Ignore()
    if delivery.superseded:  # a copy of a message already forwarded: the job went on
        raise Ignore()
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
    if isinstance(step, Done):  # ledger: JobTask.on_success, once the result is stored
        return Reply(step.result.summary())
    if isinstance(step, Forward):
        try:
            raise self.retry(
                kwargs={"job": job, "state": step.state},
                queue=step.queue,
                countdown=min(step.countdown_s, _max_hold_s(self.app)),  # 0: at once
                max_retries=None,
                argsrepr="()",
                kwargsrepr=describe(job, step.queue),
            )
        except Reject as exc:  # the forward could not be sent (the broker is away):
            raise Reject(exc.reason, requeue=True) from None  # keep this message, not drop it
    assert isinstance(step, Failed)  # ledger, dead letter: JobTask.on_failure
    raise JobFailed(step.result.error or "job failed", step.result.summary())
