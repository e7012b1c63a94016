"""A job's output stream on a real redis-server (workers/state/streams.py): deltas batched
into few records, read in order from any cursor, ended by the job's stored final state
or by an error once text went out; a later delivery never streams after text went out."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from celery import states

from router.errors import JobRevoked
from router.results import Delta
from tests.fixtures import url_of
from workers.state import keys, streams
from workers.state.streams import START, StreamWriter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def text_of(records: list[streams.Record]) -> str:
    return "".join(r.delta.text for r in records if r.delta)


def store_final(
    redis: Any, job_id: str, stream: bool = True, backend: Any = None
) -> dict[str, Any]:
    """The job's final state stored as a worker stores it (store_result.lua)."""
    from workers.runtime.resultstore import Bookkeeping, attach

    backend = backend or backend_of(redis)
    attach(job_id, Bookkeeping(stream=stream))
    backend.store_result(job_id, {"ok": True, "job_id": job_id}, states.SUCCESS)
    meta: dict[str, Any] = json.loads(redis.get(keys.result(job_id)))
    return meta


def backend_of(redis: Any) -> Any:
    """The fleet's result backend on `redis` (a Celery app made for it: not cheap)."""
    from workers.runtime.celery_app import create_app

    return create_app({"FLEET_BROKER_URL": url_of(redis)}).backend


