"""Counting deliveries, which Redis does not: a job whose message keeps coming back (its
worker dies on it each time) must stop after a bounded number of tries, and a message
redelivered after its job already finished must not run it again.

A worker that dies takes every delivery it held with it, and only one of them, if any,
brought it down: a job must not be poisoned for deaths it merely witnessed (a threads
worker killed three times, by a deploy or the host's OOM killer, while the same slow jobs
ran in it would otherwise dead-letter them all). So each worker process records the jobs
it holds (`fleet:running:<process>`: added by a delivery's first round trip, removed with
the job's final state or by its next message's first round trip), each message records
the process of its latest delivery, and a redelivery lays on its message an equal share
of that process's death: 1 / the jobs the process held. A pool process runs one job at
a time, so a job that kills it bears each death whole and is poisoned at its fourth
delivery (MAX_DEATHS deaths); a job that died among seven others bears an eighth. A
message delivered MAX_DELIVERIES times is poisoned whatever its share, so a job that
brings down a busy threads worker is still stopped.

A message is (job id, sends): `sends` grows each time the fleet forwards the job, so the
count of one message's deliveries is exact however many escalations the job makes. Once
the next message (sends + 1) has been delivered, this one is superseded: a copy of it
coming back (its worker died between sending the forward and acking) must not run the
job a second time alongside the forwarded one.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from router.slots import Block
from workers.state import keys
from workers.state.connections import Pipeline
from workers.state.inflight import Orphan, orphans
from workers.state.limits import AdmitCall, Slot

MAX_DEATHS = 3  # deaths laid on a message (see above) that poison it
MAX_DELIVERIES = 10  # deliveries of one message that poison it, whatever its share
KEEP_S = 86_400

_process: dict[int, str] = {}


def this_process() -> str:
    """This worker process, unique across restarts and forks (host, pid, a random tag)."""
    pid = os.getpid()
    if pid not in _process:
        _process[pid] = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
    return _process[pid]


@dataclass(frozen=True)
class DeliveryRecord:
    """One message's record of its deliveries: the hash begin.lua keeps at
    keys.deliveries(job, sends), whose fields these are."""

    n: int = 0  # its deliveries so far
    on: str | None = None  # the process of its latest delivery that went on
    deaths: float = 0.0  # the share of its deliveries' deaths laid on it (see above)

    def fields(self) -> dict[str, str | int | float]:
        """The hash's fields (`on` left out when unset)."""
        written: dict[str, str | int | float] = {"n": self.n, "deaths": self.deaths}
        return written if self.on is None else {**written, "on": self.on}


def record(redis: Any, job_id: str, sends: int) -> DeliveryRecord:
    """The record of message `sends` of `job_id` (all zero before its first delivery)."""
    raw = {_text(k): _text(v) for k, v in redis.hgetall(keys.deliveries(job_id, sends)).items()}
    return DeliveryRecord(
        n=int(raw.get("n", 0)), on=raw.get("on"), deaths=float(raw.get("deaths", 0))
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Delivery:
    count: int  # 1 on first delivery (its record's n)
    finished: bool  # the job already has its final result: this is a stale copy
    superseded: bool = False  # the job was forwarded and the next message delivered
    poisoned: bool = False  # its deliveries died too often (see above): end it, no call
    admitted: Slot | Block | None = None  # the answer to the admission asked for, if any
    revoked: bool = False  # its app revoked the job: end it, make no call
    # calls earlier deliveries of this message left in flight (their workers died): to bill
    orphans: tuple[Orphan, ...] = ()


def begin(
    redis: Any,
    job_id: str,
    sends: int,
    admit: AdmitCall | None = None,
    process: str | None = None,
) -> Delivery:
    """Count this delivery and lay on it its share of its last delivery's death, look for
    a final result and for a later message, read the calls earlier deliveries of this
    message left in flight, and record that this process holds the job; and, when the
    delivery is to go on, take `admit` (the first model's slot): one round trip
    (scripts/begin.lua). A finished job is recognised by the status its stored state
    names. `process`: the worker process (this one unless a test plays several)."""
    process = process or this_process()
    script_keys = [
        keys.deliveries(job_id, sends),
        keys.result(job_id),
        keys.deliveries(job_id, sends + 1),
        keys.revoked(job_id),
        keys.inflight(job_id),
        keys.deliveries(job_id, sends - 1),
        keys.running(process),
    ]
    args: list[Any] = [
        KEEP_S,
        MAX_DEATHS,
        MAX_DELIVERIES,
        sends,
        process,
        keys.RUNNING_PREFIX,
        job_id,
    ]
    if admit is not None:
        script_keys += admit.keys
        args += admit.args
    batch = Pipeline(redis)
    batch.script("begin", script_keys, args)
    count, finished, later, revoked, poisoned, marks, *rest = batch.execute()[0]
    admitted = admit.read(rest[0]) if admit is not None and rest else None
    return Delivery(
        count=int(count),
        finished=bool(finished),
        superseded=bool(later),
        poisoned=bool(poisoned),
        admitted=admitted,
        revoked=bool(revoked),
        orphans=tuple(orphans(marks)),
    )


def current(redis: Any, job_id: str, sends: int, count: int) -> bool:
    """Whether delivery `count` of message `sends` is still its message's latest: a later
    one begins when the worker holding this one lost the message (its beat lapsed)."""
    return int(redis.hget(keys.deliveries(job_id, sends), "n") or 0) <= count
