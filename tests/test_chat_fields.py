"""The whole chat request through the fleet: tools, response formats and sampling fields
reach the provider (or are listed as dropped), and what comes back (tool calls,
finish_reason, refusal, logprobs, reasoning) reaches the Result.

The OpenAI-compatible adapter against the real simulator over HTTP, and against
MockTransport for provider shapes the simulator does not make; the step with the real
provider registry; and jobs through dispatch() to the real worker processes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from client import dispatch
from router import JobFailed, load_catalog
from router.jobs import parse_job
from router.results import Attempt
from router.tokens import estimate_tokens
from tests.fixtures import reset_live_state
from workers.ledger.rows import attempt_row
from workers.providers.base import (
    CapabilityRefused,
    Completion,
    CompletionRequest,
    ModelUnusable,
    Permanent,
    Retryable,
)
from workers.providers.openai_compat import OpenAICompatProvider, make_client
from workers.providers.registry import ProviderRegistry
from workers.runtime.step import request_options
from workers.sim.simulator import Simulator
from workers.state import keys

KEY = "sk-test-chat-fields"
TIMEOUT_S = 30
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "warm": {"type": "boolean"}},
    "required": ["city", "warm"],
    "additionalProperties": False,
}


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# --- the adapter against the simulator ------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with make_client(concurrency=4, timeout_s=10) as http:
        yield http


@pytest.fixture
def provider(sim: Simulator, client: httpx.Client) -> OpenAICompatProvider:
    return OpenAICompatProvider(sim.url, KEY, client)


def complete(adapter: OpenAICompatProvider, text: str, /, **options: Any) -> Completion:
    return adapter.complete(CompletionRequest("glm-4.7", user(text), options=options))


def test_a_tool_call_answer_is_an_answer(provider, sim) -> None:
    completion = complete(provider, "Weather in Paris?", tools=[WEATHER], tool_choice="auto")
    assert completion.text == ""
    assert completion.finish_reason == "tool_calls"
    (call,) = completion.tool_calls
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)
    # what reached the provider: the options merged into the body as they were
    body = sim.requests()[0]["body"]
    assert (body["tools"], body["tool_choice"]) == ([WEATHER], "auto")


def test_parallel_tool_calls_come_back_in_order(provider) -> None:
    completion = complete(provider, "Both please [[sim:parallel]]", tools=[WEATHER, TIME])
    names = [c["function"]["name"] for c in completion.tool_calls]
    assert names == ["get_weather", "get_time"]
    assert len({c["id"] for c in completion.tool_calls}) == 2


def test_a_named_tool_choice_is_the_tool_called(provider) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    completion = complete(provider, "Weather?", tools=[WEATHER, TIME], tool_choice=named)
    assert [c["function"]["name"] for c in completion.tool_calls] == ["get_time"]
    assert json.loads(completion.tool_calls[0]["function"]["arguments"])["zone"] in ("UTC", "CET")


def test_after_the_tool_result_comes_the_final_answer(provider) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
    }
    messages = [
        *user("Weather in Paris?"),
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    request = CompletionRequest("glm-4.7", messages, options={"tools": [WEATHER]})
    completion = provider.complete(request)
    assert "sunny, 21 C" in completion.text
    assert (completion.finish_reason, completion.tool_calls) == ("stop", [])


def test_sampling_fields_reach_the_provider(provider, sim) -> None:
    options = {
        "stop": ["END"],
        "top_p": 0.5,
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.1,
        "logit_bias": {"11": -5},
        "user": "u-1",
        "provider": {"order": ["a"]},  # an extra_body field: passed on as it is
    }
    complete(provider, "hello", **options)
    body = sim.requests()[0]["body"]
    assert {k: body[k] for k in options} == options
    assert (body["model"], body["messages"]) == ("glm-4.7", user("hello"))


def test_logprobs_reasoning_refusal_and_length_are_kept(provider) -> None:
    probed = complete(provider, "hello there", logprobs=True, top_logprobs=2)
    assert probed.logprobs is not None and probed.logprobs["content"]
    assert len(probed.logprobs["content"][0]["top_logprobs"]) == 2
    assert complete(provider, "think", reasoning_effort="high").reasoning
    refused = complete(provider, "do the bad thing [[sim:refuse]]")
    assert refused.refusal and refused.text == ""
    filtered = complete(provider, "filtered [[sim:filter]]")  # empty on purpose
    assert (filtered.text, filtered.finish_reason) == ("", "content_filter")
    cut = provider.complete(CompletionRequest("glm-4.7", user("a long answer " * 20), max_tokens=3))
    assert cut.finish_reason == "length"


def test_json_formats_answer_json(provider) -> None:
    as_object = complete(provider, "city?", response_format={"type": "json_object"})
    assert isinstance(json.loads(as_object.text), dict)
    schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA, "strict": True}}
    value = json.loads(complete(provider, "city?", response_format=schema).text)
    assert set(value) == {"city", "warm"} and isinstance(value["warm"], bool)


def test_a_model_refusing_tools_is_capability_refused(provider, sim) -> None:
    sim.configure(models={"glm-4.7": {"tools": False}})
    with pytest.raises(CapabilityRefused) as caught:
        complete(provider, "Weather?", tools=[WEATHER])
    refused = caught.value
    assert (refused.kind, refused.action, refused.capability) == ("unsupported", "next", "tools")
    assert isinstance(refused, ModelUnusable)
    assert "support tool use" in refused.message
    assert json.loads(json.dumps(refused.to_dict()))["capability"] == "tools"
    # the same model still answers a request without tools
    assert complete(provider, "hello").text.startswith("[sim glm-4.7]")


# --- the adapter against provider shapes the simulator does not make ------------------------


def mock(handler: Callable[[httpx.Request], httpx.Response]) -> OpenAICompatProvider:
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return OpenAICompatProvider("https://api.example.com/v1", KEY, http)


def answer(message: dict[str, Any], **choice: Any) -> Callable[[httpx.Request], httpx.Response]:
    body = {"choices": [{"message": message, **choice}]}
    return lambda request: httpx.Response(200, json=body)


def test_tool_calls_of_loose_providers_are_put_in_openai_shape() -> None:
    message = {
        "content": None,
        "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},  # no id
            {"id": "c2", "type": "function", "function": {"name": "get_time"}},  # no arguments
        ],
    }
    completion = mock(answer(message, finish_reason="tool_calls")).complete(
        CompletionRequest("m", user("x"), options={"tools": [WEATHER, TIME]})
    )
    first, second = completion.tool_calls
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert json.loads(first["function"]["arguments"]) == {"city": "Oslo"}
    assert second == {
        "id": "c2",
        "type": "function",
        "function": {"name": "get_time", "arguments": "{}"},
    }
    # no usage: the calls' names and arguments are what the model wrote
    assert completion.tokens_estimated
    assert completion.completion_tokens >= estimate_tokens('{"city": "Oslo"}')


def test_reasoning_from_either_field() -> None:
    for field in ("reasoning_content", "reasoning"):
        completion = mock(answer({"content": "42", field: "I thought"})).complete(
            CompletionRequest("m", user("x"))
        )
        assert (completion.text, completion.reasoning) == ("42", "I thought")


@pytest.mark.parametrize(
    "tool_calls",
    [{"not": "a list"}, [{"function": {}}], [{"function": {"name": ""}}], ["text"]],
)
def test_malformed_tool_calls_are_malformed(tool_calls: Any) -> None:
    provider = mock(answer({"content": None, "tool_calls": tool_calls}))
    with pytest.raises(Retryable) as caught:
        provider.complete(CompletionRequest("m", user("x")))
    assert caught.value.kind == "malformed"


def not_found(message: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(404, json={"error": {"message": message, "code": 404}})


IMAGE = [
    {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}],
    }
]
STRICT = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
TOOLS = {"tools": [WEATHER]}
SCHEMA_OPTION = {"response_format": STRICT}


@pytest.mark.parametrize(
    ("message", "messages", "options", "capability"),
    [
        ("No endpoints found that support tool use.", user("x"), {"tools": [WEATHER]}, "tools"),
        (
            "No endpoints found that support the requested response_format",
            user("x"),
            {"response_format": STRICT},
            "json_schema",
        ),
        (
            "No endpoints found that support structured outputs",
            user("x"),
            {"response_format": {"type": "json_object"}},
            "json_object",
        ),
        ("No endpoints found that support image input", IMAGE, {}, "vision"),
        # the same words for a capability the request does not use: an unknown model
        ("No endpoints found that support tool use.", user("x"), {}, None),
        ("No endpoints found that support image input", user("x"), {}, None),
        ("The model `m` does not exist", user("x"), {"tools": [WEATHER]}, None),
    ],
)
def test_a_capability_404_names_the_capability(
    message: str, messages: list[dict[str, Any]], options: dict[str, Any], capability: str | None
) -> None:
    with pytest.raises(ModelUnusable) as caught:
        mock(not_found(message)).complete(CompletionRequest("m", messages, options=options))
    if capability is None:
        assert caught.value.kind == "not_found"
        assert not isinstance(caught.value, CapabilityRefused)
    else:
        assert isinstance(caught.value, CapabilityRefused)
        assert (caught.value.kind, caught.value.capability) == ("unsupported", capability)


@pytest.mark.parametrize(
    ("message", "options", "refused"),
    [
        ("registry.ollama.ai/library/llama2:latest does not support tools", TOOLS, True),
        ('"auto" tool choice requires --enable-auto-tool-choice to be set', TOOLS, True),
        ("registry.ollama.ai/library/llama2:latest does not support tools", {}, False),
        ("Invalid schema for response_format 'c': 'required' is missing", SCHEMA_OPTION, False),
    ],
)
def test_a_400_saying_the_model_takes_no_tools_is_capability_refused(
    message: str, options: dict[str, Any], refused: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": message}})

    with pytest.raises((CapabilityRefused, Permanent)) as caught:
        mock(handler).complete(CompletionRequest("m", user("x"), options=options))
    if refused:
        assert isinstance(caught.value, CapabilityRefused) and caught.value.capability == "tools"
    else:
        assert isinstance(caught.value, Permanent) and caught.value.kind == "bad_request"


# --- what each model is sent ----------------------------------------------------------------


def test_each_model_is_sent_the_fields_it_can_take(fleet_env) -> None:
    catalog = load_catalog(fleet_env["FLEET_CATALOG"])
    registry = ProviderRegistry(catalog, 2, environ=fleet_env)
    job = parse_job(
        {
            "task_class": "user_facing",
            "messages": user("hi"),
            "tools": [WEATHER],
            "parallel_tool_calls": False,
            "stop": "END",
            "seed": 1,
            "logprobs": True,
            "top_logprobs": 1,
            "reasoning_effort": "low",
            "extra_body": {"top_k": 3},
        }
    )
    try:
        # deepseek-chat takes seed and logprobs; it is no reasoning model, and no model
        # of the catalog claims parallel_tool_calls
        model = "openrouter/deepseek/deepseek-chat"
        sent, dropped = request_options(job, catalog, model, registry(model))
        assert dropped == ["parallel_tool_calls", "reasoning_effort"]
        assert sent["seed"] == 1 and sent["top_k"] == 3 and sent["tools"] == [WEATHER]
        # glm-4.7: reasoning and tools, no seed, logprobs or parallel_tool_calls
        sent, dropped = request_options(job, catalog, "zai/glm-4.7", registry("zai/glm-4.7"))
        assert dropped == ["logprobs", "parallel_tool_calls", "seed", "top_logprobs"]
        assert set(sent) == {"tools", "stop", "reasoning_effort", "top_k"}
        # the local MLX model: only what its adapter honours (and never tools)
        local = "local/qwen3-mlx"
        sent, dropped = request_options(job, catalog, local, registry(local))
        assert sent == {"stop": "END"}
        assert "tools" in dropped and "top_k" in dropped and "reasoning_effort" in dropped
    finally:
        registry.close()


def test_the_ledger_row_says_whether_tools_or_a_schema_were_used(fleet_env) -> None:
    catalog = load_catalog(fleet_env["FLEET_CATALOG"])
    used = Attempt(
        number=1,
        model="zai/glm-4.7",
        queue="subscription",
        tier="subscription",
        outcome="ok",
        tools=True,
        json_schema=True,
    )
    row = attempt_row(used, {"id": "j", "task_class": "user_facing"}, catalog)
    assert (row["tools"], row["json_schema"]) == (True, True)
    plain = attempt_row(used.model_copy(update={"tools": False, "json_schema": False}), {}, catalog)
    assert (plain["tools"], plain["json_schema"]) == (False, False)


# --- through dispatch() to the real workers -------------------------------------------------


@pytest.fixture
def clean_fleet(fleet_app, fleet_env, simulator) -> Iterator[Simulator]:
    """The fleet, its simulator and live state reset before and after (a capability rest
    included)."""
    import redis

    def reset() -> None:
        simulator.reset()
        reset_live_state(fleet_env)
        with redis.Redis.from_url(fleet_env["FLEET_BROKER_URL"]) as state:
            found = list(state.scan_iter(keys.lacks("*", "*")))
            if found:
                state.delete(*found)

    reset()
    yield simulator
    reset()


def bodies(simulator: Simulator, job_id: str) -> list[dict[str, Any]]:
    return [r["body"] for r in simulator.requests() if r.get("job") == job_id]


def test_a_tool_round_trip_through_dispatch(clean_fleet) -> None:
    tag = uuid.uuid4().hex[:8]
    asked = user(f"{tag} weather in Paris?")
    job = {
        "task_class": "user_facing",
        "messages": asked,
        "tools": [WEATHER],
        "seed": 5,
        "stop": ["END"],
    }
    first = dispatch(job).get(timeout=TIMEOUT_S)
    assert first.ok and first.model == "zai/glm-4.7"
    assert first.finish_reason == "tool_calls" and not first.text
    (call,) = first.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert first.dropped == ["seed"]  # the catalog gives glm-4.7 no seed
    assert (first.attempts[0].tools, first.attempts[0].json_schema) == (True, False)
    (body,) = bodies(clean_fleet, first.job_id)
    assert (body["tools"], body["stop"]) == ([WEATHER], ["END"]) and "seed" not in body
    # the client runs the tool and sends its result back
    messages = [
        *asked,
        {"role": "assistant", "content": None, "tool_calls": first.tool_calls},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"},
    ]
    final = dispatch({**job, "messages": messages}).get(timeout=TIMEOUT_S)
    assert final.ok and final.finish_reason == "stop" and final.tool_calls == []
    assert final.text and "sunny, 21 C" in final.text
    (body,) = bodies(clean_fleet, final.job_id)
    assert body["messages"][1] == {"role": "assistant", "tool_calls": first.tool_calls}


def test_an_escalation_skips_the_models_without_tools(clean_fleet) -> None:
    # Given complex_reasoning's chain (glm-4.7, MiniMax-M2.1, kimi-k2-thinking, hermes-3,
    # deepseek-chat) whose first three answer 503, and hermes-3 takes no tools
    faults = "[[sim:glm-4.7=503]] [[sim:MiniMax-M2.1=503]] [[sim:kimi-k2-thinking=503]]"
    job = {
        "task_class": "complex_reasoning",
        "messages": user(f"{faults} weather in Oslo?"),
        "tools": [WEATHER],
    }
    # When a job with tools escalates down it
    result = dispatch(job).get(timeout=TIMEOUT_S)
    # Then it passes hermes-3 by without a call and deepseek-chat calls the tool
    tried = [a.model for a in result.attempts]
    assert tried[:3] == ["zai/glm-4.7", "minimax/MiniMax-M2.1", "litellm/kimi-k2-thinking"]
    assert "openrouter/nousresearch/hermes-3-llama-3.1-405b:free" not in tried
    assert result.model == "openrouter/deepseek/deepseek-chat"
    assert result.finish_reason == "tool_calls" and result.tool_calls
    called = {
        entry["model"] for entry in clean_fleet.requests() if entry.get("job") == result.job_id
    }
    assert "nousresearch/hermes-3-llama-3.1-405b:free" not in called


def test_json_formats_through_dispatch(clean_fleet) -> None:
    # complex_reasoning: only deepseek-chat of its chain takes a JSON schema
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    job = {"task_class": "complex_reasoning", "messages": user("Paris?")}
    result = dispatch({**job, "response_format": schema}).get(timeout=TIMEOUT_S)
    assert result.ok and result.model == "openrouter/deepseek/deepseek-chat"
    assert [(a.json_schema, a.tools) for a in result.attempts] == [(True, False)]
    assert set(json.loads(result.text or "")) == {"city", "warm"}
    # json_object: glm-4.7, the chain's primary, takes it
    as_object = dispatch({**job, "response_format": {"type": "json_object"}}).get(timeout=TIMEOUT_S)
    assert as_object.model == "zai/glm-4.7" and not as_object.attempts[0].json_schema
    assert isinstance(json.loads(as_object.text or ""), dict)


def test_a_provider_refusing_tools_moves_the_job_on_and_rests_the_model(
    clean_fleet, fleet_env
) -> None:
    import redis

    clean_fleet.configure(models={"glm-4.7": {"tools": False}})
    tools_job = {"task_class": "user_facing", "messages": user("Weather?"), "tools": [WEATHER]}
    result = dispatch(tools_job).get(timeout=TIMEOUT_S)
    assert result.ok, result.error
    refused, answered = result.attempts
    assert (refused.model, refused.error_kind, refused.action) == (
        "zai/glm-4.7",
        "unsupported",
        "next",
    )
    assert answered.model == "minimax/MiniMax-M2.1" and result.tool_calls
    with redis.Redis.from_url(fleet_env["FLEET_BROKER_URL"]) as state:
        assert state.exists(keys.lacks("zai/glm-4.7", "tools"))
    # the next tool job starts past the resting model; a plain job still uses it
    again = dispatch(tools_job).get(timeout=TIMEOUT_S)
    assert [a.model for a in again.attempts] == ["minimax/MiniMax-M2.1"]
    plain = dispatch({"task_class": "user_facing", "messages": user("hi")}).get(timeout=TIMEOUT_S)
    assert plain.model == "zai/glm-4.7"


def test_a_job_failed_by_every_model_keeps_its_attempts(clean_fleet) -> None:
    """A bad request ends the job with no answer fields set."""
    with pytest.raises(JobFailed) as caught:
        dispatch(
            {
                "task_class": "user_facing",
                "messages": user("[[sim:*=400]] x"),
                "tools": [WEATHER],
            }
        ).get(timeout=TIMEOUT_S)
    result = caught.value.result
    assert result["tool_calls"] == [] and result["finish_reason"] is None
    assert result["attempts"][0]["tools"] is True


def test_reasoning_and_logprobs_reach_the_result_where_the_model_takes_them(clean_fleet) -> None:
    job = {"messages": user("think it over"), "reasoning_effort": "high", "logprobs": True}
    # glm-4.7 reasons but gives no logprobs (catalog): logprobs is not sent, and listed
    reasoned = dispatch({**job, "task_class": "user_facing"}).get(timeout=TIMEOUT_S)
    assert reasoned.model == "zai/glm-4.7" and reasoned.reasoning
    assert (reasoned.dropped, reasoned.logprobs) == (["logprobs"], None)
    (body,) = bodies(clean_fleet, reasoned.job_id)
    assert body["reasoning_effort"] == "high" and "logprobs" not in body
    # deepseek-chat (the only model of complex_reasoning taking a JSON schema) gives
    # logprobs but is no reasoning model: reasoning_effort is not sent, and listed
    schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    logged = dispatch({**job, "task_class": "complex_reasoning", "response_format": schema}).get(
        timeout=TIMEOUT_S
    )
    assert logged.model == "openrouter/deepseek/deepseek-chat"
    assert logged.reasoning is None and logged.logprobs and logged.logprobs["content"]
    assert logged.dropped == ["reasoning_effort"]
    assert logged.finish_reason == "stop"
