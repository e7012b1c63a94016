"""A Job: one unit of LLM work as apps, cron and sub-agents hand it to the fleet.

It carries the whole chat request as OpenAI's API names it: every role (system,
developer, user, assistant with its tool calls, tool results), content parts (text,
image and video validated strictly; any other part type passed on unchanged for the
models that take it), tools and tool_choice, response_format, and the sampling fields.
Fields the fleet does not know travel in `extra_body`: passed on to OpenAI-compatible
providers, dropped (and listed in the Result) where the model's adapter cannot take them.

Validated at the door: `parse_job()` refuses a malformed job with one line naming the
field, the bad value and the valid choices, before anything is routed or queued; the
error's `param` names the top-level field, as OpenAI's errors do.
"""

from __future__ import annotations

import json
import types
import typing
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from router.catalog import Source, TaskClass
from router.errors import InvalidJob
from router.tokens import estimate_message_tokens, estimate_tokens

_LITERAL_ERRORS = {"literal_error", "enum"}
_RULE = "job_rule"  # the error type of the fleet's own checks: its message says it all


def _rule(problem: str) -> PydanticCustomError:
    """A check of the fleet's own: `problem` completes 'job field X ...'."""
    return PydanticCustomError(_RULE, problem)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


StrictBool = Annotated[bool, Strict()]


def _not_a_bool(value: Any) -> Any:
    # pydantic reads true/false as 1/0 for a number: a JSON boolean is a wrong type there.
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


NotBool = BeforeValidator(_not_a_bool)

# OpenAI's rule for a function's (and a JSON schema's) name.
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


# --- content parts ----------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: Annotated[str, Field(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: Annotated[str, Field(min_length=1)]


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


