"""Jobs are validated at the door: one line naming the field, the bad value, the choices."""

from __future__ import annotations

import pytest

from router import InvalidJob, Job, parse_job

TEXT = [{"role": "user", "content": "hello"}]


def job(**fields):
    return {"task_class": "creative", "messages": TEXT, **fields}


def test_a_full_job_parses() -> None:
    parsed = parse_job(
        job(
            messages=[
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                    ],
                },
            ],
            focus="creative",
            profile="social",
            model="litellm/kimi",
            temperature=0.4,
            max_tokens=100,
            source="sub-agent",
            priority=2,
            idempotency_key="digest-2026-11-23",
            deadline="2026-11-23T10:00:00Z",
            metadata={"app": "inbox", "n": 3},
        )
    )
    assert parsed.has_image
    assert parsed.source == "sub-agent"
    assert len(parsed.id) == 32
    assert parsed.prompt_tokens() > 1000  # an image part is charged as one


def test_defaults() -> None:
    parsed = parse_job(job())
    assert (parsed.source, parsed.priority, parsed.has_image) == ("app", 5, False)
    assert parse_job(parsed) is parsed
    assert isinstance(parsed, Job)


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"task_class": "poetry"}, ["'task_class'", "'complex_reasoning'", "'poetry'"]),
        ({"source": "web"}, ["'source'", "'app', 'cron', 'heartbeat' or 'sub-agent'", "'web'"]),
        ({"temperature": 3}, ["'temperature'", "less than or equal to 2", "3"]),
        ({"max_tokens": 0}, ["'max_tokens'", "greater than 0"]),
        ({"priority": 11}, ["'priority'", "less than or equal to 9"]),
        ({"messages": []}, ["'messages'", "at least 1"]),
        ({"messages": [{"role": "bot", "content": "x"}]}, ["'messages.0.role'", "'bot'"]),
        (
            {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
            ["'messages.0.content.0.type' is required"],
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            ["'messages.0.content.0.image_url.url' is required"],
        ),
        (
            {"colour": "red"},
            [
                "'colour' is unknown",
                "valid: app, deadline, dimensions, extra_body, focus, frequency_penalty, id",
            ],
        ),
        ({"metadata": {"k": [1]}}, ["'metadata.k"]),
        ({"id": "has space"}, ["'id'", "pattern"]),
    ],
)
def test_bad_jobs_are_refused_in_one_line(fields: dict, needles: list[str]) -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_job(job(**fields))
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_task_class() -> None:
    with pytest.raises(InvalidJob, match="'task_class' is required"):
        parse_job({"messages": TEXT})


# --- the whole chat request -------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
        "strict": True,
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
ROUND_TRIP = [
    {"role": "developer", "content": "Answer from the tool's result only."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "default": None}}}


def test_a_tool_round_trip_parses_and_goes_out_as_sent() -> None:
    parsed = parse_job(job(messages=ROUND_TRIP, tools=[WEATHER], tool_choice="auto"))
    # what a provider is sent: OpenAI's shape, no null fields added
    assert parsed.wire_messages() == [
        ROUND_TRIP[0],
        ROUND_TRIP[1],
        {"role": "assistant", "tool_calls": [CALL]},
        ROUND_TRIP[3],
    ]
    assert parsed.needs() == {"tools"}
    assert parsed.tuning() == {"tools": [WEATHER], "tool_choice": "auto"}
    # and the job survives its trip through a message (dumped without nulls, parsed again)
    assert parse_job(parsed.model_dump(mode="json", exclude_none=True)) == parsed


def test_parts_video_and_pass_through() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}, "x": None}
    video = {"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}}
    content = [{"type": "text", "text": "What happens here?"}, video, audio]
    parsed = parse_job(job(messages=[{"role": "user", "content": content}]))
    assert parsed.wire_messages() == [{"role": "user", "content": content}]  # nulls kept
    assert (parsed.has_video, parsed.has_image) == (True, False)
    assert parsed.needs() == {"video"}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    both = parse_job(job(messages=[{"role": "user", "content": [image, video]}]))
    assert both.needs() == {"vision", "video"}


def test_needs_are_what_a_model_must_have() -> None:
    assert parse_job(job()).needs() == frozenset()
    assert parse_job(job(tools=[WEATHER])).needs() == {"tools"}
    assert parse_job(job(tools=[WEATHER], tool_choice="none")).needs() == frozenset()
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert parse_job(job(tools=[WEATHER], tool_choice=named)).needs() == {"tools"}
    assert parse_job(job(response_format={"type": "text"})).needs() == frozenset()
    assert parse_job(job(response_format={"type": "json_object"})).needs() == {"json_object"}
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    assert parse_job(job(response_format=schema)).needs() == {"json_schema"}


def test_tuning_holds_every_field_set_in_openai_names() -> None:
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": SCHEMA, "strict": True, "description": "d"},
    }
    fields = {
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": schema,
        "stop": ["END", "STOP"],
        "top_p": 0.9,
        "seed": 42,
        "presence_penalty": -2,
        "frequency_penalty": 2,
        "logit_bias": {"50256": -100, "11": 100},
        "logprobs": True,
        "top_logprobs": 20,
        "reasoning_effort": "minimal",
        "user": "user-7",
    }
    parsed = parse_job(job(**fields, extra_body={"provider": {"order": ["x"]}, "top_k": 5}))
    # every field as sent (a schema's null default kept), extra_body's merged in
    assert parsed.tuning() == {**fields, "provider": {"order": ["x"]}, "top_k": 5}
    assert parse_job(job(temperature=0.2, max_tokens=9)).tuning() == {}  # sent by the fleet


