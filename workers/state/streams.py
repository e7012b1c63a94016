"""A job's output as it is made, carried back through Redis to whoever waits for it
(issue 17's transport; not yet fed by the worker's step nor read by the gateway).

A worker appends a job's deltas to a Redis Stream of that job (`keys.stream`), batched:
one XADD per batch (StreamWriter says when a batch goes), never one command per token.
The stream is bounded (MAXLEN ~, the oldest records dropped first) and kept
STREAM_KEEP_S after its last record. It ends with one final record: the job's Result
summary or its error.

A reader follows it with XREAD BLOCK from a cursor (a record id; "0-0" from the start):
taken before anything could be missed (a reader that reads from "$", the end, after it
has announced itself loses what came in between). Record ids are the SSE event ids a
client that reconnects sends back (Last-Event-ID): it resumes with nothing lost and
nothing repeated.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from workers.state import keys

BATCH_CHARS = 256  # a batch is sent once it holds this much text...
BATCH_S = 0.05  # ...or is this old (the gap a reader sees between batches, at most)
MAX_RECORDS = 10_000  # the stream's bound (MAXLEN ~): a long answer keeps its latest part
STREAM_KEEP_S = 3_600  # kept after its last record: long enough to resume, then gone
START = "0-0"  # a cursor before the first record


@dataclass
class Batch:
    """Deltas merged into one record: text, reasoning, and tool-call fragments in order."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, text: str = "", reasoning: str = "", tool_calls: Any = ()) -> None:
        self.text += text
        self.reasoning += reasoning
        self.tool_calls.extend(tool_calls)

    def size(self) -> int:
        return len(self.text) + len(self.reasoning) + len(self.tool_calls)

    def record(self) -> dict[str, str]:
        fields = {"text": self.text, "reasoning": self.reasoning, "tool_calls": self.tool_calls}
        return {"delta": json.dumps({k: v for k, v in fields.items() if v})}


class StreamWriter:
    """A worker's side: append deltas, batched; end with the final record.

    A delta goes out at once when the last record went BATCH_S ago or more (the first
    token is never held); otherwise it joins the batch, which goes out when it holds
    BATCH_CHARS, or BATCH_S later from a timer (a model that pauses does not hold back
    what it already said)."""

    def __init__(self, redis: Any, job_id: str, clock: Any = time.monotonic) -> None:
        self.redis, self.key, self.clock = redis, keys.stream(job_id), clock
        self.batch = Batch()
        self.sent_at: float | None = None  # when the last record went
        self.records = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def add(self, text: str = "", reasoning: str = "", tool_calls: Any = ()) -> None:
        with self._lock:
            self.batch.add(text, reasoning, tool_calls)
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

    def finish(self, final: dict[str, Any]) -> None:
        """Send what is left, then the final record (the Result summary, or the error)."""
        with self._lock:
            self._flush()
            self._append({"final": json.dumps(final)})

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.batch.size():
            self._append(self.batch.record())
            self.batch = Batch()

    def _append(self, record: dict[str, str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(self.key, record, maxlen=MAX_RECORDS, approximate=True)
        pipe.expire(self.key, STREAM_KEEP_S)
        pipe.execute()
        self.records += 1
        self.sent_at = self.clock()


@dataclass(frozen=True)
class Record:
    """One record of a job's stream: its id (the cursor after it), and a delta or the end."""

    id: str
    delta: dict[str, Any] | None = None
    final: dict[str, Any] | None = None


def read(redis: Any, job_id: str, after: str = START, block_ms: int = 1_000) -> list[Record]:
    """The records after `after`, waiting up to `block_ms` for the first (none: nothing yet)."""
    found = redis.xread({keys.stream(job_id): after}, block=block_ms) or []
    records = []
    for _key, entries in found:
        for raw_id, fields in entries:
            values = {_text(k): _text(v) for k, v in fields.items()}
            records.append(
                Record(
                    id=_text(raw_id),
                    delta=json.loads(values["delta"]) if "delta" in values else None,
                    final=json.loads(values["final"]) if "final" in values else None,
                )
            )
    return records


def follow(
    redis: Any, job_id: str, after: str = START, timeout_s: float = 600.0
) -> Iterator[Record]:
    """Every record after `after`, as they come, up to and including the final one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for record in read(redis, job_id, after):
            yield record
            after = record.id
            if record.final is not None:
                return
    raise TimeoutError(f"job {job_id}: its stream did not end within {timeout_s:g} s")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
