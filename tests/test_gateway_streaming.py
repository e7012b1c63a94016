"""`stream: true` through `fleet serve`, read with the official openai SDK's streaming client
and with plain SSE (httpx): text, tool calls and usage in OpenAI's chunk format; a real
status before the first token; an error event after it; a resume with Last-Event-ID that
yields exactly the rest; a client that leaves stops and pays for its job's call. Behind
the gateway, the test fleet's real workers, the simulator and the tiny MLX model."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures import ledger_rows, reset_live_state
from tests.test_gateway import Gateway, client, gateway_fixture, new_key
from tests.test_gateway_chat_api import WEATHER

ROUTE = "fleet/fast_general"
UNLIMITED = "litellm/qwen3-next-free"  # no request limit, no quota
PRIMARY = "MiniMax-M2.1"  # its first model (subscription queue)


gateway = gateway_fixture("gateway-stream", 30)


@pytest.fixture(scope="module", autouse=True)
def _forget_faults(fleet_env) -> Iterator[None]:
    """This module's scripted failures cool models down and open circuits: the modules
    after it meet every model usable."""
    yield
    reset_live_state(fleet_env)


@pytest.fixture(scope="module")
def key(fleet_env) -> str:
    return new_key(fleet_env, "streaming-app")


@pytest.fixture(scope="module")
def sdk(gateway, key) -> openai.OpenAI:
    return client(gateway, key)


@pytest.fixture
def slow(simulator: Any) -> Iterator[Any]:
    """Simulated models stream a chunk every 60 ms: an answer takes about a second."""
    simulator.configure(default={"chunk_ms": 60})
    yield simulator
    simulator.reset()


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def job_state(gateway: Gateway, key: str, job_id: str, until: tuple[str, ...]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        state: dict[str, Any] = httpx.get(
            f"{gateway.url}/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}
        ).json()
        if state["status"] in until or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def events(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(id, data) of each server-sent event."""
    event_id: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])


def text_of(datas: list[str]) -> str:
    out = []
    for data in datas:
        if data != "[DONE]":
            for choice in json.loads(data).get("choices", []):
                out.append(choice["delta"].get("content") or "")
    return "".join(out)


