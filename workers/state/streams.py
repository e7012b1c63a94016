"""A streaming job's output as it is made, carried back through Redis to whoever waits for
it: `JobHandle.stream()`, the gateway's server-sent events (docs/streaming.md).

The worker whose call streams appends the deltas to a Redis Stream of the job
(`keys.stream`), batched: one XADD per batch (StreamWriter says when a batch goes), never
one command per token. The stream is bounded (MAXLEN ~, the oldest records dropped
first) and kept STREAM_KEEP_S after its last record. Records:

    delta   JSON: text, reasoning, tool-call fragments; the first delta of a call also
            names its model and queue (`model`, `queue` fields: the gateway's headers)
    error   the stream stopped after text went out (JSON: message, kind, job_id): the
            model's stream broke, or the worker writing it died. Nothing more is
            streamed; the job goes on down its chain unstreamed, to its Result
    end     the job's final stored state (Celery's meta, as the result key holds it),
            written with it by store_result.lua unless an `error` ended the stream

A stream carries one call's text at most: a failure before the first delta leaves it
empty (the job moves down its chain unseen by the reader), and once text went out no
other call streams. The batch that sends a delta also reads the job's revoked marker: a
job revoked mid-stream (its client went away) stops generating at the next batch.

A reader follows it with XREAD BLOCK from a cursor (a record id; "0-0" from the start):
taken before anything could be missed (a reader that reads from "$", the end, after it
has announced itself loses what came in between). Record ids are the SSE event ids a
client that reconnects sends back (Last-Event-ID): it resumes with nothing lost and
nothing repeated.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from router.errors import JobRevoked
from router.results import Delta
from workers.state import keys
from workers.state.connections import Pipeline

log = logging.getLogger(__name__)

BATCH_CHARS = 256  # a batch is sent once it holds this much text...
BATCH_S = 0.05  # ...or is this old (the gap a reader sees between batches, at most)
MAX_RECORDS = 10_000  # the stream's bound (MAXLEN ~): a long answer keeps its latest part
STREAM_KEEP_S = 3_600  # kept after its last record: long enough to resume, then gone
START = "0-0"  # a cursor before the first record
ABANDONED = "the worker streaming this job stopped mid-stream (killed or cut off)"


@dataclass
class Batch:
    """Deltas merged into one record: text, reasoning, and tool-call fragments in order."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.reasoning += delta.reasoning
        self.tool_calls.extend(delta.tool_calls)

    def size(self) -> int:
        return len(self.text) + len(self.reasoning) + len(self.tool_calls)

    def record(self) -> dict[str, str]:
        fields = {"text": self.text, "reasoning": self.reasoning, "tool_calls": self.tool_calls}
        return {"delta": json.dumps({k: v for k, v in fields.items() if v})}


def claim(redis: Any, job_id: str, fresh: bool) -> bool:
    """Whether a delivery may stream the job: its stream holds no text yet. `fresh`: the
    job's first delivery of its first message, whose stream nobody wrote (no round trip).
    A later delivery that finds a stream left open (text, no end: its writer died or lost
    the job) ends it with an `error` record (scripts/stream_claim.lua)."""
    if fresh:
        return True
    error = json.dumps({"message": ABANDONED, "kind": "worker_lost", "job_id": job_id})
    batch = Pipeline(redis)
    batch.script("stream_claim", [keys.stream(job_id)], [MAX_RECORDS, STREAM_KEEP_S, error])
    return bool(batch.execute()[0])


