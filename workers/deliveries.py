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

from workers import keys

MAX_DELIVERIES = 3
FINAL_STATES = (b'"SUCCESS"', b'"FAILURE"')
KEEP_S = 86_400


@dataclass(frozen=True)
class Delivery:
    count: int  # 1 on first delivery
    finished: bool  # the job already has its final result: this is a stale copy
    superseded: bool = False  # the job was forwarded and the next message delivered
    meta: bytes | None = None  # the job's stored result, when finished

    @property
    def poisoned(self) -> bool:
        return self.count > MAX_DELIVERIES


def begin(redis: Any, job_id: str, sends: int, result_key: str) -> Delivery:
    """Count this delivery, look for a final result and for a later message, in one
    round trip."""
    counter = f"{keys.deliveries(job_id)}:{sends}"
    pipe = redis.pipeline(transaction=False)
    pipe.incr(counter)
    pipe.expire(counter, KEEP_S)
    pipe.get(result_key)
    pipe.exists(f"{keys.deliveries(job_id)}:{sends + 1}")
    count, _, meta, later = pipe.execute()
    finished = bool(meta) and any(state in meta for state in FINAL_STATES)
    return Delivery(int(count), finished, bool(later), meta if finished else None)


def stored_result(meta: bytes | str) -> tuple[dict[str, Any], bool] | None:
    """The Result (summary) a finished job's stored state holds, and whether the job
    failed; None when the state holds no Result (a failure other than JobFailed)."""
    try:
        stored = json.loads(meta)
    except ValueError:
        return None
    value = stored.get("result")
    if stored.get("status") == "SUCCESS" and isinstance(value, dict):
        return value, False
    if isinstance(value, dict) and value.get("exc_type") == "JobFailed":
        args = value.get("exc_message") or []
        if len(args) == 2 and isinstance(args[1], dict) and args[1]:
            return args[1], True
    return None
