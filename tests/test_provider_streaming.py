"""Provider.stream: the OpenAI-compatible adapter against the simulator streaming over real
HTTP (and a scripted upstream for the quirks of other providers), and the MLX provider on
the tiny model. A stream's text, tool calls, reasoning and usage must be complete()'s; a
failure before the first delta must be complete()'s error, one after it StreamBroken with
what was written."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub (the MLX tests)

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from router.tokens import estimate_message_tokens, estimate_tokens
from tests.fixtures import wait_until
from workers.providers.base import (
    Caller,
    Completion,
    CompletionRequest,
    Delta,
    ModelUnusable,
    Permanent,
    Provider,
    ProviderError,
    Retryable,
    StreamBroken,
    calling_for,
    on_send,
)
from workers.providers.mlx_local import MLXProvider
from workers.providers.openai_compat import OpenAICompatProvider, ShardedTransport, make_client
from workers.sim.simulator import Simulator, check_fault

MODEL = "zai/glm-4.7"
POOL = 8
TEXT = "Say hello to the whole fleet, every worker of it"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with make_client(POOL, timeout_s=10) as http:
        yield http


@pytest.fixture
def provider(sim: Simulator, client: httpx.Client) -> Iterator[OpenAICompatProvider]:
    adapter = OpenAICompatProvider(sim.url, "sk-test", client)
    yield adapter
    # every connection a stream took is back, however the stream ended
    transport = client._transport
    assert isinstance(transport, ShardedTransport)
    wait_until(lambda: sum(transport._free) == POOL, 5, "every connection back in the pool")


def request(text: str = TEXT, **kwargs: Any) -> CompletionRequest:
    return CompletionRequest(MODEL, [{"role": "user", "content": text}], **kwargs)


def drain(provider: Provider, req: CompletionRequest) -> tuple[list[Delta], Completion]:
    """Every delta of a stream that ends well, and its Completion (exactly one, last)."""
    items = list(provider.stream(req))
    *deltas, last = items
    assert all(isinstance(d, Delta) for d in deltas), items
    assert isinstance(last, Completion)
    return [d for d in deltas if isinstance(d, Delta)], last


def broken(provider: Provider, req: CompletionRequest) -> tuple[list[Delta], StreamBroken]:
    """The deltas a stream gave before it broke, and the StreamBroken it raised."""
    deltas: list[Delta] = []
    with pytest.raises(StreamBroken) as caught:
        for item in provider.stream(req):
            assert isinstance(item, Delta), "a broken stream gives no Completion"
            deltas.append(item)
    return deltas, caught.value


def joined(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def assembled(deltas: list[Delta]) -> list[dict[str, Any]]:
    """Tool calls put together from their fragments alone, as a client of the deltas would."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for fragment in delta.tool_calls:
            call = calls.setdefault(
                fragment["index"],
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
            )
            call["id"] = fragment.get("id") or call["id"]
            call["function"]["name"] += fragment["function"].get("name", "")
            call["function"]["arguments"] += fragment["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


def same_answer(streamed: Completion, whole: Completion) -> None:
    for name in (
        "text",
        "prompt_tokens",
        "completion_tokens",
        "tokens_estimated",
        "provider_cost_usd",
        "raw_model",
        "tool_calls",
        "finish_reason",
        "refusal",
        "reasoning",
    ):
        assert getattr(streamed, name) == getattr(whole, name), name


# --- the OpenAI-compatible adapter against the simulator --------------------------------


def test_text_comes_in_several_deltas_and_equals_complete(provider, sim):
    # When the same request is made whole, then streamed
    whole = provider.complete(request())
    deltas, final = drain(provider, request())
    # Then the text came in pieces that make up complete()'s text, and the final
    # Completion is complete()'s, usage included (the provider's own counts)
    assert len(deltas) >= 5
    assert all(d.text for d in deltas)
    assert joined(deltas) == final.text == whole.text
    same_answer(final, whole)
    assert final.tokens_estimated is False
    assert final.finish_reason == "stop"
    # And the upstream was asked to stream, with usage in its last chunk
    logged = sim.requests()[-1]
    assert logged["body"]["stream"] is True
    assert logged["body"]["stream_options"] == {"include_usage": True}
    assert logged["stream"] is True
    # (the simulator records the stream's end after its last write, which the client may
    # read first)
    wait_until(lambda: sim.requests()[-1]["stream_end"] == "done", 5, "the stream's end logged")
    logged = sim.requests()[-1]
    assert logged["chunks"] == len(deltas) + 4  # role, finish_reason, usage and [DONE]


@pytest.mark.parametrize("parallel", [False, True], ids=["one-call", "parallel-calls"])
def test_tool_call_deltas_assemble_to_completes_tool_calls(provider, parallel):
    text = "[[sim:parallel]] weather and time in Paris" if parallel else "weather in Paris"
    req = request(text, options={"tools": [WEATHER, CLOCK]})
    whole = provider.complete(req)
    deltas, final = drain(provider, req)
    # The calls are complete()'s, and the fragments alone give them too
    assert len(whole.tool_calls) == (2 if parallel else 1)
    assert final.tool_calls == whole.tool_calls
    assert assembled(deltas) == whole.tool_calls
    assert final.finish_reason == "tool_calls" and final.text == ""
    # Arguments came in several fragments, each call's first fragment naming it
    assert sum(len(d.tool_calls) for d in deltas) > 2 * len(whole.tool_calls)
    firsts = [f for d in deltas for f in d.tool_calls if "id" in f]
    assert [f["function"]["name"] for f in firsts] == [
        c["function"]["name"] for c in whole.tool_calls
    ]
    assert all(f["type"] == "function" for f in firsts)
    same_answer(final, whole)


def test_usage_and_provider_cost_reach_the_final_completion(provider, sim):
    sim.configure(models={MODEL: {"cost": 0.00125}})
    _, final = drain(provider, request())
    assert final.provider_cost_usd == 0.00125
    assert final.prompt_tokens == estimate_message_tokens(request().messages)
    assert final.completion_tokens == estimate_tokens(final.text)
    assert final.tokens_estimated is False


def test_a_stream_without_usage_is_estimated_and_flagged(provider, sim):
    sim.configure(models={MODEL: {"usage": False}})
    whole = provider.complete(request())
    _, final = drain(provider, request())
    assert final.tokens_estimated is True
    same_answer(final, whole)


def test_reasoning_and_logprobs_stream_too(provider):
    req = request(options={"reasoning_effort": "low", "logprobs": True, "top_logprobs": 2})
    whole = provider.complete(req)
    deltas, final = drain(provider, req)
    assert "".join(d.reasoning for d in deltas) == final.reasoning == whole.reasoning
    assert final.reasoning
    # the reasoning came before the text, as a thinking model writes it
    first_text = next(i for i, d in enumerate(deltas) if d.text)
    assert all(d.reasoning for d in deltas[:first_text])
    assert final.logprobs is not None and whole.logprobs is not None
    assert final.logprobs["content"] == whole.logprobs["content"]
    same_answer(final, whole)


@pytest.mark.parametrize("flag", ["refuse", "filter"])
def test_a_refusal_or_a_filtered_answer_ends_as_completes(provider, flag):
    req = request(f"[[sim:{flag}]] something")
    whole = provider.complete(req)
    deltas, final = drain(provider, req)
    assert deltas == []  # neither writes text
    same_answer(final, whole)
    assert (final.refusal is not None) == (flag == "refuse")


def test_the_sdk_reads_the_simulators_stream(sim):
    # The official client, as the gateway's users will read streams, agrees with the shape
    sdk = openai.OpenAI(base_url=sim.url, api_key="sk-test", max_retries=0)
    asked: Any = {
        "model": MODEL,
        "messages": [{"role": "user", "content": TEXT}],
        "stream_options": {"include_usage": True},
        "tools": [WEATHER],
        "tool_choice": "none",
    }
    chunks = list(sdk.chat.completions.create(stream=True, **asked))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"[sim {MODEL}] {TEXT}"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == estimate_tokens(text)
    # and takes the simulated mid-stream error for an error, as it does OpenRouter's
    with pytest.raises(openai.APIError, match="mid-stream"):
        asked["messages"] = [{"role": "user", "content": "[[sim:*=error-after:3]] hi"}]
        list(sdk.chat.completions.create(stream=True, **asked))


# --- failures before the first delta: complete()'s errors --------------------------------

FAULTS = [
    # fault, error class, kind
    ("429", Retryable, "rate_limited"),
    ("429:7", Retryable, "rate_limited"),
    ("408", Retryable, "timeout"),
    ("500", Retryable, "server_error"),
    ("503", Retryable, "server_error"),
    ("400", Permanent, "bad_request"),
    ("401", ModelUnusable, "auth"),
    ("404", ModelUnusable, "not_found"),
    ("malformed", Retryable, "malformed"),
    ("empty", Retryable, "empty"),
    ("reset", Retryable, "connection"),
    ("timeout", Retryable, "timeout"),
    ("stall", Retryable, "timeout"),
]


@pytest.mark.parametrize(("fault", "error", "kind"), FAULTS, ids=[f[0] for f in FAULTS])
def test_a_fault_before_the_first_chunk_raises_completes_error(provider, fault, error, kind):
    req = request(f"[[sim:*={fault}]] hi", timeout_s=0.5)
    with pytest.raises(ProviderError) as whole:
        provider.complete(req)
    started = time.monotonic()
    with pytest.raises(ProviderError) as streamed:
        next(provider.stream(req))  # fails before its first delta
    assert type(streamed.value) is type(whole.value) is error
    assert streamed.value.kind == whole.value.kind == kind
    assert streamed.value.retry_after_s == whole.value.retry_after_s
    if fault == "429:7":
        assert streamed.value.retry_after_s == 7
    assert "sk-test" not in str(streamed.value)
    assert time.monotonic() - started < 5  # a held stream is given up at timeout_s


def test_a_model_refusing_tools_refuses_a_stream_as_complete(provider, sim):
    sim.configure(models={MODEL: {"tools": False}})
    req = request("weather?", options={"tools": [WEATHER]})
    with pytest.raises(ModelUnusable) as whole:
        provider.complete(req)
    with pytest.raises(ModelUnusable) as streamed:
        list(provider.stream(req))
    assert streamed.value.kind == whole.value.kind == "unsupported"


def test_an_error_event_before_any_text_is_a_server_error(provider):
    with pytest.raises(Retryable) as caught:
        list(provider.stream(request("[[sim:*=error-after:1]] hi")))
    assert type(caught.value) is Retryable and caught.value.kind == "server_error"


# --- failures after it: StreamBroken with what was written --------------------------------


def test_a_cut_mid_stream_raises_stream_broken_with_the_partial_text(provider, sim):
    full = provider.complete(request()).text
    deltas, exc = broken(provider, request(f"[[sim:*=cut-after:5]] {TEXT}"))
    # role chunk + 4 pieces of text went out before the cut
    assert len(deltas) == 4
    partial = exc.partial
    assert partial.text == joined(deltas) and full.startswith(partial.text)
    assert partial.tokens_estimated is True
    assert partial.completion_tokens == estimate_tokens(partial.text) > 0
    assert partial.prompt_tokens == estimate_message_tokens(
        request(f"[[sim:*=cut-after:5]] {TEXT}").messages
    )
    assert (exc.kind, exc.action) == ("stream_broken", "retry")
    assert isinstance(exc, Retryable)
    assert "connection" in exc.message
    assert json.loads(json.dumps(exc.to_dict()))["partial"]["chars"] == len(partial.text)
    wait_until(lambda: sim.requests()[-1]["stream_end"] == "cut", 5, "the cut logged")


def test_an_error_event_mid_stream_raises_stream_broken(provider, sim):
    deltas, exc = broken(provider, request(f"[[sim:*=error-after:3]] {TEXT}"))
    assert len(deltas) == 2
    assert exc.partial.text == joined(deltas) and exc.partial.text
    assert "server_error" in exc.message and "mid-stream" in exc.message
    wait_until(lambda: sim.requests()[-1]["stream_end"] == "error", 5, "the error logged")


def test_tool_calls_broken_mid_stream_keep_their_fragments(provider):
    req = request("[[sim:*=cut-after:4]] weather", options={"tools": [WEATHER]})
    deltas, exc = broken(provider, req)
    [call] = exc.partial.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert call == assembled(deltas)[0]
    assert exc.partial.completion_tokens > 0


def test_a_read_timeout_mid_stream_raises_stream_broken(provider):
    started = time.monotonic()
    deltas, exc = broken(provider, request(f"[[sim:*=stall-after:4]] {TEXT}", timeout_s=0.4))
    assert 0.4 <= time.monotonic() - started < 5
    assert len(deltas) == 3 and exc.partial.text == joined(deltas)
    assert "timeout" in exc.message


def test_stream_fault_names():
    for name in ("cut-after:0", "error-after:3", "stall-after:12"):
        assert check_fault(name) == name
    for name in ("cut-after", "cut-after:x", "error-after:-1", "stall-after:1:2"):
        with pytest.raises(ValueError):
            check_fault(name)


def test_a_mid_stream_fault_spares_a_request_that_does_not_stream(provider):
    assert provider.complete(request("[[sim:*=cut-after:2]] hi")).text.endswith("hi")


# --- timing, the caller, the connection ---------------------------------------------------


def test_deltas_arrive_as_the_upstream_sends_them(provider, sim):
    # Given an upstream sending one chunk every 60 ms
    sim.configure(models={MODEL: {"chunk_ms": 60}})
    started = time.monotonic()
    seen = [time.monotonic() - started for _ in provider.stream(request())]
    # Then the first delta came long before the last, each about a chunk apart
    count = len(seen) - 1  # deltas; the Completion last
    assert count >= 5
    assert seen[-1] >= 0.06 * (count + 1)
    assert seen[0] < seen[-1] / 2
    gaps = sorted(b - a for a, b in itertools.pairwise(seen[:-1]))
    assert gaps[len(gaps) // 2] >= 0.03, gaps  # the median: a loaded machine may bunch some


def test_the_caller_header_and_the_send_hook_as_in_complete(provider, sim):
    sent: list[int] = []
    with calling_for(Caller("job-s:1", 0, 2, process="w1")), on_send(lambda: sent.append(1)):
        drain(provider, request())
    logged = sim.requests()[-1]
    assert (logged["job"], logged["job_message"], logged["job_delivery"]) == ("job-s:1", 0, 2)
    assert logged["job_process"] == "w1"
    assert sent == [1]


def test_a_hook_that_refuses_stops_the_stream_before_it_leaves(provider, sim):
    def refuse() -> None:
        raise Retryable("superseded", "not this delivery")

    with on_send(refuse), pytest.raises(Retryable) as caught:
        next(provider.stream(request()))
    assert caught.value.kind == "superseded"
    assert sim.requests() == []


def test_a_caller_that_stops_reading_frees_the_connection(provider, sim, client):
    # Given a slow stream, read for its first delta only
    sim.configure(models={MODEL: {"chunk_ms": 50}})
    stream = provider.stream(request())
    assert isinstance(next(stream), Delta)
    stream.close()
    # Then the upstream sees the client go, and the pool has its connection back
    wait_until(lambda: sim.requests()[-1]["stream_end"] == "gone", 5, "the client gone")
    transport = client._transport
    assert sum(transport._free) == POOL
    # And connections stay usable: many streams in turn, with keep-alive
    sim.configure(models={MODEL: {"chunk_ms": 0}})
    for _ in range(20):
        drain(provider, request())
    ports = {r["client_port"] for r in sim.requests()[-20:]}
    assert len(ports) < 20  # connections were reused


def test_a_caller_may_stop_at_the_completion(provider, client):
    # The connection is back before the Completion is given
    stream = provider.stream(request())
    final = next(item for item in stream if isinstance(item, Completion))
    assert final.text
    assert sum(client._transport._free) == POOL


# --- other providers' streams: a scripted upstream over real HTTP ------------------------


class Scripted:
    """An upstream answering every request with one scripted HTTP response, then closing
    the connection: for the shapes other providers stream that the simulator does not."""

    def __init__(self) -> None:
        self.answer = b""
        self.bodies: list[dict[str, Any]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += conn.recv(65536)
                self.bodies.append(json.loads(body))
                conn.sendall(self.answer)

    def respond(self, content_type: str, body: bytes) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n"
        self.answer = head.encode() + body

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted(client: httpx.Client) -> Iterator[tuple[Scripted, OpenAICompatProvider]]:
    upstream = Scripted()
    yield upstream, OpenAICompatProvider(upstream.url, "sk-test", client)
    upstream.close()


def sse(*events: Any, done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" if not isinstance(e, str) else e for e in events]
    return ("".join(lines) + ("data: [DONE]" if done else "")).encode()


def piece(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "gen-1", "model": "vendor/model", "choices": [choice], **extra}


def test_openrouter_style_stream(scripted):
    # Keep-alive comments, `reasoning` (not reasoning_content), tool-call fragments with
    # neither index nor id, and usage with its cost in the chunk that ends the answer
    upstream, provider = scripted
    upstream.respond(
        "text/event-stream; charset=utf-8",
        sse(
            ": OPENROUTER PROCESSING\n\n",
            piece({"role": "assistant", "reasoning": "Think"}),
            piece({"reasoning": "ing."}),
            ": OPENROUTER PROCESSING\n\n",
            piece({"content": "Calling."}),
            piece({"tool_calls": [{"function": {"name": "get_time", "arguments": '{"tz"'}}]}),
            piece({"tool_calls": [{"function": {"arguments": ': "UTC"}'}}]}),
            piece(
                {},
                "tool_calls",
                usage={"prompt_tokens": 11, "completion_tokens": 7, "cost": 0.0004},
            ),
        ),
    )
    deltas, final = drain(provider, request())
    assert upstream.bodies[0]["stream"] is True
    assert "".join(d.reasoning for d in deltas) == final.reasoning == "Thinking."
    assert joined(deltas) == final.text == "Calling."
    [call] = final.tool_calls
    assert call["function"] == {"name": "get_time", "arguments": '{"tz": "UTC"}'}
    assert call["id"].startswith("call_")  # made up, and the same in the deltas
    assert assembled(deltas) == final.tool_calls
    assert (final.prompt_tokens, final.completion_tokens) == (11, 7)
    assert final.provider_cost_usd == 0.0004 and final.tokens_estimated is False
    assert (final.raw_model, final.finish_reason) == ("vendor/model", "tool_calls")


def test_a_server_that_answers_whole_is_streamed_in_one_delta(scripted):
    upstream, provider = scripted
    answer = {
        "id": "x",
        "model": "m",
        "choices": [{"message": {"content": "all at once"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3},
    }
    upstream.respond("application/json", json.dumps(answer).encode())
    deltas, final = drain(provider, request())
    assert [d.text for d in deltas] == ["all at once"] and final.text == "all at once"
    assert (final.prompt_tokens, final.completion_tokens) == (3, 3)


def test_a_stream_that_ends_without_its_end_is_broken(scripted):
    upstream, provider = scripted
    upstream.respond("text/event-stream", sse(piece({"content": "half"}), done=False))
    deltas, exc = broken(provider, request())
    assert exc.partial.text == "half" == joined(deltas)
    assert "ended early" in exc.message


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("text/html", b"<html>Bad gateway, but 200</html>"), ("application/json", b"[1, 2")],
)
def test_a_200_that_is_no_answer_is_malformed_as_in_complete(scripted, content_type, body):
    upstream, provider = scripted
    upstream.respond(content_type, body)
    with pytest.raises(Retryable) as whole:
        provider.complete(request())
    with pytest.raises(Retryable) as streamed:
        list(provider.stream(request()))
    assert type(streamed.value) is Retryable
    assert streamed.value.kind == whole.value.kind == "malformed"


def test_a_garbled_event_mid_stream_is_broken(scripted):
    upstream, provider = scripted
    upstream.respond("text/event-stream", sse(piece({"content": "ok"}), "data: {garbled\n\n"))
    _, exc = broken(provider, request())
    assert exc.partial.text == "ok" and "malformed" in exc.message


# --- the MLX provider on the tiny model ---------------------------------------------------


@pytest.fixture(scope="module")
def mlx(tiny_model_dir: Path) -> Iterator[MLXProvider]:
    local = MLXProvider(tiny_model_dir)
    local.load()
    yield local
    local.close()


def local(text: Any = "Tell me a short story about a cat.", **kwargs: Any) -> CompletionRequest:
    kwargs.setdefault("max_tokens", 24)
    return CompletionRequest("tiny", [{"role": "user", "content": text}], **kwargs)


def test_mlx_streams_several_deltas_with_the_real_counts(mlx):
    whole = mlx.complete(local())
    deltas, final = drain(mlx, local())
    assert len(deltas) >= 5
    assert joined(deltas) == final.text == whole.text
    assert (final.prompt_tokens, final.completion_tokens) == (
        whole.prompt_tokens,
        whole.completion_tokens,
    )
    assert final.tokens_estimated is False
    assert final.finish_reason == whole.finish_reason


def test_mlx_never_streams_a_stop_string(mlx):
    full = mlx.complete(local()).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    req = local(options={"stop": stop})
    whole = mlx.complete(req)
    deltas, final = drain(mlx, req)
    assert joined(deltas) == final.text == whole.text == full[: full.index(stop)]
    assert final.finish_reason == "stop"


def test_mlx_errors_before_the_first_delta_are_completes(mlx, tmp_path):
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]
    with pytest.raises(Permanent):
        next(mlx.stream(local(image)))
    missing = MLXProvider(tmp_path / "no-model")
    try:
        with pytest.raises(ModelUnusable):
            next(missing.stream(local()))
    finally:
        missing.close()


def long(**kwargs: Any) -> CompletionRequest:
    """A sample the tiny model writes ~1,000 tokens of before its end (over a second)."""
    options = {"seed": 0}
    return local("Tell me everything.", max_tokens=3000, temperature=1.0, options=options, **kwargs)


def test_mlx_timeout_mid_stream_is_broken_with_real_counts(mlx):
    deltas, exc = broken(mlx, long(timeout_s=0.5))
    assert deltas and exc.partial.text == joined(deltas)
    assert exc.partial.tokens_estimated is False
    assert exc.partial.completion_tokens >= len(deltas) > 0
    assert "timeout" in exc.message
    # The generation stopped: the next call is answered at once
    assert mlx.complete(local(max_tokens=4)).completion_tokens <= 4


def test_mlx_a_slow_reader_of_a_finished_generation_reads_it_whole(mlx):
    whole = mlx.complete(local())
    stream = mlx.stream(local(timeout_s=0.3))
    first = next(stream)
    time.sleep(0.6)  # the generation ends meanwhile: the deadline no longer applies
    *rest, final = list(stream)
    assert isinstance(first, Delta) and isinstance(final, Completion)
    assert final.text == whole.text == first.text + joined(rest)


def test_mlx_a_caller_that_stops_reading_stops_the_generation(mlx):
    started = time.monotonic()
    assert mlx.complete(long()).completion_tokens > 500
    whole_s = time.monotonic() - started
    # When a caller reads the first delta of the same sample and goes away
    stream = mlx.stream(long())
    assert isinstance(next(stream), Delta)
    stream.close()
    # Then the generation stops at its next token: the next call does not wait for it
    started = time.monotonic()
    assert mlx.complete(local(max_tokens=4)).completion_tokens <= 4
    assert time.monotonic() - started < whole_s / 2


def test_both_adapters_are_providers(mlx, provider):
    adapters: list[Provider] = [mlx, provider]  # mypy checks the protocol here
    assert all(callable(a.stream) for a in adapters)
