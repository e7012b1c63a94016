"""What agent and chat clients send, through `fleet serve` with the official `openai` SDK:
tools (a round trip, parallel calls, a named function), structured output, the developer
role, every sampling field and fields the fleet does not know. Behind the gateway, the
test fleet's real workers and the provider simulator, whose request log shows what each
provider call carried."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from client.dispatch import current_catalog
from router.catalog import Catalog
from router.jobs import TUNING_NEEDS
from tests.fixtures import reset_live_state
from tests.test_gateway import Gateway, client, gateway_fixture, new_key

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "units": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "units"],
            "additionalProperties": False,
        },
    },
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "hour24": {"type": "boolean"}},
            "required": ["city"],
        },
    },
}
TRIP: Any = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "units": {"type": "string", "enum": ["c", "f"]},
        "stops": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["city", "days", "units", "stops"],
    "additionalProperties": False,
}
ROUTE = "fleet/user_facing"
# The shipped catalog's one model with json_schema (and seed and logprobs): named as the model
SCHEMA_MODEL = "openrouter/deepseek/deepseek-chat"


gateway = gateway_fixture("gateway-chat", 30)


@pytest.fixture(scope="module", autouse=True)
def _every_model_usable(fleet_env) -> None:
    """The modules before this one cool models down and open circuits with their
    scripted failures: this one's requests each expect their model to answer."""
    reset_live_state(fleet_env)


@pytest.fixture(scope="module")
def sdk(gateway, fleet_env) -> openai.OpenAI:
    return client(gateway, new_key(fleet_env, "agent-app"))


@pytest.fixture(scope="module")
def catalog(fleet_env) -> Catalog:
    return current_catalog({"FLEET_CATALOG": fleet_env["FLEET_CATALOG"]})


def marked(text: str) -> tuple[str, list[Any]]:
    """A unique marker, and a one-message conversation carrying it."""
    mark = f"m{uuid.uuid4().hex[:12]}"
    return mark, [{"role": "user", "content": f"{text} ({mark})"}]


def provider_bodies(simulator, mark: str) -> list[dict[str, Any]]:
    """The request bodies the simulator received for the conversation carrying `mark`."""
    bodies = [e["body"] for e in simulator.requests() if isinstance(e.get("body"), dict)]
    return [b for b in bodies if mark in json.dumps(b.get("messages"))]


def the_body(simulator, mark: str) -> dict[str, Any]:
    found = provider_bodies(simulator, mark)
    assert len(found) == 1, f"{len(found)} provider calls carried {mark}"
    return found[0]


def dropped(raw: Any) -> set[str]:
    return {f for f in raw.headers.get("x-fleet-dropped", "").split(",") if f}


def fits(value: Any, schema: dict[str, Any]) -> bool:
    """`value` is valid against `schema` (the subset of JSON schema these tests use)."""
    kind = schema.get("type")
    if "enum" in schema and value not in schema["enum"]:
        return False
    if kind == "object":
        if not isinstance(value, dict) or not set(schema.get("required", [])) <= set(value):
            return False
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False and not set(value) <= set(props):
            return False
        return all(fits(v, props[k]) for k, v in value.items() if k in props)
    if kind == "array":
        return isinstance(value, list) and all(fits(v, schema.get("items", {})) for v in value)
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return ok and schema.get("minimum", value) <= value <= schema.get("maximum", value)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    return True


def test_a_tool_round_trip(sdk, simulator) -> None:
    # Given a conversation and a tool
    mark, messages = marked("What is the weather in Paris?")
    # When the model is asked: it calls the tool, with arguments that fit its schema
    raw = sdk.chat.completions.with_raw_response.create(
        model=ROUTE, messages=messages, tools=[WEATHER]
    )
    first = raw.parse()
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and choice.message.tool_calls
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert fits(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    sent = the_body(simulator, mark)
    assert sent["tools"] == [WEATHER]
    # When the tool's result is sent back
    follow = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump(mode="json", exclude_none=True)],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    final = sdk.chat.completions.create(model=ROUTE, messages=follow, tools=[WEATHER])
    # Then the final answer quotes it, and the provider saw the whole conversation as sent
    answer = final.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert answer.message.content and "18 C and sunny" in answer.message.content
    second = [b for b in provider_bodies(simulator, mark) if len(b["messages"]) == 3]
    assert len(second) == 1
    assert second[0]["messages"][1]["tool_calls"] == follow[1]["tool_calls"]
    assert second[0]["messages"][2] == follow[2]


