"""The fleet's result backend: Celery's Redis backend, except that a job's final state,
once stored, stays final, and lands together with the job's bookkeeping.

Celery writes a job's state several times: STARTED when a delivery starts, RETRY when a
delivery forwards the job to its next model, SUCCESS or FAILURE at the end. Those writes
come from different workers and can land out of order: the RETRY of the delivery that
forwarded a job is written after the forward is sent, so the next delivery can finish
first and its SUCCESS be overwritten by a late RETRY (a Redis restart makes that
likely), and a stale copy of a failed job, delivered again after its worker
died before acking, writes STARTED over the FAILURE. Either way the final word is lost:
callers wait forever and the stale-copy check no longer sees the job finished. Celery
guards SUCCESS only, with a read before every write (a round trip). Here SUCCESS is never
replaced and a non-final state never replaces FAILURE, checked and written in one Lua
script (store_result.lua), with no read before.

The same script pushes the job's ledger rows onto the spool and files its dead letter,
which the task attaches (`attach`) just before Celery stores the final state, in the same
thread. So a worker killed at any moment leaves all of them or none: the caller never has
an answer whose attempts the ledger will not see, and the task's path writes no database.
The rows record the job's calls, so their in-flight marks (workers/state/inflight.py) are
cleared in the same step.
Filing a dead letter trims its class to its retention (workers/state/deadletter.py); a
job fired by beat updates its entry's health, and is filed only when its cause is new
(workers/state/beathealth.py), which this process then logs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import states
from celery.exceptions import BackendStoreError

from router.errors import JobRevoked
from router.results import Result
from workers.state import beathealth, keys, streams
from workers.state.beathealth import BeatRun
from workers.state.connections import script
from workers.state.deadletter import NOT_FILED, Filing
from workers.state.deliveries import this_process


@dataclass(frozen=True)
class Bookkeeping:
    """What goes with a job's final state: its ledger rows (a spool entry) and, for a
    failed job, its dead letter (JSON) and where it is filed; for a job beat fired, how
    it ended."""

    rows: str = ""
    dead_letter: str = ""
    settle_keys: tuple[str, ...] = ()  # an app's reservation: marker, day and month spend
    settle_usd: float | None = None  # the job's real cost minus what was reserved
    filing: Filing = NOT_FILED  # the dead letter's class and that class's retention
    beat: BeatRun | None = None
    # the delivery storing it: its message's deliveries hash and its number (a later
    # delivery of the message supersedes it: store_result.lua stores nothing then)
    delivery: tuple[str, int] | None = None
    stream: bool = False  # the job streams: its final state ends its stream too


_attached: dict[str, Bookkeeping] = {}
_lock = threading.Lock()


def attach(job_id: str, bookkeeping: Bookkeeping) -> None:
    """Have the next final-state write of `job_id` in this process carry `bookkeeping`."""
    with _lock:
        _attached[job_id] = bookkeeping


def _take(job_id: str) -> Bookkeeping:
    with _lock:
        return _attached.pop(job_id, None) or Bookkeeping()


if TYPE_CHECKING:

    class RedisBackend:
        """Celery's Redis result backend as the type checker sees it: Celery has no type
        hints, so its attributes are Any (and the subclass below is checked)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        def __getattr__(self, name: str) -> Any: ...

else:
    from celery.backends.redis import RedisBackend


class FleetRedisBackend(RedisBackend):
    def _store_result(
        self,
        task_id: Any,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Celery's, without its read of the current state before the write: the script
        makes that check itself, atomically."""
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = _text(task_id)
        try:
            self._set_with_state(self.get_key_for_task(task_id), self.encode(meta), state)
        except BackendStoreError as ex:
            raise BackendStoreError(str(ex), state=state, task_id=task_id) from ex
        return result

    def revoked_state(self, result: Result) -> str:
        """A revoked job's final state, encoded as `store_revoked` stores it, for the
        gateway to store for a job no worker took yet (revoke.lua, which also refunds its
        reservation)."""
        encoded_error = self.encode_result(_revoked(result), states.REVOKED)
        meta = self._get_result_meta(
            result=encoded_error, state=states.REVOKED, traceback=None, request=None
        )
        meta["task_id"] = result.job_id
        encoded: str = self.encode(meta)
        return encoded

    def store_revoked(self, result: Result) -> None:
        """Store a revoked job's final state (with what is attached to it: `attach`), as
        the worker whose delivery meets the revoke does."""
        self.store_result(result.job_id, _revoked(result), states.REVOKED)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Celery's Redis backend subscribes to a task's result channel as the task is
        sent: one round trip per job, outside any pipeline. Not here: a caller that waits
        (AsyncResult.get) subscribes then, and reads the stored state right after, so a
        result published before that is not missed."""

    def _set_with_state(self, key: Any, value: Any, state: str) -> Any:
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend")
        expires = self.failure_expires if state == states.FAILURE else self.expires
        final = state in states.READY_STATES
        job_id = _job_id(key)
        extra = _take(job_id) if final else Bookkeeping()
        return self.ensure(self._store, (key, value, expires, final, job_id, extra))

    def _store(
        self, key: Any, value: Any, expires: Any, final: bool, job_id: str, extra: Bookkeeping
    ) -> Any:
        ttl = int(expires) if expires else 0
        store = script(self.client, "store_result")
        settle = "" if extra.settle_usd is None else repr(extra.settle_usd)
        filing, beat = extra.filing, extra.beat
        reply = store(
            keys=[
                key,
                keys.LEDGER_SPOOL,
                keys.DEAD_LETTER,
                keys.dead_letter_index(filing.bucket),
                keys.DEAD_LETTER_TRIMMED,
                keys.BEAT_HEALTH,
                keys.inflight(job_id),
                keys.running(this_process()),
                extra.delivery[0] if extra.delivery else key,
                keys.stream(job_id) if extra.stream else key,
                *extra.settle_keys,
            ],
            args=[
                value,
                ttl,
                "1" if final else "0",
                extra.rows,
                job_id,
                extra.dead_letter,
                settle,
                filing.bucket,
                filing.max_count,
                filing.max_age_s,
                beat.encode() if beat else "",
                extra.delivery[1] if extra.delivery else "",
                "1" if extra.stream else "",
                streams.MAX_RECORDS,
                streams.STREAM_KEEP_S,
            ],
        )
        if beat and isinstance(reply, list):  # [event, the entry's health]
            beathealth.report(beat.entry, _text(reply[0]), _text(reply[1]))
        return reply


def _revoked(result: Result) -> JobRevoked:
    """What a revoked job's final state holds: REVOKED, as Celery stores it, with the job's
    Result (class, source, the attempts made before) in the exception, as a failed job's
    final state carries it."""
    return JobRevoked(result.error or JobRevoked.MESSAGE, result.summary())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _job_id(key: Any) -> str:
    text = key.decode() if isinstance(key, bytes) else str(key)
    return text.removeprefix(keys.result(""))