def test_deltas_go_in_batches_not_one_command_per_token(fresh_redis: Any) -> None:
    # Given 1,000 one-character deltas made faster than a batch's age
    writer = StreamWriter(fresh_redis, "j1", clock=Clock())
    writer.start("m-1", "free")
    for i in range(1_000):
        writer.add(Delta(text=str(i % 10)))
    writer.flush()
    meta = store_final(fresh_redis, "j1")
    # Then the first went at once (never held), the rest as records of BATCH_CHARS
    assert writer.records == 1 + -(-999 // streams.BATCH_CHARS)
    records = streams.read(fresh_redis, "j1")
    assert text_of(records) == "".join(str(i % 10) for i in range(1_000))
    # the first names the model that streams; the job's stored state ends the stream
    assert records[0].heading == {"model": "m-1", "queue": "free"}
    assert records[1].heading is None
    assert records[-1].end == meta and records[-1].last
    # kept for a while, not for good
    assert 0 < fresh_redis.ttl(keys.stream("j1")) <= streams.STREAM_KEEP_S


def test_a_slow_stream_sends_each_delta_as_it_comes(fresh_redis: Any) -> None:
    clock = Clock()
    writer = StreamWriter(fresh_redis, "j2", clock=clock)
    for word in ["Hello", " there", ",", " friend"]:
        clock.now += 2 * streams.BATCH_S  # tokens further apart than a batch: each at once
        writer.add(Delta(word, "r", ({"index": 0, "function": {}},)))
    assert writer.records == 4
    records = streams.read(fresh_redis, "j2")
    assert text_of(records) == "Hello there, friend"
    assert "".join(r.delta.reasoning for r in records if r.delta) == "rrrr"
    assert sum(len(r.delta.tool_calls) for r in records if r.delta) == 4


def test_a_held_batch_goes_out_when_the_model_pauses(fresh_redis: Any) -> None:
    # Given a delta held because the last record went a moment ago
    writer = StreamWriter(fresh_redis, "j5")
    writer.add(Delta(text="first"))
    writer.add(Delta(text=" second"))
    assert text_of(streams.read(fresh_redis, "j5", block_ms=1)) == "first"
    # When the model says nothing more for a while, the held delta still goes out
    after = streams.read(fresh_redis, "j5", block_ms=1)[-1].id
    assert text_of(streams.read(fresh_redis, "j5", after=after, block_ms=1_000)) == " second"


def test_a_reader_resumes_after_a_record_with_nothing_lost_or_repeated(fresh_redis: Any) -> None:
    writer = StreamWriter(fresh_redis, "j3", clock=Clock())
    for word in ["a" * streams.BATCH_CHARS, "b" * streams.BATCH_CHARS, "c" * 10]:
        writer.add(Delta(text=word))
    writer.flush()
    store_final(fresh_redis, "j3")
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
    # When the worker writes, in batches, then the job ends
    writer = StreamWriter(fresh_redis, "j4")
    for _ in range(50):
        writer.add(Delta(text="x" * 20))
    writer.flush()
    meta = store_final(fresh_redis, "j4")
    reader.join(10)
    # Then it has every record, the job's end last
    assert text_of(got) == "x" * 1_000 and got[-1].end == meta


def test_a_job_that_does_not_stream_ends_its_follower_with_its_stored_state(
    fresh_redis: Any,
) -> None:
    meta = store_final(fresh_redis, "whole", stream=False)
    assert not fresh_redis.exists(keys.stream("whole"))
    assert [r.end for r in streams.follow(fresh_redis, "whole", timeout_s=5)] == [meta]


def test_a_broken_call_ends_the_stream_with_an_error_and_the_end_is_not_added(
    fresh_redis: Any,
) -> None:
    writer = StreamWriter(fresh_redis, "j6")
    writer.broke("m-1: nothing streamed", "server_error")  # nothing went out: nothing said
    assert not fresh_redis.exists(keys.stream("j6"))
    writer.add(Delta(text="Once upon"))
    writer.broke("m-1: after 1 deltas, connection: reset", "stream_broken")
    # The job goes on unstreamed; its final state, stored later, adds nothing to the stream
    store_final(fresh_redis, "j6")
    records = streams.read(fresh_redis, "j6")
    assert text_of(records) == "Once upon"
    assert records[-1].error == {
        "message": "m-1: after 1 deltas, connection: reset",
        "kind": "stream_broken",
        "job_id": "j6",
    }
    assert [r.last for r in records] == [False, True]


def test_a_later_delivery_streams_only_into_an_empty_stream(fresh_redis: Any) -> None:
    # A job's first delivery of its first message streams without asking
    assert streams.claim(fresh_redis, "j7", fresh=True)
    assert not fresh_redis.exists(keys.stream("j7"))
    # A later delivery (a forward after a failure before any text) may stream too
    assert streams.claim(fresh_redis, "j7", fresh=False)
    # But once text went out and its writer died, the next delivery ends the stream
    StreamWriter(fresh_redis, "j7").add(Delta(text="half an ans"))
    assert not streams.claim(fresh_redis, "j7", fresh=False)
    records = streams.read(fresh_redis, "j7")
    assert text_of(records) == "half an ans"
    assert records[-1].error == {
        "message": streams.ABANDONED,
        "kind": "worker_lost",
        "job_id": "j7",
    }
    # and a delivery after that adds nothing more
    assert not streams.claim(fresh_redis, "j7", fresh=False)
    assert len(streams.read(fresh_redis, "j7")) == 2


def test_a_revoked_job_stops_its_stream_at_the_next_delta(fresh_redis: Any) -> None:
    clock = Clock()
    writer = StreamWriter(fresh_redis, "j8", clock=clock)
    writer.add(Delta(text="a"))
    fresh_redis.set(keys.revoked("j8"), "1")  # its client went away: the gateway revoked it
    clock.now += 1
    writer.add(Delta(text="b"))  # this batch reads the marker
    with pytest.raises(JobRevoked):
        writer.add(Delta(text="c"))
    assert text_of(streams.read(fresh_redis, "j8")) == "ab"


def test_the_gateway_hub_hands_every_record_to_every_follower_across_readers(
    fresh_redis: Any,
) -> None:
    """250 streams followed at once (three readers of at most 100), and a late follower of
    a stream already read far, from its start: each gets exactly its records, in order."""
    import asyncio

    from gateway.streaming import STREAMS_PER_READER, StreamHub
    from gateway.waiter import ResultWaiter

    jobs = [f"h{n}" for n in range(250)]

    async def main() -> None:
        waiter = ResultWaiter(url_of(fresh_redis))
        hub = StreamHub(url_of(fresh_redis), waiter)
        try:
            followers = {job: await hub.follow(job) for job in jobs}
            assert len(hub._readers) == -(-len(jobs) // STREAMS_PER_READER)
            writers = {job: StreamWriter(fresh_redis, job, clock=Clock()) for job in jobs}
            for word in ("one ", "two ", "three"):
                for job in jobs:
                    writers[job].add(Delta(text=word))  # a record each (the clock stands still)
                    writers[job].flush()
            late = await hub.follow(jobs[0], START)  # joins once the stream is read
            backend = backend_of(fresh_redis)  # (one app for the 250 jobs)
            for job in jobs:
                store_final(fresh_redis, job, backend=backend)
            for job, follower in [*followers.items(), (jobs[0], late)]:
                got: list[streams.Record] = []
                while not got or not got[-1].last:
                    record = await follower.next(10)
                    assert record is not None, job
                    got.append(record)
                assert text_of(got) == "one two three" and got[-1].end is not None, job
                follower.close()
        finally:
            await hub.close()
            await waiter.close()

    asyncio.run(main())


def test_the_hub_closes_when_a_reader_cancelled_mid_read_says_timeout(
    fresh_redis: Any, monkeypatch: Any
) -> None:
    """Under load, cancelling a reader inside redis-py's connect can come out as a
    TimeoutError (Python 3.11's asyncio.timeout), not a CancelledError: close() still
    ends the reader's loop, instead of leaving it to wait for followers for ever."""
    import asyncio

    from gateway import streaming
    from gateway.waiter import ResultWaiter

    async def read_then_swallow_the_cancel(self: Any) -> bool:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise TimeoutError("Timeout connecting to server") from None
        return False

    monkeypatch.setattr(streaming._Reader, "_read", read_then_swallow_the_cancel)

    async def main() -> bool:
        waiter = ResultWaiter(url_of(fresh_redis))
        hub = streaming.StreamHub(url_of(fresh_redis), waiter)
        follower = await hub.follow("c1")
        await asyncio.sleep(0.05)  # the reader is in its read
        follower.close()
        closing = asyncio.get_running_loop().create_task(hub.close())
        done, _ = await asyncio.wait({closing}, timeout=5)
        await waiter.close()
        return bool(done)

    # (not asyncio.run: its clean-up would wait for a reader that never ends)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(main()), "the hub's close() waits for its reader"
    finally:
        loop.close()
