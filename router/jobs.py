"""A Job: one unit of LLM work as apps, cron and sub-agents hand it to the fleet.

Validated at the door: `parse_job()` refuses a malformed job with one line naming the
field, the bad value and the valid choices, before anything is routed or queued.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from router.catalog import Source, TaskClass
from router.errors import InvalidJob
from router.tokens import estimate_message_tokens

_LITERAL_ERRORS = {"literal_error", "enum"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: Annotated[str, Field(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[Part], Field(min_length=1)]
    name: str | None = None


MetadataValue = str | int | float | bool | None


def _not_a_bool(value: Any) -> Any:
    # pydantic reads true/false as 1/0 for a number: a JSON boolean is a wrong type there.
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


NotBool = BeforeValidator(_not_a_bool)


class Reservation(_Strict):
    """What an app's budget set aside for this job before it was queued (the gateway's
    doing): the worker settles it to the job's real cost when the job ends."""

    usd: Annotated[float, Field(ge=0)]
    day: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")]
    month: Annotated[str, Field(pattern=r"^\d{4}-\d{2}$")]


AppName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class Job(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[\w.:-]+$")] = Field(
        default_factory=lambda: uuid.uuid4().hex
    )
    task_class: TaskClass
    messages: Annotated[list[Message], Field(min_length=1)]
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

    @property
    def has_image(self) -> bool:
        return any(
            isinstance(part, ImagePart)
            for message in self.messages
            if not isinstance(message.content, str)
            for part in message.content
        )

    def prompt_tokens(self) -> int:
        return estimate_message_tokens(self.model_dump(mode="json")["messages"])


def parse_job(data: Any) -> Job:
    """A Job from a dict (or a Job), or InvalidJob with one line saying what is wrong."""
    if isinstance(data, Job):
        return data
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob(describe_validation_error(exc)) from exc


def describe_validation_error(exc: ValidationError) -> str:
    """One line for the most useful of pydantic's errors: field, problem, bad value."""
    errors = exc.errors(include_url=False)
    # A message's content is `str | list[part]`: pydantic reports both branches; when the
    # list branch has its own complaint, it is the one that speaks to what was sent.
    errors = [e for e in errors if not _is_str_branch(e["loc"])] or errors
    # Otherwise a literal error (it lists the valid choices) is the clearest.
    err = next((e for e in errors if e["type"] in _LITERAL_ERRORS), errors[0])
    loc, model = _resolve(err["loc"])
    field = ".".join(str(p) for p in loc) or "job"
    if err["type"] == "missing":
        return f"job field {field!r} is required"
    if err["type"] == "extra_forbidden":
        return f"job field {field!r} is unknown (valid: {', '.join(sorted(model.model_fields))})"
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"job field {field!r}: {err['msg']} (got {shown})"


def _is_str_branch(loc: tuple[Any, ...]) -> bool:
    return any(a == "content" and b == "str" for a, b in itertools.pairwise(loc))


def _resolve(loc: tuple[Any, ...]) -> tuple[list[Any], type[BaseModel]]:
    """pydantic's location without its union-branch tags, and the model holding the field."""
    clean: list[Any] = []
    model: type[BaseModel] = Job
    for i, part in enumerate(loc):
        before = loc[i - 1] if i else None
        if before == "content" and isinstance(part, str):
            continue  # the 'str' / 'list[...]' branch of a message's content
        if isinstance(before, int) and len(clean) > 1 and clean[-2] == "content":
            model = TextPart if part == "text" else ImagePart
            continue  # the discriminator tag of a content part
        if part == "messages":
            model = Message
        elif part == "image_url" and model is ImagePart:
            model = ImageURL
        clean.append(part)
    return clean, model