class OtherPart(BaseModel):
    """A part type the fleet does not read (input_audio, file, a provider's own): passed
    on exactly as given, for the models that accept it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Annotated[str, Field(min_length=1)]

    @model_serializer(mode="plain")
    def _as_given(self) -> dict[str, Any]:
        # every key, null values included: the part is the provider's business
        return {"type": self.type, **(self.__pydantic_extra__ or {})}


_STRICT_PARTS = {"text", "image_url", "video_url"}


def _part_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in _STRICT_PARTS else "other"


Part = Annotated[
    Annotated[TextPart, Tag("text")]
    | Annotated[ImagePart, Tag("image_url")]
    | Annotated[VideoPart, Tag("video_url")]
    | Annotated[OtherPart, Tag("other")],
    Discriminator(_part_tag),
]


# --- messages ---------------------------------------------------------------------------


class FunctionCall(_Strict):
    name: Annotated[str, Field(min_length=1)]
    arguments: str  # JSON text, as the model wrote it (not checked: models err, clients echo)


class ToolCall(_Strict):
    """A tool call an assistant message made (OpenAI's shape)."""

    id: Annotated[str, Field(min_length=1)]
    type: Literal["function"] = "function"
    function: FunctionCall


Role = Literal["system", "developer", "user", "assistant", "tool"]


class Message(_Strict):
    role: Role
    # before content, so that content's check sees them
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = Field(
        default=None, validate_default=True
    )
    refusal: str | None = None
    tool_call_id: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, validate_default=True
    )
    # None only for an assistant message that made tool calls (or refused)
    content: str | Annotated[list[Part], Field(min_length=1)] | None = Field(
        default=None, validate_default=True
    )
    name: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls_by_role(cls, tool_calls: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if tool_calls is not None and role not in (None, "assistant"):
            raise _rule(f"is for an assistant message, not a {role} message")
        return tool_calls

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id_by_role(cls, tool_call_id: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if role == "tool" and tool_call_id is None:
            raise _rule("is required for a tool message")
        if tool_call_id is not None and role not in (None, "tool"):
            raise _rule(f"is for a tool message, not a {role} message")
        return tool_call_id

    @field_validator("content")
    @classmethod
    def _content_by_role(cls, content: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if content is None and role == "assistant":
            called = info.data.get("tool_calls", True)  # absent: refused already
            if not called and info.data.get("refusal") is None:
                raise _rule("is required for an assistant message without tool_calls")
        elif content is None and role is not None:
            raise _rule(f"is required for a {role} message")
        if role == "tool" and isinstance(content, list):
            kinds = sorted({p.type for p in content if not isinstance(p, TextPart)})
            if kinds:
                raise _rule(f"of a tool message takes text parts only (got {', '.join(kinds)})")
        return content

    def wire(self) -> dict[str, Any]:
        """The message as a provider is sent it: OpenAI's shape, unset fields left out."""
        return self.model_dump(mode="json", exclude_none=True)


# --- tools and response formats ---------------------------------------------------------


class FunctionDef(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ChosenFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    # `schema` is also a (deprecated) BaseModel method: the field is named by alias
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_alias=True, serialize_by_alias=True
    )

    name: FunctionName
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None
    description: str | None = None


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


# --- the job ----------------------------------------------------------------------------

MetadataValue = str | int | float | bool | None


class Reservation(_Strict):
    """What an app's budget set aside for this job before it was queued (the gateway's
    doing): the worker settles it to the job's real cost when the job ends."""

    usd: Annotated[float, Field(ge=0)]
    day: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")]
    month: Annotated[str, Field(pattern=r"^\d{4}-\d{2}$")]


AppName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
Penalty = Annotated[float, Field(ge=-2, le=2), NotBool]
TokenId = Annotated[str, Field(pattern=r"^\d+$")]
Bias = Annotated[int, Field(ge=-100, le=100), NotBool]

# Request-body fields a job may set beyond model, messages, temperature and max_tokens,
# in OpenAI's names (Job.tuning()).
TUNING_FIELDS = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "stop",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "reasoning_effort",
    "user",
)

# A tuning field is sent only to a model with this capability (catalog `capabilities`);
# for any other model it is dropped and listed in the Result. Fields absent here go to
# every model routing chose (tools and response_format are needs: routing saw to them).
TUNING_NEEDS: dict[str, str] = {
    "seed": "seed",
    "logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "reasoning_effort": "reasoning",
    "parallel_tool_calls": "parallel_tool_calls",
}

EMBEDDING = "embedding"  # the task class whose jobs carry `input`, not messages
MAX_INPUTS = 2048  # texts in one embedding job (OpenAI's limit for one request)
# Fields an embedding job cannot set: they shape a chat.
CHAT_ONLY_FIELDS = (
    "stream",
    "temperature",
    "max_tokens",
    "focus",
    "profile",
    "tools",
    "response_format",
)

# Body fields the fleet sets itself: extra_body cannot carry them.
_FLEET_BODY = {"model", "messages", "stream", "stream_options", "temperature", "max_tokens"}


class Job(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[\w.:-]+$")] = Field(
        default_factory=lambda: uuid.uuid4().hex
    )
    task_class: TaskClass
    # An embedding job's texts (one string or a list of them, none empty), and the length
    # of vectors it wants (docs/embeddings.md); every other class takes messages instead.
    input: (
        str
        | Annotated[
            list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_INPUTS)
        ]
        | None
    ) = Field(default=None, validate_default=True)
    dimensions: Annotated[int, Field(gt=0), NotBool] | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = Field(
        default=None, validate_default=True
    )
    focus: str | None = None
    profile: str | None = None
    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2), NotBool] | None = None
    max_tokens: Annotated[int, Field(gt=0), NotBool] | None = None
    source: Source = "app"
    priority: Annotated[int, Field(ge=0, le=9), NotBool] = 5  # 0 highest, as Celery's Redis broker
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    deadline: datetime | None = None
    metadata: dict[str, MetadataValue] = {}
    app: AppName | None = None  # who sent it (the gateway: the app its key names)
    reservation: Reservation | None = None
    # Stream the answer as it is written, to the job's stream on Redis
    # (workers/state/streams.py): `JobHandle.stream()` and the gateway read it.
    stream: StrictBool | None = None
    # The rest of OpenAI's chat request (names and ranges as OpenAI's API has them).
    tools: Annotated[list[Tool], Field(min_length=1)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1), NotBool] | None = None
    seed: Annotated[int, NotBool] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[TokenId, Bias] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), NotBool] | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    user: str | None = None
    # Request fields the fleet does not know, passed on unchanged to OpenAI-compatible
    # providers (dropped, and listed in the Result, for models that cannot take them).
    extra_body: dict[str, Any] = Field(default={}, validate_default=True)

    @field_validator("input")
    @classmethod
    def _input_for_embedding(cls, value: Any, info: ValidationInfo) -> Any:
        task_class = info.data.get("task_class")
        if task_class is None:
            return value  # the class was refused already
        if task_class == EMBEDDING and value is None:
            raise _rule("is required for an embedding job (one text or a list of texts)")
        if task_class != EMBEDDING and value is not None:
            raise _rule(f"is for embedding jobs: a {task_class} job takes messages")
        if isinstance(value, str):
            if not value:
                raise _rule("must not be empty")
            return [value]
        return value

    @field_validator("dimensions")
    @classmethod
    def _dimensions_for_embedding(cls, value: Any, info: ValidationInfo) -> Any:
        task_class = info.data.get("task_class")
        if value is not None and task_class not in (None, EMBEDDING):
            raise _rule(f"is for embedding jobs, not a {task_class} job")
        return value

    @field_validator("messages")
    @classmethod
    def _messages_for_chat(cls, value: Any, info: ValidationInfo) -> Any:
        task_class = info.data.get("task_class")
        if task_class == EMBEDDING and value is not None:
            raise _rule("is for chat jobs: an embedding job takes input")
        if task_class not in (None, EMBEDDING) and value is None:
            raise _rule("is required")
        return value

    @field_validator(*CHAT_ONLY_FIELDS)
    @classmethod
    def _chat_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value is not False and info.data.get("task_class") == EMBEDDING:
            raise _rule("is for chat jobs, not an embedding job")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        if choice is None or "tools" not in info.data:
            return choice  # unset, or tools already refused
        tools: list[Tool] | None = info.data["tools"]
        if tools is None:
            raise _rule(f"is only allowed with tools (got {_shown(_plain(choice))})")
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in tools]
            if choice.function.name not in names:
                raise _rule(
                    f"names function {choice.function.name!r}, which is not among the "
                    f"tools (valid: {', '.join(names)})"
                )
        return choice

    @field_validator("parallel_tool_calls")
    @classmethod
    def _parallel_needs_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and "tools" in info.data and info.data["tools"] is None:
            raise _rule(f"is only allowed with tools (got {_shown(value)})")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and "logprobs" in info.data and info.data["logprobs"] is not True:
            raise _rule(f"needs logprobs set to true (got {value})")
        return value

    @field_validator("extra_body")
    @classmethod
    def _extra_body_is_extra(cls, body: dict[str, Any]) -> dict[str, Any]:
        known = sorted(k for k in body if k in _FLEET_BODY or k in cls.model_fields)
        if known:
            raise _rule(
                f"holds fields the job sets itself: {', '.join(known)} (set them as job fields)"
            )
        return body

    @property
    def has_image(self) -> bool:
        return any(isinstance(part, ImagePart) for part in self._parts())

    @property
    def has_video(self) -> bool:
        return any(isinstance(part, VideoPart) for part in self._parts())

    @property
    def texts(self) -> list[str]:
        """An embedding job's inputs ([] for a chat job)."""
        return list(self.input or ())

    def _parts(self) -> typing.Iterator[Any]:
        for message in self.messages or ():
            if isinstance(message.content, list):
                yield from message.content

    def needs(self) -> frozenset[str]:
        """The capabilities a model must have to serve this job (catalog `capabilities`):
        routing skips the models that lack one. Every other field only tunes."""
        if self.task_class == EMBEDDING:
            return frozenset({"embedding"})
        needs = set()
        if self.tools and self.tool_choice != "none":
            needs.add("tools")
        if self.response_format is not None and self.response_format.type != "text":
            needs.add(self.response_format.type)  # json_object, json_schema
        if self.has_image:
            needs.add("vision")
        if self.has_video:
            needs.add("video")
        return frozenset(needs)

    def tuning(self) -> dict[str, Any]:
        """The request-body fields this job sets besides model, messages, temperature and
        max_tokens, in OpenAI's names and JSON shape, extra_body's fields merged in."""
        body: dict[str, Any] = {}
        for name in TUNING_FIELDS:
            value = getattr(self, name)
            if value is not None:
                body[name] = _plain(value)
        body.update(self.extra_body)
        return body

    def wire_messages(self) -> list[dict[str, Any]]:
        """The messages as a provider is sent them."""
        return [m.wire() for m in self.messages or ()]

    def prompt_tokens(self) -> int:
        """Estimated prompt tokens: the messages (tool calls and results included), the
        tool definitions and a response schema, which providers put in the prompt. An
        embedding job's: its inputs'."""
        if self.input is not None:
            return sum(estimate_tokens(text) for text in self.input)
        tools = [t.model_dump(mode="json", exclude_none=True) for t in self.tools or ()]
        total = estimate_message_tokens(self.wire_messages(), tools=tools)
        if isinstance(self.response_format, JsonSchemaFormat):
            total += estimate_tokens(json.dumps(self.response_format.json_schema.json_schema))
        return total


