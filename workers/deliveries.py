"""Counting deliveries, which Redis does not: a job whose message keeps coming back (its
worker dies on it each time) must stop after a bounded number of tries, and a message
redelivered after its job already finished must not run it again.

A message is (job id, sends): `sends` grows each time the fleet forwards the job, so the
count of one message's deliveries is exact however many escalations the job makes.
"""

from __future__ import annotations

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

    @property
    def poisoned(self) -> bool:
        return self.count > MAX_DELIVERIES


def begin(redis: Any, job_id: str, sends: int, result_key: str) -> Delivery:
    """Count this delivery and look for a final result, in one round trip."""
    counter = f"{keys.deliveries(job_id)}:{sends}"
    pipe = redis.pipeline(transaction=False)
    pipe.incr(counter)
    pipe.expire(counter, KEEP_S)
    pipe.get(result_key)
    count, _, meta = pipe.execute()
    finished = bool(meta) and any(state in meta for state in FINAL_STATES)
    return Delivery(int(count), finished)
