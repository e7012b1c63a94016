"""Counting deliveries, which Redis does not: a job whose message keeps coming back (its
worker dies on it each time) must stop after a bounded number of tries, and a message
redelivered after its job already finished must not run it again.

A message is (job id, sends): `sends` grows each time the fleet forwards the job, so the
count of one message's deliveries is exact however many escalations the job makes. Once
the next message (sends + 1) has been delivered, this one is superseded: a copy of it
coming back (its worker died between sending the forward and acking) must not run the
job a second time alongside the forwarded one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from workers.state import keys

MAX_DELIVERIES = 3
FINAL_STATES = ("SUCCESS", "FAILURE")
KEEP_S = 86_400


@dataclass(frozen=True)
class Delivery:
    count: int  # 1 on first delivery
    finished: bool  # the job already has its final result: this is a stale copy
    superseded: bool = False  # the job was forwarded and the next message delivered

    @property
    def poisoned(self) -> bool:
        return self.count > MAX_DELIVERIES


def begin(redis: Any, job_id: str, sends: int) -> Delivery:
    """Count this delivery, look for a final result and for a later message, in one
    round trip."""
    counter = keys.deliveries(job_id, sends)
    pipe = redis.pipeline(transaction=False)
    pipe.incr(counter)
    pipe.expire(counter, KEEP_S)
    pipe.get(keys.result(job_id))
    pipe.exists(keys.deliveries(job_id, sends + 1))
    count, _, meta, later = pipe.execute()
    return Delivery(int(count), stored_status(meta) in FINAL_STATES, bool(later))


def stored_status(meta: bytes | str | None) -> str | None:
    """The status of a job's stored state (Celery's JSON meta), or None when there is none
    or it cannot be read."""
    if not meta:
        return None
    try:
        stored = json.loads(meta)
    except ValueError:
        return None
    status = stored.get("status") if isinstance(stored, dict) else None
    return status if isinstance(status, str) else None