def test_the_sdk_streams_text_with_usage_and_cost_in_the_last_chunk(sdk, slow) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model=ROUTE,
        messages=user("Tell me a short story about ships"),
        stream=True,
        stream_options={"include_usage": True},
    )
    # The headers name the model that streams, known at its first token
    assert raw.headers["x-fleet-model"] == f"minimax/{PRIMARY}"
    assert raw.headers["x-fleet-queue"] == "subscription"
    assert raw.headers["content-type"].startswith("text/event-stream")
    job_id = raw.headers["x-fleet-job-id"]
    chunks = list(raw.parse())
    assert len(chunks) >= 4
    assert {c.id for c in chunks} == {f"chatcmpl-{job_id}"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(f"[sim {PRIMARY}] Tell me a short story")
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    # Usage only in the last chunk, which has no choices, with the cost, as OpenAI's
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens > 0 and last.usage.completion_tokens > 0
    assert (last.usage.model_extra or {}).get("cost") is not None
    assert all(c.usage is None for c in chunks[:-1])
    # The upstream was asked to stream
    calls = [r for r in slow.requests() if r.get("job") == job_id]
    assert [c["stream"] for c in calls] == [True]


def test_the_sdk_streams_tool_calls(sdk, simulator) -> None:
    stream = sdk.chat.completions.create(
        model="fleet/user_facing",
        messages=user("What's the weather in Paris?"),
        tools=[WEATHER],
        stream=True,
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for fragment in choice.delta.tool_calls or []:
                call = calls.setdefault(fragment.index, {"id": None, "name": "", "args": ""})
                call["id"] = fragment.id or call["id"]
                if fragment.function is not None:
                    call["name"] += fragment.function.name or ""
                    call["args"] += fragment.function.arguments or ""
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    arguments = json.loads(calls[0]["args"])
    assert set(arguments) == {"city", "units"} and calls[0]["id"].startswith("call_")


def test_the_tiny_mlx_model_streams_through_the_gateway(sdk) -> None:
    stream = sdk.chat.completions.create(
        model="local/qwen3-mlx",
        messages=user("ping"),
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 12


def test_a_failure_before_the_first_token_gets_a_real_status(sdk) -> None:
    # A request every model refuses (400): as a request that does not stream would get
    with pytest.raises(openai.BadRequestError) as refused:
        list(
            sdk.chat.completions.create(model=ROUTE, messages=user("[[sim:*=400]] x"), stream=True)
        )
    assert refused.value.status_code == 400
    # Every model failing: 502, with each attempt, before any event
    with pytest.raises(openai.APIStatusError) as failed:
        list(
            sdk.chat.completions.create(
                model="fleet/creative", messages=user("[[sim:*=500]] x"), stream=True
            )
        )
    assert failed.value.status_code == 502
    assert isinstance(failed.value.body, dict) and failed.value.body["attempts"]


def test_a_failure_of_the_first_model_before_text_is_not_seen(sdk, slow) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model=ROUTE, messages=user(f"[[sim:{PRIMARY}=503]] hello"), stream=True
    )
    assert raw.headers["x-fleet-queue"] == "free"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text.startswith("[sim meta-llama/") and PRIMARY not in text


def test_an_upstream_error_mid_stream_ends_with_an_error_event_and_the_job_goes_on(
    gateway, key, sdk, slow
) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model=ROUTE, messages=user(f"[[sim:{PRIMARY}=error-after:4]] go on"), stream=True
    )
    job_id = raw.headers["x-fleet-job-id"]
    text: list[str] = []
    with pytest.raises(openai.APIError) as broke:
        for chunk in raw.parse():
            text.extend(c.delta.content or "" for c in chunk.choices)
    # Part of the answer went out, then the error event, which names the job
    assert "".join(text).startswith("[sim MiniMax")
    body = broke.value.body
    assert isinstance(body, dict) and body["job_id"] == job_id
    assert body["code"] == "stream_broken"
    # The job went on to the next model; its Result is at the job API
    state = job_state(gateway, key, job_id, ("success",))
    result = state["result"]
    assert result["ok"] and result["queue_path"] == ["subscription", "free"]
    first = result["attempts"][0]
    assert first["error_kind"] == "stream_broken" and first["completion_tokens"] > 0


def test_a_resume_with_last_event_id_yields_exactly_the_rest(gateway, key, fleet_env, slow) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": ROUTE, "messages": user("Count the ships in the harbour slowly")}
    # A job sent with POST /v1/jobs, streaming, followed from the start
    sent = httpx.post(
        f"{gateway.url}/jobs",
        json={"task_class": "fast_general", "messages": body["messages"], "stream": True},
        headers=headers,
    )
    assert sent.status_code == 202, sent.text
    job_id = sent.json()["id"]
    url = f"{gateway.url}/jobs/{job_id}/stream"
    seen: list[tuple[str | None, str]] = []
    with httpx.stream("GET", url, headers=headers, timeout=30) as first:
        assert first.status_code == 200
        assert first.headers["x-fleet-job-id"] == job_id
        for found in events(first.iter_lines()):
            seen.append(found)
            if len(seen) == 2:
                break  # the connection drops
    last_id = seen[-1][0]
    assert last_id
    # Reconnecting with the last id it saw, the client gets the rest and nothing again
    with httpx.stream(
        "GET", url, headers={**headers, "Last-Event-ID": last_id}, timeout=30
    ) as rest:
        tail = list(events(rest.iter_lines()))
    assert tail[-1][1] == "[DONE]"
    assert not {i for i, _ in seen} & {i for i, _ in tail if i}
    # and the whole, from the start again, is what the two parts make
    with httpx.stream("GET", url, headers=headers, timeout=30) as again:
        whole = list(events(again.iter_lines()))
    assert text_of([d for _, d in seen]) + text_of([d for _, d in tail]) == text_of(
        [d for _, d in whole]
    )
    result = job_state(gateway, key, job_id, ("success",))["result"]
    assert text_of([d for _, d in whole]) == result["text"]
    # A bad cursor is refused in one line
    bad = httpx.get(url, headers={**headers, "Last-Event-ID": "yesterday"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]["message"]
    # and another app's key sees no such job
    other = {"Authorization": f"Bearer {new_key(fleet_env, 'someone-else')}"}
    assert httpx.get(url, headers=other).status_code == 404


def test_a_client_that_leaves_mid_stream_stops_its_job_and_pays_for_what_was_made(
    gateway, key, fleet_env, simulator
) -> None:
    # A stream of a chunk every 300 ms: several seconds long
    simulator.configure(default={"chunk_ms": 300})
    try:
        headers = {"Authorization": f"Bearer {key}"}
        body = {
            "model": ROUTE,
            "messages": user("A long answer about the sea and its ships and ports please"),
            "stream": True,
        }
        with httpx.stream(
            "POST", f"{gateway.url}/chat/completions", json=body, headers=headers, timeout=30
        ) as reply:
            job_id = reply.headers["x-fleet-job-id"]
            for _ in events(reply.iter_lines()):
                break  # one event, then the client goes away
        state = job_state(gateway, key, job_id, ("revoked",))
        assert state["status"] == "revoked"
        call = state["result"]["attempts"][0]
        # The call was stopped, and billed for what it wrote, estimated and flagged so
        assert call["error_kind"] == "revoked"
        assert call["completion_tokens"] > 0 and call["tokens_estimated"]
        # The provider saw its client go before the stream's end
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ends = [r.get("stream_end") for r in simulator.requests() if r.get("job") == job_id]
            if ends and ends[-1] is not None:
                break
            time.sleep(0.1)
        assert ends == ["gone"]
        # And the ledger has the stopped call, from the job's final state
        rows = list(ledger_rows(fleet_env, job_id).values())
        assert [(r["outcome"], r["error_kind"], r["tokens_estimated"]) for r in rows] == [
            ("error", "revoked", True)
        ]
        assert rows[0]["completion_tokens"] == call["completion_tokens"]
    finally:
        simulator.reset()


def test_fuzzed_streaming_bodies_end_well_or_are_refused_whole(
    gateway, fleet_env, simulator
) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.test_gateway import chat_fields

    fuzz_key = new_key(fleet_env, "stream-fuzzer")
    headers = {"Authorization": f"Bearer {fuzz_key}"}
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    fields = chat_fields(scalars)
    body = st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True).flatmap(
        lambda names: st.fixed_dictionaries(
            {
                "model": st.sampled_from([ROUTE, "fleet/user_facing", "fleet/cost_free"]),
                "messages": st.just(user("fuzz the stream")),
                "stream": st.just(True),
                **{name: fields[name] for name in names if name != "stream"},
            }
        )
    )
    outcomes: list[str] = []

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(body=body)
    def door(body: dict[str, Any]) -> None:
        sent = json.dumps(body)  # (Infinity and NaN too: the gateway refuses them)
        with httpx.stream(
            "POST", f"{gateway.url}/chat/completions", content=sent, headers=headers, timeout=60
        ) as reply:
            if reply.status_code != 200:
                # Refused or failed before its first token: one JSON error, never a 500
                assert reply.status_code < 500 or reply.status_code in (502, 503, 504)
                assert json.loads(reply.read())["error"]["message"]
                outcomes.append(str(reply.status_code))
                return
            assert reply.headers["content-type"].startswith("text/event-stream")
            job_id = reply.headers["x-fleet-job-id"]
            got = list(events(reply.iter_lines()))
        datas = [d for _, d in got]
        # It ends with [DONE], or with an error event naming the job
        if datas[-1] != "[DONE]":
            assert json.loads(datas[-1])["error"]["job_id"] == job_id
            outcomes.append("error event")
            return
        outcomes.append("done")
        chunks = [json.loads(d) for d in datas[:-1]]
        assert {c["id"] for c in chunks} == {f"chatcmpl-{job_id}"}
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] is not None and not any(finishes[:-1])
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
        # The text streamed is the job's answer
        result = job_state(gateway, fuzz_key, job_id, ("success",))["result"]
        assert text_of(datas) == (result["text"] or "")

    door()
    # Most were answered, streamed to their end
    assert outcomes.count("done") > len(outcomes) // 3, outcomes


