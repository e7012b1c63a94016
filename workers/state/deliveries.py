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

from dataclasses import dataclass
from typing import Any

from router.slots import Block
from workers.state import keys
from workers.state.connections import Pipeline
from workers.state.inflight import Orphan, orphans
from workers.state.limits import Admission, Slot

MAX_DELIVERIES = 3
KEEP_S = 86_400


@dataclass(frozen=True)
class Delivery:
    count: int  # 1 on first delivery
    finished: bool  # the job already has its final result: this is a stale copy
    superseded: bool = False  # the job was forwarded and the next message delivered
    admitted: Slot | Block | None = None  # the answer to the admission asked for, if any
    revoked: bool = False  # its app revoked the job: end it, make no call
    # calls earlier deliveries of this message left in flight (their workers died): to bill
    orphans: tuple[Orphan, ...] = ()

    @property
    def poisoned(self) -> bool:
        return self.count > MAX_DELIVERIES


def begin(redis: Any, job_id: str, sends: int, admission: Admission | None = None) -> Delivery:
    """Count this delivery, look for a final result and for a later message, and read the
    calls earlier deliveries of this message left in flight; and, when the delivery is to
    go on, take `admission` (the first model's slot): one round trip (scripts/begin.lua).
    A finished job is recognised by the status its stored state names."""
    script_keys = [
        keys.deliveries(job_id, sends),
        keys.result(job_id),
        keys.deliveries(job_id, sends + 1),
        keys.revoked(job_id),
        keys.inflight(job_id),
    ]
    args: list[Any] = [KEEP_S, MAX_DELIVERIES, sends]
    if admission is not None:
        script_keys += admission.keys
        args += admission.args
    batch = Pipeline(redis)
    batch.script("begin", script_keys, args)
    count, finished, later, revoked, marks, *rest = batch.execute()[0]
    admitted = admission.read(rest[0]) if admission is not None and rest else None
    return Delivery(
        int(count), bool(finished), bool(later), admitted, bool(revoked), tuple(orphans(marks))
    )