def test_tuning_needs_names_catalog_capabilities() -> None:
    from router.jobs import TUNING_FIELDS, TUNING_NEEDS

    assert set(TUNING_NEEDS) <= set(TUNING_FIELDS)
    assert TUNING_NEEDS["top_logprobs"] == TUNING_NEEDS["logprobs"] == "logprobs"
    assert TUNING_NEEDS["reasoning_effort"] == "reasoning"


def test_prompt_estimate_counts_tools_calls_and_results() -> None:
    plain = parse_job(job(messages=ROUND_TRIP[:2])).prompt_tokens()
    with_tools = parse_job(job(messages=ROUND_TRIP[:2], tools=[WEATHER])).prompt_tokens()
    assert with_tools > plain + 20  # the definition: name, description, schema
    big_args = {**CALL, "function": {"name": "get_weather", "arguments": "{}" + " city" * 100}}
    called = [*ROUND_TRIP[:2], {"role": "assistant", "tool_calls": [big_args]}]
    assert parse_job(job(messages=called)).prompt_tokens() > plain + 100
    result = {"role": "tool", "tool_call_id": "call_1", "content": "word " * 100}
    answered = [*ROUND_TRIP[:3], result]
    assert parse_job(job(messages=answered)).prompt_tokens() > plain + 100
    schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": {"x": "y " * 100}}}
    assert (
        parse_job(job(response_format=schema)).prompt_tokens()
        > parse_job(job()).prompt_tokens() + 100
    )


GOOD_FIELDS = [
    {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": True},
    {"tools": [{"type": "function", "function": {"name": "a-b_c"}}]},
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "text"}},
    {"stop": "END"},
    {"stop": []},
    {"top_p": 0},
    {"top_p": 1},
    {"seed": -3},
    {"presence_penalty": 0.5, "frequency_penalty": -0.5},
    {"logit_bias": {}},
    {"logprobs": False},
    {"logprobs": True, "top_logprobs": 0},
    {"reasoning_effort": "high"},
    {"user": ""},
    {"extra_body": {"provider": {"sort": "price"}, "transforms": ["middle-out"]}},
    {"messages": [{"role": "assistant", "content": None, "refusal": "I cannot help."}]},
    {
        "messages": [
            {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "r"}]}
        ]
    },
    {"messages": [{"role": "user", "content": "hi", "name": "ann"}]},
]


@pytest.mark.parametrize("fields", GOOD_FIELDS)
def test_good_fields_parse(fields: dict) -> None:
    parsed = parse_job(job(**fields))
    assert parse_job(parsed.model_dump(mode="json", exclude_none=True)) == parsed


