"""Provider calls in flight, marked in Redis before they leave, so that a call whose worker
dies mid-way is still billed.

A provider may bill a call whatever becomes of the worker that made it, and a job whose
worker is killed is delivered again and calls again: the ledger must hold both calls.

    mark     The admission that takes a call's slot (scripts/admission.lua) also marks the
             call in the job's hash `fleet:inflight:<job>`, in the same round trip: field
             '<message>:<delivery>' (the job's message, `sends`, and which delivery of it:
             each delivery makes at most one call), value '<admitted ms>|<JSON>' with the
             model, queue, tier, attempt number, estimated prompt tokens and worker.
    clear    Once the call's outcome is recorded: with the job's final state and its ledger
             rows (store_result.lua), or, when the job moved on to its next message, by
             that message's first round trip (begin.lua), since its state carries the
             outcome.
    orphans  A mark of its own message that a delivery's first round trip finds (begin.lua
             returns them) was left by an earlier delivery of that message that never
             recorded its call: its worker died, or its forward could not be sent. The
             redelivery bills each as an `orphaned` attempt with estimated tokens and cost
             (workers/runtime/orphans.py): `bill()` pushes its row onto the ledger spool
             and clears its mark in one atomic step (scripts/orphans.lua), so a second kill
             loses no row and bills none twice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from workers.state import keys
from workers.state.connections import Pipeline

KEEP_MS = 86_400_000  # a mark outlives any redelivery (the visibility timeout is minutes)


@dataclass(frozen=True)
class Call:
    """A call about to leave, as its mark records it."""

    job_id: str
    sends: int  # the job's message that makes the call
    attempt: int  # its number among the job's attempts
    model: str
    queue: str
    tier: str
    prompt_tokens: int  # the router's estimate (the provider's count comes with the answer)
    worker: str | None
    delivery: int = 0  # which delivery of the message; 0: begin.lua fills in its own count

    @property
    def key(self) -> str:
        return keys.inflight(self.job_id)

    def args(self) -> list[Any]:
        """admission.lua's mark arguments: message, delivery, the call (JSON), keep ms."""
        call = {
            "model": self.model,
            "queue": self.queue,
            "tier": self.tier,
            "attempt": self.attempt,
            "prompt_tokens": self.prompt_tokens,
            "worker": self.worker,
        }
        return [self.sends, self.delivery, json.dumps(call, separators=(",", ":")), KEEP_MS]


NO_MARK: list[Any] = ["", "", "", 0]  # admission.lua's mark arguments for a look


@dataclass(frozen=True)
class Orphan:
    """A call an earlier delivery of this message left in flight, read from its mark."""

    field: str  # its field in the job's hash: '<message>:<delivery>'
    sends: int
    delivery: int
    attempt: int
    model: str
    queue: str
    tier: str
    prompt_tokens: int
    worker: str | None
    admitted_at: float  # unix s, on Redis' clock


def orphans(reply: Sequence[Any]) -> list[Orphan]:
    """begin.lua's list of this message's marks (field, value, field, value, ...), oldest
    first."""
    found = []
    for raw_field, raw_value in zip(reply[::2], reply[1::2], strict=True):
        field, value = _text(raw_field), _text(raw_value)
        sends, _, delivery = field.partition(":")
        admitted_ms, _, call_json = value.partition("|")
        call = json.loads(call_json)
        found.append(
            Orphan(
                field=field,
                sends=int(sends),
                delivery=int(delivery),
                attempt=int(call["attempt"]),
                model=str(call["model"]),
                queue=str(call["queue"]),
                tier=str(call["tier"]),
                prompt_tokens=int(call["prompt_tokens"]),
                worker=call.get("worker"),
                admitted_at=int(admitted_ms) / 1000,
            )
        )
    return sorted(found, key=lambda o: o.admitted_at)


def bill(redis: Any, job_id: str, entries: Sequence[tuple[Orphan, str]]) -> list[Orphan]:
    """Push each orphan's ledger spool entry and clear its mark, atomically; the orphans
    billed here (one another delivery billed first is left out)."""
    args = [item for orphan, entry in entries for item in (orphan.field, entry)]
    batch = Pipeline(redis)
    batch.script("orphans", [keys.inflight(job_id), keys.LEDGER_SPOOL], args)
    billed = {_text(f) for f in batch.execute()[0]}
    return [orphan for orphan, _ in entries if orphan.field in billed]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