def test_parallel_tool_calls_come_back_in_order(sdk, simulator, catalog) -> None:
    mark, messages = marked("[[sim:parallel]] Weather and time in Oslo, please")
    raw = sdk.chat.completions.with_raw_response.create(
        model=ROUTE, messages=messages, tools=[WEATHER, TIME]
    )
    choice = raw.parse().choices[0]
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"], choice
    assert len({c.id for c in calls}) == 2 and choice.finish_reason == "tool_calls"
    assert fits(json.loads(calls[1].function.arguments), TIME["function"]["parameters"])
    # With parallel_tool_calls false, one call: sent to a model that takes the field,
    # listed as dropped by one that does not
    mark, messages = marked("[[sim:parallel]] Weather and time in Lima, please")
    raw = sdk.chat.completions.with_raw_response.create(
        model=ROUTE, messages=messages, tools=[WEATHER, TIME], parallel_tool_calls=False
    )
    model = catalog.model(raw.headers["x-fleet-model"])
    body = the_body(simulator, mark)
    if model.supports("parallel_tool_calls"):
        assert body["parallel_tool_calls"] is False
        assert len(raw.parse().choices[0].message.tool_calls or []) == 1
    else:
        assert "parallel_tool_calls" not in body and "parallel_tool_calls" in dropped(raw)


def test_tool_choice_naming_a_function_calls_that_one(sdk, simulator) -> None:
    mark, messages = marked("What is the weather in Rome?")
    choice = {"type": "function", "function": {"name": "get_time"}}
    reply = sdk.chat.completions.create(
        model=ROUTE,
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice=choice,
    )
    calls = reply.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_time"]
    assert the_body(simulator, mark)["tool_choice"] == choice
    # A function that is not among the tools is the request's fault: 400, param tool_choice
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model=ROUTE,
            messages=messages,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert caught.value.param == "tool_choice" and "nope" in caught.value.message


def test_a_strict_json_schema_and_json_object(sdk, simulator) -> None:
    mark, messages = marked("Plan a trip to Kyoto")
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "trip", "schema": TRIP, "strict": True},
    }
    reply = sdk.chat.completions.create(
        model=SCHEMA_MODEL, messages=messages, response_format=response_format
    )
    content = reply.choices[0].message.content
    assert content is not None and fits(json.loads(content), TRIP), content
    assert the_body(simulator, mark)["response_format"] == response_format
    mark, messages = marked("Describe Kyoto as JSON")
    reply = sdk.chat.completions.create(
        model=ROUTE, messages=messages, response_format={"type": "json_object"}
    )
    content = reply.choices[0].message.content
    assert content is not None and isinstance(json.loads(content), dict), content
    assert the_body(simulator, mark)["response_format"] == {"type": "json_object"}


def test_the_developer_role_reaches_the_provider(sdk, simulator) -> None:
    mark, messages = marked("Say hi")
    reply = sdk.chat.completions.create(
        model=ROUTE, messages=[{"role": "developer", "content": "Be terse."}, *messages]
    )
    assert reply.choices[0].message.content
    assert the_body(simulator, mark)["messages"][0] == {"role": "developer", "content": "Be terse."}


SAMPLING: dict[str, Any] = {
    "stop": ["NEVER-SEEN-STOP"],
    "top_p": 0.9,
    "seed": 42,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
    "logit_bias": {"50256": -100},
    "logprobs": True,
    "top_logprobs": 3,
    "reasoning_effort": "low",
    "user": "user-7",
    "max_completion_tokens": 300,
}