def _plain(value: Any) -> Any:
    """A field's value as JSON-ready data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# --- errors -----------------------------------------------------------------------------


def parse_job(data: Any) -> Job:
    """A Job from a dict (or a Job), or InvalidJob with one line saying what is wrong
    (its `param`: the top-level field at fault)."""
    if isinstance(data, Job):
        return data
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        error = InvalidJob(describe_validation_error(exc))
        error.param = validation_error_param(exc)
        raise error from exc


def describe_validation_error(exc: ValidationError) -> str:
    """One line for the most useful of pydantic's errors: field, problem, bad value (and
    the valid choices when there are some)."""
    err, loc, model = _chosen(exc)
    field = ".".join(str(p) for p in loc) or "job"
    if err["type"] == "missing":
        return f"job field {field!r} is required"
    if err["type"] == _RULE:
        return f"job field {field!r} {err['msg']}"
    if err["type"] == "extra_forbidden":
        valid = ", ".join(sorted(f.alias or n for n, f in model.model_fields.items()))
        return f"job field {field!r} is unknown (valid: {valid})"
    return f"job field {field!r}: {err['msg']} (got {_shown(err.get('input'))})"


def validation_error_param(exc: ValidationError) -> str | None:
    """The top-level field of the error describe_validation_error() reports, or None."""
    _, loc, _ = _chosen(exc)
    return str(loc[0]) if loc else None


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _chosen(exc: ValidationError) -> tuple[Any, list[Any], type[BaseModel]]:
    """The error to report, with its location (without pydantic's union-branch tags) and
    the model holding its field."""
    errors = [(e, *_resolve(e["loc"])) for e in exc.errors(include_url=False)]
    # A union (a message's `str | list[part]`, tool_choice's `"auto" | {...}`) reports
    # every branch; the branch that went deeper into what was sent speaks to it.
    deepest = [
        e
        for e in errors
        if not any(len(o[1]) > len(e[1]) and o[1][: len(e[1])] == e[1] for o in errors)
    ]
    # Then a rule of the fleet's or a literal error (it lists the valid choices), then an
    # error other than a union branch's wrong type ("Input should be a valid string").
    preferred = _LITERAL_ERRORS | {_RULE}
    return min(
        deepest,
        key=lambda e: (
            0 if e[0]["type"] in preferred else 2 if e[0]["type"].endswith("_type") else 1
        ),
    )


def _resolve(loc: tuple[Any, ...]) -> tuple[list[Any], type[BaseModel]]:
    """pydantic's location without its union-branch tags, and the model holding the
    field: walks the Job's type along the location."""
    clean: list[Any] = []
    model: type[BaseModel] = Job
    kind: Any = Job
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        kind = _unwrap(kind)
        if _is_union(kind):
            branches = [b for b in typing.get_args(kind) if b is not type(None)]
            if len(branches) == 1:  # `X | None`: pydantic tags no branch
                kind = branches[0]
                parts.insert(0, part)
            else:
                kind = _branch(kind, part)  # the part is the branch's tag: not a field
        elif isinstance(kind, type) and issubclass(kind, BaseModel):
            model = kind
            clean.append(part)
            field = _field(kind, part)
            if field is None:
                break  # a field the model does not have (an unknown field)
            kind = kind.model_fields[field].annotation
        elif typing.get_origin(kind) is list:
            clean.append(part)
            kind = typing.get_args(kind)[0]
        elif typing.get_origin(kind) is dict:
            clean.append(part)
            key = bool(parts) and parts[0] == "[key]"  # the key itself is at fault
            if key:
                parts.pop(0)
            kind = typing.get_args(kind)[0 if key else 1]
        else:
            clean.append(part)
            kind = Any
    return clean, model


def _field(model: type[BaseModel], name: Any) -> str | None:
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.alias):
            return field_name
    return None