class StreamWriter:
    """A delivery's side: append one call's deltas, batched; end the stream with an error
    if the call breaks after text went out. (The `end` record goes with the job's stored
    state.)

    A delta goes out at once when the last record went BATCH_S ago or more (the first
    token is never held); otherwise it joins the batch, which goes out when it holds
    BATCH_CHARS, or BATCH_S later from a timer (a model that pauses does not hold back
    what it already said). A Redis that cannot be reached delays a batch, never drops it:
    it goes with the next."""

    def __init__(self, redis: Any, job_id: str, clock: Any = time.monotonic) -> None:
        self.redis, self.job_id, self.key, self.clock = redis, job_id, keys.stream(job_id), clock
        self.batch = Batch()
        self.heading: dict[str, str] = {}  # the call's model and queue, for its first record
        self.sent_at: float | None = None  # when the last record went
        self.records = 0
        self.revoked = False  # the job's app revoked it: the call stops at the next delta
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    @property
    def streamed(self) -> bool:
        """Whether text of this job went out (a failure now must not go down the chain)."""
        return self.records > 0

    def start(self, model: str, queue: str) -> None:
        """A call begins: its first record names its model and queue."""
        self.heading = {"model": model, "queue": queue}

    def add(self, delta: Delta) -> None:
        """Send or batch `delta`. Raises JobRevoked once a batch found the job revoked."""
        with self._lock:
            if self.revoked:
                raise JobRevoked(JobRevoked.MESSAGE)
            self.batch.add(delta)
            recent = self.sent_at is not None and self.clock() - self.sent_at < BATCH_S
            if self.batch.size() >= BATCH_CHARS or not recent:
                self._flush()
            elif self._timer is None:
                self._timer = threading.Timer(BATCH_S, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Send what the batch holds (nothing when it is empty)."""
        with self._lock:
            self._flush()

    def broke(self, message: str, kind: str) -> None:
        """The call failed after text went out: send what is left, then the `error` that
        ends the stream (nothing when no text went out: the reader saw nothing)."""
        with self._lock:
            self._flush()
            if self.records:
                error = {"message": message, "kind": kind, "job_id": self.job_id}
                self._append({"error": json.dumps(error)}, check=False)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.batch.size():
            record = {**self.batch.record(), **(self.heading if not self.records else {})}
            if self._append(record, check=True):
                self.batch = Batch()

    def _append(self, record: dict[str, str], check: bool) -> bool:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(self.key, record, maxlen=MAX_RECORDS, approximate=True)
        pipe.expire(self.key, STREAM_KEEP_S)
        if check:
            pipe.exists(keys.revoked(self.job_id))
        try:
            replies = pipe.execute()
        except RedisError as exc:  # kept: it goes with the next batch
            log.warning("job %s: stream batch not sent (%r)", self.job_id, exc)
            return False
        self.records += 1
        self.sent_at = self.clock()
        if check and replies[2]:
            self.revoked = True
        return True


@dataclass(frozen=True)
class Record:
    """One record of a job's stream: its id (the cursor after it), and what it holds."""

    id: str
    delta: Delta | None = None
    heading: dict[str, str] | None = None  # the model and queue a call's first delta is from
    error: dict[str, Any] | None = None  # the stream stopped after text went out
    end: dict[str, Any] | None = None  # the job's final stored state (Celery's meta)

    @property
    def last(self) -> bool:
        return self.error is not None or self.end is not None


def parse(raw_id: bytes | str, fields: dict[Any, Any]) -> Record:
    """A record as XREAD or XRANGE gives it."""
    values = {_text(k): _text(v) for k, v in fields.items()}
    delta = None
    if "delta" in values:
        found = json.loads(values["delta"])
        delta = Delta(
            text=found.get("text", ""),
            reasoning=found.get("reasoning", ""),
            tool_calls=tuple(found.get("tool_calls", ())),
        )
    heading: dict[str, str] | None = {k: values[k] for k in ("model", "queue") if k in values}
    return Record(
        id=_text(raw_id),
        delta=delta,
        heading=heading or None,
        error=json.loads(values["error"]) if "error" in values else None,
        end=json.loads(values["end"]) if "end" in values else None,
    )


def read(redis: Any, job_id: str, after: str = START, block_ms: int | None = 1_000) -> list[Record]:
    """The records after `after`, waiting up to `block_ms` for the first (None: no wait)."""
    found = redis.xread({keys.stream(job_id): after}, block=block_ms) or []
    return [parse(raw_id, fields) for _key, entries in found for raw_id, fields in entries]


def follow(
    redis: Any, job_id: str, after: str = START, timeout_s: float = 600.0
) -> Iterator[Record]:
    """Every record after `after`, as they come, up to and including the last one (an
    `end` or an `error`). A job that ends without an `end` record (revoked before any
    worker took it; a stream kept past its TTL) ends with its stored state, read when the
    stream says nothing for a second."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = read(redis, job_id, after)
        for record in records:
            yield record
            after = record.id
            if record.last:
                return
        if not records:
            stored = final_state(redis.get(keys.result(job_id)))
            if stored is not None and not read(redis, job_id, after, block_ms=None):
                yield Record(id=after, end=stored)
                return
    raise TimeoutError(f"job {job_id}: its stream did not end within {timeout_s:g} s")


FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")


def stored_state(raw: Any) -> dict[str, Any] | None:
    """A stored state (the result key's value, Celery's meta) decoded, or None."""
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def final_state(raw: Any) -> dict[str, Any] | None:
    """A stored state when it is final, else None."""
    meta = stored_state(raw)
    return meta if meta is not None and meta.get("status") in FINAL_STATES else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
