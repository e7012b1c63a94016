"""A job's output stream on a real redis-server (workers/state/streams.py): deltas batched
into few records, read in order from any cursor, ending with one final record."""

from __future__ import annotations

import threading
from typing import Any

from workers.state import keys, streams
from workers.state.streams import START, StreamWriter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def text_of(records: list[streams.Record]) -> str:
    return "".join((r.delta or {}).get("text", "") for r in records)


def test_deltas_go_in_batches_not_one_command_per_token(fresh_redis: Any) -> None:
    # Given 1,000 one-character deltas made faster than a batch's age
    writer = StreamWriter(fresh_redis, "j1", clock=Clock())
    for i in range(1_000):
        writer.add(text=str(i % 10))
    writer.finish({"ok": True, "job_id": "j1"})
    # Then the first went at once (never held), the rest as records of BATCH_CHARS, then
    # the final one
    assert writer.records == 1 + -(-999 // streams.BATCH_CHARS) + 1
    records = streams.read(fresh_redis, "j1")
    assert text_of(records) == "".join(str(i % 10) for i in range(1_000))
    assert records[-1].final == {"ok": True, "job_id": "j1"}
    # kept for a while, not for good
    assert 0 < fresh_redis.ttl(keys.stream("j1")) <= streams.STREAM_KEEP_S


def test_a_slow_stream_sends_each_delta_as_it_comes(fresh_redis: Any) -> None:
    clock = Clock()
    writer = StreamWriter(fresh_redis, "j2", clock=clock)
    for word in ["Hello", " there", ",", " friend"]:
        clock.now += 2 * streams.BATCH_S  # tokens further apart than a batch: each at once
        writer.add(text=word, reasoning="r", tool_calls=[{"index": 0, "function": {}}])
    assert writer.records == 4
    writer.finish({"ok": True})
    records = streams.read(fresh_redis, "j2")
    assert text_of(records) == "Hello there, friend"
    assert "".join(r.delta["reasoning"] for r in records if r.delta) == "rrrr"
    assert sum(len(r.delta["tool_calls"]) for r in records if r.delta) == 4


def test_a_held_batch_goes_out_when_the_model_pauses(fresh_redis: Any) -> None:
    # Given a delta held because the last record went a moment ago
    writer = StreamWriter(fresh_redis, "j5")
    writer.add(text="first")
    writer.add(text=" second")
    assert text_of(streams.read(fresh_redis, "j5", block_ms=1)) == "first"
    # When the model says nothing more for a while, the held delta still goes out
    after = streams.read(fresh_redis, "j5", block_ms=1)[-1].id
    assert text_of(streams.read(fresh_redis, "j5", after=after, block_ms=1_000)) == " second"


def test_a_reader_resumes_after_a_record_with_nothing_lost_or_repeated(fresh_redis: Any) -> None:
    writer = StreamWriter(fresh_redis, "j3", clock=Clock())
    for word in ["a" * streams.BATCH_CHARS, "b" * streams.BATCH_CHARS, "c" * 10]:
        writer.add(text=word)
    writer.finish({"ok": True})
    everything = streams.read(fresh_redis, "j3")
    # A client that saw the first record (its id is the SSE event id) reconnects from it
    rest = streams.read(fresh_redis, "j3", after=everything[0].id)
    assert rest == everything[1:]
    assert text_of(everything[:1]) + text_of(rest) == text_of(everything)


def test_a_reader_that_waits_before_the_first_token_misses_nothing(fresh_redis: Any) -> None:
    # Given a reader following the job from the start before anything is written
    got: list[streams.Record] = []
    reader = threading.Thread(
        target=lambda: got.extend(streams.follow(fresh_redis, "j4", START, timeout_s=10))
    )
    reader.start()
    # When the worker writes, in batches, then ends
    writer = StreamWriter(fresh_redis, "j4")
    for _ in range(50):
        writer.add(text="x" * 20)
    writer.finish({"ok": True})
    reader.join(10)
    # Then it has every record, the final one last
    assert text_of(got) == "x" * 1_000 and got[-1].final == {"ok": True}