def _unwrap(kind: Any) -> Any:
    while typing.get_origin(kind) is Annotated:
        kind = typing.get_args(kind)[0]
    return kind


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _branch(union: Any, tag: Any) -> Any:
    """The branch of `union` that pydantic's location tag names."""
    for branch in typing.get_args(union):
        for meta in getattr(branch, "__metadata__", ()):
            if isinstance(meta, Tag) and meta.tag == tag:
                return branch
        plain = _unwrap(branch)
        if isinstance(plain, type) and plain.__name__ == tag:
            return plain
        origin = typing.get_origin(plain)
        if origin is not None and str(tag).startswith(f"{origin.__name__}["):
            return plain
    if isinstance(tag, str) and tag in {m.__name__ for m in _models_of(union)}:
        return next(m for m in _models_of(union) if m.__name__ == tag)
    # a discriminated union's tag is a discriminator value: the branch with that literal
    for model in _models_of(union):
        annotation = model.model_fields.get("type")
        if annotation is not None and tag in typing.get_args(annotation.annotation):
            return model
    return Any


def _models_of(union: Any) -> list[type[BaseModel]]:
    found = []
    for branch in typing.get_args(union):
        plain = _unwrap(branch)
        if isinstance(plain, type) and issubclass(plain, BaseModel):
            found.append(plain)
    return found
