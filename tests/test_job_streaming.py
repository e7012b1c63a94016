"""Streaming jobs through the fleet: real workers stream their call's deltas to the job's
Redis Stream and `JobHandle.stream()` yields them, then the Result (docs/streaming.md).
The simulator streams as OpenAI does; the tiny MLX model streams in-process."""

from __future__ import annotations

import time
from typing import Any

import pytest

from client import dispatch
from router import JobFailed
from router.errors import StreamInterrupted
from router.results import Delta, Result
from workers.state import streams
from workers.state.connections import redis_client

TIMEOUT_S = 60
PRIMARY = "MiniMax-M2.1"  # fast_general's first model, on the subscription queue


def ask(text: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "stream": True, **fields}


def pieces_of(handle: Any) -> tuple[list[Delta], Result]:
    got = list(handle.stream(timeout=TIMEOUT_S))
    *deltas, result = got
    assert all(isinstance(d, Delta) for d in deltas) and isinstance(result, Result)
    return deltas, result


@pytest.fixture
def slow_chunks(simulator: Any) -> Any:
    """Every simulated model streams a chunk each 40 ms: a stream of several batches."""
    simulator.configure(default={"chunk_ms": 40})
    yield simulator
    simulator.reset()


def test_a_streaming_job_yields_its_deltas_then_its_result(fleet_app, slow_chunks) -> None:
    handle = dispatch(
        ask("Tell the user a very short story about a fleet", task_class="fast_general")
    )
    deltas, result = pieces_of(handle)
    assert result.ok and result.model == f"minimax/{PRIMARY}"
    # the text came in several pieces, which joined are the answer
    assert len(deltas) >= 3
    assert "".join(d.text for d in deltas) == result.text
    # the stream's first record names the model that streams (the gateway's headers)
    first = streams.read(redis_client(), handle.id, block_ms=None)[0]
    assert first.heading == {"model": result.model, "queue": "subscription"}
    # the upstream was asked to stream, and really streamed
    seen = [r for r in slow_chunks.requests() if (r.get("job") or "") == handle.id]
    assert [r["stream"] for r in seen] == [True] and seen[0]["stream_end"] == "done"


def test_a_failure_before_the_first_token_moves_down_the_chain_unseen(
    fleet_app, slow_chunks
) -> None:
    handle = dispatch(ask(f"[[sim:{PRIMARY}=503]] say hi", task_class="fast_general"))
    deltas, result = pieces_of(handle)
    # Every delta is the second model's: nothing of the failed first try reached the reader
    assert result.ok and result.queue_path == ["subscription", "free"]
    assert "".join(d.text for d in deltas) == result.text
    assert result.text and result.text.startswith("[sim meta-llama/") and PRIMARY not in result.text


def test_an_upstream_error_mid_stream_ends_the_stream_and_the_job_goes_on(
    fleet_app, slow_chunks
) -> None:
    # The primary sends its role and a few words, then OpenRouter's error event
    handle = dispatch(
        ask(f"[[sim:{PRIMARY}=error-after:4]] a longer answer please", task_class="fast_general")
    )
    got: list[Delta] = []
    with pytest.raises(StreamInterrupted) as stopped:
        for piece in handle.stream(timeout=TIMEOUT_S):
            assert isinstance(piece, Delta)
            got.append(piece)
    # Part of the answer went out, then the stream said why it stopped, naming the job
    assert got and "".join(d.text for d in got).startswith("[sim MiniMax")
    assert stopped.value.result["job_id"] == handle.id
    assert stopped.value.result["kind"] == "stream_broken"
    # The job went on, unstreamed, to the next model: its Result comes from get()
    result = handle.get(timeout=TIMEOUT_S)
    assert result.ok and result.queue_path == ["subscription", "free"]
    broken = result.attempts[0]
    assert (broken.outcome, broken.error_kind) == ("error", "stream_broken")
    # the broken call is billed for what it wrote
    assert broken.prompt_tokens > 0 and broken.completion_tokens > 0
    # and the stream holds nothing after its error: no text of the second model
    records = streams.read(redis_client(), handle.id, block_ms=None)
    assert records[-1].error is not None
    assert "".join(r.delta.text for r in records if r.delta) == "".join(d.text for d in got)


def test_a_job_that_fails_before_any_text_raises_as_get_does(fleet_app, simulator) -> None:
    handle = dispatch(ask("[[sim:*=400]] bad", task_class="fast_general"))
    with pytest.raises(JobFailed) as caught:
        list(handle.stream(timeout=TIMEOUT_S))
    assert caught.value.result["job_id"] == handle.id and not caught.value.result["ok"]


def test_the_local_mlx_model_streams_through_the_fleet(fleet_app) -> None:
    handle = dispatch(ask("ping", task_class="heartbeat", source="heartbeat", max_tokens=12))
    deltas, result = pieces_of(handle)
    assert result.ok and result.model == "local/qwen3-mlx"
    assert deltas and "".join(d.text for d in deltas) == result.text
    assert not result.attempts[0].tokens_estimated


def test_a_job_sent_without_stream_yields_its_whole_answer_once(fleet_app, simulator) -> None:
    handle = dispatch({**ask("whole please", task_class="fast_general"), "stream": False})
    started = time.monotonic()
    deltas, result = pieces_of(handle)
    assert time.monotonic() - started < TIMEOUT_S
    assert [d.text for d in deltas] == [result.text]