def redis_connections(pid: int, redis_port: int) -> int:
    """The TCP connections process `pid` holds to `redis_port` (/proc: its socket inodes
    matched against the kernel's TCP table)."""
    import os
    from pathlib import Path

    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            if parts[9] in inodes and remote_port == redis_port and parts[3] == "01":
                count += 1
    return count


def threads_of(pid: int) -> int:
    from pathlib import Path

    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("Threads:")).split()[1])


def test_streams_held_at_once_take_no_thread_or_redis_connection_each(
    gateway, key, fleet_env, simulator
) -> None:
    import asyncio
    from urllib.parse import urlsplit

    redis_port = int(urlsplit(fleet_env["FLEET_BROKER_URL"]).port or 6379)
    pid = gateway.process.pid
    headers = {"Authorization": f"Bearer {key}"}
    many = 100
    # (the worker runs 8 at once: the rest wait in the queue, their requests held open)
    simulator.configure(default={"chunk_ms": 30})
    try:
        # A first stream warms the gateway's pools
        with httpx.stream(
            "POST",
            f"{gateway.url}/chat/completions",
            json={"model": ROUTE, "messages": user("warm up"), "stream": True},
            headers=headers,
            timeout=30,
        ) as warm:
            assert list(events(warm.iter_lines()))[-1][1] == "[DONE]"
        before = (threads_of(pid), redis_connections(pid, redis_port))
        during: list[tuple[int, int]] = []

        async def one(client: httpx.AsyncClient, n: int) -> str:
            # A model without request limits or quota: on fast_general's chain the
            # subscription's quota (80 a window for this class) and OpenRouter's 20
            # a minute, spent by the module's fuzz, held the last streams past 30 s.
            body = {"model": UNLIMITED, "messages": user(f"stream number {n}"), "stream": True}
            async with client.stream(
                "POST", f"{gateway.url}/chat/completions", json=body, headers=headers
            ) as reply:
                lines = [line async for line in reply.aiter_lines()]
            return "\n".join(lines)

        async def watch(done: asyncio.Event) -> None:
            while not done.is_set():
                during.append((threads_of(pid), redis_connections(pid, redis_port)))
                await asyncio.sleep(0.2)

        async def main() -> list[str]:
            limits = httpx.Limits(max_connections=many + 10)
            async with httpx.AsyncClient(limits=limits, timeout=120) as client:
                done = asyncio.Event()
                watcher = asyncio.create_task(watch(done))
                replies = await asyncio.gather(*(one(client, n) for n in range(many)))
                done.set()
                await watcher
                return replies

        replies = asyncio.run(main())
    finally:
        simulator.reset()
    # Every stream went to its end
    unfinished = [r[-300:] for r in replies if not r.rstrip().endswith("data: [DONE]")]
    assert not unfinished, f"{len(unfinished)} streams did not end; the first: {unfinished[0]}"
    # while the gateway's threads and Redis connections stayed what a few requests use
    most_threads = max(t for t, _ in during)
    most_connections = max(c for _, c in during)
    assert most_threads <= before[0] + 10, (before, most_threads)
    assert most_connections <= before[1] + 10, (before, most_connections)


def test_reasoning_streams_as_reasoning_content_before_the_text(sdk) -> None:
    from client.dispatch import current_catalog

    reasoner = next(
        m.id
        for m in current_catalog().models
        if m.supports("reasoning") and not m.id.startswith("local/")
    )
    stream = sdk.chat.completions.create(
        model=reasoner, messages=user("Think first: 17 x 23?"), reasoning_effort="high", stream=True
    )
    reasoning, text = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            text += choice.delta.content or ""
    assert reasoning.startswith("[sim ") and "thinking (high)" in reasoning
    assert text.startswith("[sim ")