@pytest.mark.parametrize("route", [ROUTE, "fleet/cost_free", SCHEMA_MODEL])
def test_each_sampling_field_reaches_the_provider_or_is_listed_as_dropped(
    sdk, simulator, catalog, route
) -> None:
    mark, messages = marked("Sample carefully")
    raw = sdk.chat.completions.with_raw_response.create(
        model=route,
        messages=messages,
        **SAMPLING,
    )
    model = catalog.model(raw.headers["x-fleet-model"])
    body = the_body(simulator, mark)
    assert body["max_tokens"] == 300  # OpenAI's newer name, sent as the one every API takes
    for field, value in SAMPLING.items():
        if field == "max_completion_tokens":
            continue
        need = TUNING_NEEDS.get(field)
        if need is None or model.supports(need):
            assert body.get(field) == value, (field, model.id)
            assert field not in dropped(raw)
        else:  # a field only tunes: the model that lacks it answers without it
            assert field not in body and field in dropped(raw), (field, model.id)
    completion = raw.parse()
    assert (completion.choices[0].logprobs is not None) == model.supports("logprobs")


def test_reasoning_content_comes_back_where_the_provider_gives_it(sdk, catalog) -> None:
    reasoners = [
        m.id for m in catalog.models if m.supports("reasoning") and not m.id.startswith("local/")
    ]
    assert reasoners, "the catalog names no remote model with reasoning"
    _, messages = marked("Think first: 17 x 23?")
    reply = sdk.chat.completions.create(
        model=reasoners[0], messages=messages, reasoning_effort="high"
    )
    message = reply.choices[0].message
    assert message.content and message.model_extra is not None
    assert message.model_extra.get("reasoning_content")


def test_an_unknown_field_is_passed_on_and_dropped_where_it_cannot_go(
    sdk, simulator, gateway
) -> None:
    unknown = {"fleet_probe": {"nested": [1, 2.5, None]}, "store": False, "verbosity": "low"}
    mark, messages = marked("Anything new?")
    raw = sdk.chat.completions.with_raw_response.create(
        model=ROUTE, messages=messages, extra_body=unknown
    )
    assert raw.parse().choices[0].message.content
    body = the_body(simulator, mark)
    assert {k: body.get(k) for k in unknown} == unknown
    assert not dropped(raw) & set(unknown)
    # stream_options means something only for a stream: the door drops it and says so
    mark, messages = marked("No stream here")
    raw = sdk.chat.completions.with_raw_response.create(
        model=ROUTE, messages=messages, stream_options={"include_usage": True}
    )
    assert "stream_options" not in the_body(simulator, mark)
    assert "stream_options" in dropped(raw)
    # A local MLX model takes no field it does not know: it answers, and lists them dropped
    _, messages = marked("Local, please")
    raw = sdk.chat.completions.with_raw_response.create(
        model="local/qwen3-mlx", messages=messages, extra_body={"fleet_probe": 1}
    )
    assert raw.parse().choices[0].message.content is not None
    assert "fleet_probe" in dropped(raw)


def refusal(gateway: Gateway, key: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(
        f"{gateway.url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


def test_each_refusal_names_its_field_as_param(gateway, fleet_env) -> None:
    key = new_key(fleet_env, "param-app")
    base = {"model": ROUTE, "messages": [{"role": "user", "content": "hi"}]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"stream": "yes"}, "stream"),
        ({"n": 3}, "n"),
        ({"temperature": 9}, "temperature"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 5}, "top_logprobs"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"app": "someone-else"}, "app"),
        ({"metadata": "not an object"}, "metadata"),
    ]
    for extra, param in cases:
        error = refusal(gateway, key, {**base, **extra})
        assert error["param"] == param, (extra, error)
    error = refusal(gateway, key, {**base, "messages": [{"role": "tool", "content": "x"}]})
    assert error["param"] and error["param"].startswith("messages"), error