BAD_FIELDS = [
    # (fields, param, needles of the one-line message)
    ({"tools": []}, "tools", ["'tools'", "at least 1"]),
    ({"tools": [{"type": "retrieval"}]}, "tools", ["'tools.0.type'", "'function'"]),
    (
        {"tools": [{"type": "function", "function": {"name": "has space"}}]},
        "tools",
        ["'tools.0.function.name'", "pattern", "'has space'"],
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "params": {}}}]},
        "tools",
        ["'tools.0.function.params' is unknown", "valid: description, name, parameters, strict"],
    ),
    (
        {"tools": [WEATHER], "tool_choice": "any"},
        "tool_choice",
        ["'tool_choice'", "'none', 'auto' or 'required'", "'any'"],
    ),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        ["'tool_choice'", "'nope'", "not among the tools", "valid: get_weather"],
    ),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {}}},
        "tool_choice",
        ["'tool_choice.function.name' is required"],
    ),
    ({"tool_choice": "auto"}, "tool_choice", ["'tool_choice' is only allowed with tools"]),
    ({"parallel_tool_calls": True}, "parallel_tool_calls", ["only allowed with tools"]),
    (
        {"tools": [WEATHER], "parallel_tool_calls": "yes"},
        "parallel_tool_calls",
        ["valid boolean", "'yes'"],
    ),
    (
        {"response_format": {"type": "xml"}},
        "response_format",
        ["'response_format'", "'text', 'json_object', 'json_schema'", "'xml'"],
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "c"}}},
        "response_format",
        ["'response_format.json_schema.schema' is required"],
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": {}, "x": 1},
            }
        },
        "response_format",
        ["'response_format.json_schema.x' is unknown", "valid: description, name, schema, strict"],
    ),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", ["'stop'", "at most 4"]),
    ({"stop": 5}, "stop", ["'stop'", "valid string", "5"]),
    ({"top_p": 1.5}, "top_p", ["'top_p'", "less than or equal to 1", "1.5"]),
    ({"top_p": True}, "top_p", ["'top_p'", "boolean is not a number"]),
    ({"seed": 1.5}, "seed", ["'seed'", "valid integer"]),
    ({"presence_penalty": 3}, "presence_penalty", ["less than or equal to 2"]),
    ({"frequency_penalty": -2.5}, "frequency_penalty", ["greater than or equal to -2"]),
    ({"logit_bias": {"abc": 1}}, "logit_bias", ["'logit_bias.abc'", "pattern", "'abc'"]),
    ({"logit_bias": {"11": 101}}, "logit_bias", ["'logit_bias.11'", "less than or equal to 100"]),
    ({"logprobs": "yes"}, "logprobs", ["'logprobs'", "valid boolean"]),
    ({"top_logprobs": 2}, "top_logprobs", ["'top_logprobs' needs logprobs set to true"]),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", ["less than or equal to 20"]),
    (
        {"reasoning_effort": "max"},
        "reasoning_effort",
        ["'minimal', 'low', 'medium' or 'high'", "'max'"],
    ),
    ({"user": 7}, "user", ["'user'", "valid string"]),
    (
        {"extra_body": {"model": "x", "tools": []}},
        "extra_body",
        ["'extra_body'", "model, tools", "set them as job fields"],
    ),
    ({"extra_body": {"stream": True}}, "extra_body", ["stream"]),
    ({"extra_body": []}, "extra_body", ["'extra_body'", "valid dictionary"]),
    (
        {"messages": [{"role": "assistant"}]},
        "messages",
        ["'messages.0.content' is required for an assistant message without tool_calls"],
    ),
    (
        {"messages": [{"role": "developer"}]},
        "messages",
        ["'messages.0.content' is required for a developer message"],
    ),
    (
        {"messages": [{"role": "tool", "content": "r"}]},
        "messages",
        ["'messages.0.tool_call_id' is required for a tool message"],
    ),
    (
        {"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]},
        "messages",
        ["'messages.0.tool_call_id' is for a tool message, not a user message"],
    ),
    (
        {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
        "messages",
        ["'messages.0.tool_calls' is for an assistant message, not a user message"],
    ),
    (
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}
            ]
        },
        "messages",
        ["'messages.0.tool_calls.0.function.arguments' is required"],
    ),
    (
        {"messages": [{"role": "assistant", "tool_calls": []}]},
        "messages",
        ["'messages.0.tool_calls'", "at least 1"],
    ),
    (
        {
            "messages": [
                {
                    "role": "tool",
                    "tool_call_id": "c",
                    "content": [{"type": "image_url", "image_url": {"url": "u"}}],
                }
            ]
        },
        "messages",
        ["'messages.0.content' of a tool message takes text parts only (got image_url)"],
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}]},
        "messages",
        ["'messages.0.content.0.video_url.url' is required"],
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "video_url", "video_url": {"url": "u", "fps": 2}}],
                }
            ]
        },
        "messages",
        ["'messages.0.content.0.video_url.fps' is unknown", "valid: url"],
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "bold": True}]}]},
        "messages",
        ["'messages.0.content.0.bold' is unknown", "valid: text, type"],
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": 5}]}]},
        "messages",
        ["'messages.0.content.0.type'", "valid string"],
    ),
    ({"colour": "red"}, "colour", ["'colour' is unknown"]),
]


@pytest.mark.parametrize(("fields", "param", "needles"), BAD_FIELDS)
def test_bad_fields_are_refused_in_one_line_naming_the_param(
    fields: dict, param: str, needles: list[str]
) -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_job(job(**fields))
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.param == param
    for needle in needles:
        assert needle in message, message


def test_a_job_given_as_a_job_has_no_param_error() -> None:
    with pytest.raises(InvalidJob) as caught:
        parse_job({"messages": TEXT})
    assert caught.value.param == "task_class"
    assert InvalidJob("plain").param is None
