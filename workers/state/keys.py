"""Every Redis key the fleet writes or reads, in one place, with its owner and lifetime.

All live state is fleet-wide: every worker on every machine reads and writes these keys
on the one state Redis (FLEET_STATE_URL, or the broker when it is Redis). The table in
docs/architecture.md lists them; keep the two together.
"""

from __future__ import annotations

PREFIX = "fleet"


# --- limits and health (workers/state/limits.py) ---------------------------------------


def window(scope: str, name: str, measure: str, period: str) -> str:
    """A sliding window of requests or tokens: a sorted set of (member, arrival ms),
    expiring one window after its last arrival."""
    return f"{PREFIX}:window:{scope}:{name}:{measure}:{period}"


def cooldown(model: str) -> str:
    """'<until ms>|<reason>' while the model rests; expires at that moment."""
    return f"{PREFIX}:cooldown:{model}"


def failures(model: str) -> str:
    """Recent transient failures (sorted set by ms): enough of them open the circuit."""
    return f"{PREFIX}:circuit:failures:{model}"


def circuit_open(model: str) -> str:
    """Set while the circuit is open or half-open: the next call after the cooldown probes.
    No expiry: a probe's success deletes it."""
    return f"{PREFIX}:circuit:open:{model}"


def probe(model: str) -> str:
    """Held by the one call allowed through a half-open circuit (expires after
    limits.PROBE_TTL_MS, should its worker die)."""
    return f"{PREFIX}:circuit:probe:{model}"


def spend(scope: str, name: str, period: str, stamp: str) -> str:
    """USD spent by a model, provider or tier in one UTC day (kept 2 days) or month (33)."""
    return f"{PREFIX}:spend:{scope}:{name}:{period}:{stamp}"


# --- jobs (workers/state/deliveries.py, idempotency.py, deadletter.py) ------------------


def deliveries(job_id: str, sends: int) -> str:
    """How many times one message of a job (its `sends`-th) was delivered; kept a day."""
    return f"{PREFIX}:deliveries:{job_id}:{sends}"


def idempotency(key: str) -> str:
    """The id of the job first dispatched with this idempotency key; kept a day."""
    return f"{PREFIX}:idempotency:{key}"


DEAD_LETTER = f"{PREFIX}:dead-letter"  # hash: job id -> the failed job and its reasons


def result(job_id: str) -> str:
    """Celery's own key for a job's state and Result (the result backend writes it through
    store_result.lua; kept FLEET_RESULT_EXPIRES_S)."""
    return f"celery-task-meta-{job_id}"


# --- the ledger spool (filled by runtime/resultstore.py, drained by ledger/store.py) ------

LEDGER_SPOOL = f"{PREFIX}:ledger:spool"  # list: one JSON entry of attempt rows per job
LEDGER_CLAIMS = f"{PREFIX}:ledger:spool:claims"  # zset: claim token -> claimed at (unix s)
LEDGER_CLAIM_PREFIX = f"{PREFIX}:ledger:spool:claim:"  # + token: the entries one drainer holds


# --- apps behind the gateway (workers/state/apps.py) -------------------------------------


def app_requests(app: str) -> str:
    """An app's requests of the last minute (sorted set by arrival ms), for its key's
    requests_per_min; expires a minute after the last."""
    return f"{PREFIX}:app:{app}:requests"


def app_spend(app: str, period: str, stamp: str) -> str:
    """USD an app's jobs have set aside (reserved at the door, settled to their real cost
    when they end) in one UTC day (kept 2 days) or month (33)."""
    return f"{PREFIX}:app:{app}:spend:{period}:{stamp}"


def settled(job_id: str) -> str:
    """Set once a job's reservation was settled (by its final state, or refunded by the
    gateway for a job that never ran), so that it is settled once; kept a day."""
    return f"{PREFIX}:app:settled:{job_id}"


def revoked(job_id: str) -> str:
    """Set when a job's app revoked it while a worker held it: its next delivery ends it
    (workers/state/scripts/begin.lua); kept a day."""
    return f"{PREFIX}:gateway:revoked:{job_id}"


def owner(job_id: str) -> str:
    """The app that sent a job through the gateway (only it may read or revoke the job);
    kept a day."""
    return f"{PREFIX}:gateway:owner:{job_id}"
