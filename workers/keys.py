"""Every Redis key the fleet writes, in one place (Celery's own keys aside).

All live state is fleet-wide: every worker on every machine reads and writes these keys
on the one state Redis (FLEET_STATE_URL, or the broker when it is Redis).
"""

from __future__ import annotations

PREFIX = "fleet"


def window(scope: str, name: str, measure: str, period: str) -> str:
    """A sliding window of requests or tokens: a sorted set of (member, arrival ms)."""
    return f"{PREFIX}:window:{scope}:{name}:{measure}:{period}"


def cooldown(model: str) -> str:
    """'<until ms>|<reason>' while the model rests; expires at that moment."""
    return f"{PREFIX}:cooldown:{model}"


def failures(model: str) -> str:
    """Recent transient failures (sorted set by ms): enough of them open the circuit."""
    return f"{PREFIX}:circuit:failures:{model}"


def circuit_open(model: str) -> str:
    """Set while the circuit is open or half-open: the next call after the cooldown probes."""
    return f"{PREFIX}:circuit:open:{model}"


def probe(model: str) -> str:
    """Held by the one call allowed through a half-open circuit."""
    return f"{PREFIX}:circuit:probe:{model}"


def spend(scope: str, name: str, period: str, stamp: str) -> str:
    """USD spent by a model, provider or tier in one UTC day (or month)."""
    return f"{PREFIX}:spend:{scope}:{name}:{period}:{stamp}"


LEDGER_SPOOL = f"{PREFIX}:ledger:spool"  # attempt rows waiting for the ledger database


def deliveries(job_id: str) -> str:
    """How many times a job's messages were delivered (Redis keeps no such counter)."""
    return f"{PREFIX}:deliveries:{job_id}"


DEAD_LETTER = f"{PREFIX}:dead-letter"  # hash: job id -> the failed job and its reasons


def idempotency(key: str) -> str:
    """The id of the job first dispatched with this idempotency key."""
    return f"{PREFIX}:idempotency:{key}"