def test_a_request_no_model_can_serve_is_400_naming_the_capability(
    gateway, fleet_env, simulator
) -> None:
    import redis

    key = new_key(fleet_env, "capability-app")
    mark = f"m{uuid.uuid4().hex[:12]}"
    messages = [{"role": "user", "content": f"call a tool ({mark})"}]
    # Given chains none of whose models has a capability: vision's lacks tools,
    # user_facing's json_schema
    error = refusal(
        gateway, key, {"model": "fleet/vision", "messages": messages, "tools": [WEATHER]}
    )
    assert error["param"] == "tools" and error["capability"] == "tools", error
    assert error["chain"] == "vision" and "tools" in error["message"], error
    assert "minimax/MiniMax-Vision-Video-01 (lacks tools)" in error["message"], error
    assert {m["model"]: m["reason"] for m in error["models"]} == {
        "minimax/MiniMax-Vision-Video-01": "lacks tools",
        "openrouter/nvidia/nemotron-nano-12b-v2-vl:free": "lacks tools",
    }, error
    schema = {"type": "json_schema", "json_schema": {"name": "trip", "schema": TRIP}}
    error = refusal(gateway, key, {"model": ROUTE, "messages": messages, "response_format": schema})
    assert error["param"] == "response_format" and error["capability"] == "json_schema", error
    assert "zai/glm-4.7 (lacks json_schema)" in error["message"], error
    # Nothing was queued, and no provider saw it
    state = redis.Redis.from_url(fleet_env["FLEET_BROKER_URL"])
    try:
        owned = [
            k
            for k in state.scan_iter("fleet:gateway:owner:*")
            if json.loads(state.get(k) or "{}").get("app") == "capability-app"
        ]
    finally:
        state.close()
    assert owned == [] and provider_bodies(simulator, mark) == []


def test_a_provider_refusing_tools_moves_the_request_on_and_rests_that_model(
    sdk, simulator, fleet_env
) -> None:
    import redis

    from tests.fixtures import reset_live_state
    from workers.state import keys

    state = redis.Redis.from_url(fleet_env["FLEET_BROKER_URL"])
    # Given the primary's provider answers a request with tools 404, as OpenRouter does
    simulator.configure(models={"glm-4.7": {"tools": False}})
    try:
        mark, messages = marked("Weather in Bern?")
        raw = sdk.chat.completions.with_raw_response.create(
            model=ROUTE, messages=messages, tools=[WEATHER]
        )
        # Then the next model of the chain answers the tool call
        assert raw.headers["x-fleet-model"] == "minimax/MiniMax-M2.1"
        assert raw.headers["x-fleet-attempts"] == "2"
        assert raw.parse().choices[0].finish_reason == "tool_calls"
        assert [b["model"] for b in provider_bodies(simulator, mark)] == [
            "glm-4.7",
            "MiniMax-M2.1",
        ]
        # And the primary rests for tools: the next request with tools is not sent to it
        time.sleep(1.1)  # the dispatcher's view of live state is a second old at most
        mark, messages = marked("Weather in Graz?")
        raw = sdk.chat.completions.with_raw_response.create(
            model=ROUTE, messages=messages, tools=[WEATHER]
        )
        assert raw.headers["x-fleet-model"] == "minimax/MiniMax-M2.1"
        assert [b["model"] for b in provider_bodies(simulator, mark)] == ["MiniMax-M2.1"]
        # While a request without tools still goes to it
        mark, messages = marked("Just chat")
        plain = sdk.chat.completions.create(model=ROUTE, messages=messages)
        assert plain.model == "zai/glm-4.7"
    finally:
        simulator.reset()
        state.delete(keys.lacks("zai/glm-4.7", "tools"))
        reset_live_state(fleet_env)
        state.close()
        time.sleep(1.1)


def test_the_job_api_returns_tool_calls_and_finish_reason(gateway, fleet_env) -> None:
    headers = {"Authorization": f"Bearer {new_key(fleet_env, 'job-tools-app')}"}
    _, messages = marked("Weather in Porto, as a job")
    job = {"task_class": "user_facing", "messages": messages, "tools": [WEATHER]}
    created = httpx.post(f"{gateway.url}/jobs", json=job, headers=headers)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 30
    while (state := httpx.get(f"{gateway.url}/jobs/{job_id}", headers=headers).json())[
        "status"
    ] != "success" and time.monotonic() < deadline:
        time.sleep(0.1)
    result = state["result"]
    assert result["ok"] and result["finish_reason"] == "tool_calls", result
    assert [c["function"]["name"] for c in result["tool_calls"]] == ["get_weather"]
    assert result["text"] in (None, "") and result["refusal"] is None
    assert "dropped" in result and "logprobs" in result and "reasoning" in result
