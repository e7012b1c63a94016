"""Provider calls in flight, marked in Redis before they leave, so that a call whose worker
dies mid-way is still billed.

A provider may bill a call whatever becomes of the worker that made it, and a job whose
worker is killed is delivered again and calls again: the ledger must hold both calls.

    mark     Right before the request's first byte is written (after the connection is
             made: the adapter calls `about_to_send`, workers/providers/base.py), the call
             is marked in the job's hash `fleet:inflight:<job>` (scripts/mark.lua): field
             '<message>:<delivery>' (the job's message, `sends`, and which delivery of it:
             each delivery makes at most one call), value '<marked ms>|<JSON>' with the
             model, queue, tier, attempt number, estimated prompt tokens and worker.
             Marked there, not with the call's slot (which would save this round trip): a
             worker killed between its admission and the send, while it builds the request
             or connects, would leave a mark for a call the provider never received, and
             the ledger would bill it. What remains is a worker killed between the mark
             and the request's last byte (the headers and the body are two writes): that
             window is the request's own, not Redis' round trip, so a mark sent without
             waiting for Redis' reply would not shrink it: the mark waits, the simpler
             code. The chaos audit counts such rows apart. A mark that cannot reach Redis
             stops the call (Unmarked): an unmarked call nobody could bill.
    clear    Once the call's outcome is recorded: with the job's final state and its ledger
             rows (store_result.lua), or, when the job moved on to its next message, by
             that message's first round trip (begin.lua), since its state carries the
             outcome.
    orphans  A mark of its own message that a delivery's first round trip finds (begin.lua
             returns them) was left by an earlier delivery of that message that never
             recorded its call: its worker died, or its forward could not be sent. The
             redelivery bills each as an `orphaned` attempt with estimated tokens and cost
             (workers/runtime/orphans.py): `bill_orphans()` pushes its row onto the ledger
             spool and clears its mark in one atomic step (scripts/bill_orphans.lua), so a
             second kill loses no row and bills none twice.
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
    delivery: int  # which delivery of the message (begin.lua counts them)

    @property
    def key(self) -> str:
        return keys.inflight(self.job_id)

    def args(self) -> list[Any]:
        """mark.lua's arguments: the field, the call (JSON), keep ms."""
        call = {
            "model": self.model,
            "queue": self.queue,
            "tier": self.tier,
            "attempt": self.attempt,
            "prompt_tokens": self.prompt_tokens,
            "worker": self.worker,
        }
        field = f"{self.sends}:{self.delivery}"
        return [field, json.dumps(call, separators=(",", ":")), KEEP_MS]


class Superseded(Exception):
    """A later delivery of this delivery's message began: its worker lost the message
    (its beat lapsed, workers/runtime/liveness.py) and the job is another's now."""


class Unmarked(Exception):
    """The state Redis could not be reached to mark the call: the call does not leave.
    Nobody could bill it, and this delivery cannot tell whether it still holds its
    message (cut off from Redis, it may have lost it to another worker already): the
    delivery hands its message back instead (workers/runtime/tasks.py)."""


def mark(redis: Any, call: Call) -> None:
    """Mark `call` in flight: it is about to leave (see the module's docstring). Raises
    Superseded, marking nothing, when a later delivery of its message began."""
    batch = Pipeline(redis)
    batch.script(
        "mark", [call.key, keys.deliveries(call.job_id, call.sends)], [*call.args(), call.delivery]
    )
    if batch.execute()[0] == -1:
        raise Superseded(f"job {call.job_id}: message {call.sends} was delivered again")


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
    marked_at: float  # when it was marked, unix s, on Redis' clock


def orphans(reply: Sequence[Any]) -> list[Orphan]:
    """begin.lua's list of this message's marks (field, value, field, value, ...), oldest
    first."""
    found = []
    for raw_field, raw_value in zip(reply[::2], reply[1::2], strict=True):
        field, value = _text(raw_field), _text(raw_value)
        sends, _, delivery = field.partition(":")
        marked_ms, _, call_json = value.partition("|")
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
                marked_at=int(marked_ms) / 1000,
            )
        )
    return sorted(found, key=lambda o: o.marked_at)


def bill_orphans(redis: Any, job_id: str, entries: Sequence[tuple[Orphan, str]]) -> list[Orphan]:
    """Push each orphan's ledger spool entry and clear its mark, atomically; the orphans
    billed here (one another delivery billed first is left out)."""
    args = [item for orphan, entry in entries for item in (orphan.field, entry)]
    batch = Pipeline(redis)
    batch.script("bill_orphans", [keys.inflight(job_id), keys.LEDGER_SPOOL], args)
    billed = {_text(f) for f in batch.execute()[0]}
    return [orphan for orphan, _ in entries if orphan.field in billed]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
