"""The OpenAI wire format at the door, and the fleet's Job and Result behind it.

    chat_job(body, app)      an OpenAI chat completion request -> a fleet Job
    fleet_job(body, app)     a fleet Job sent as JSON to /v1/jobs -> a fleet Job
    completion(result)       a finished Result -> OpenAI's chat.completion object
    model_list(catalog)      every catalog model and route name, in OpenAI's list shape

A request's `model` is a route name: `fleet/<task_class>`, `profile/<name>`,
`focus/<name>`, or a catalog model id (the explicit model of routing rule 1). With a
profile, focus or model id the job's class is the body's `task_class`, or DEFAULT_CLASS.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from router.catalog import TASK_CLASSES, Catalog
from router.costs import PER_MTOK, attempt_cost
from router.errors import InvalidJob
from router.jobs import TUNING_FIELDS, Job, parse_job
from router.policy import Route
from router.results import Result

DEFAULT_CLASS = "fast_general"
DEFAULT_MAX_TOKENS = 4096  # a budgeted request that names none is held to this
ROUTE_PREFIXES = ("fleet/", "profile/", "focus/")
GATEWAY_FIELDS = ("app", "reservation")  # set by the gateway from the key, never by a client


class UnknownModel(InvalidJob):
    """The request's `model` names no route and no catalog model (404)."""


# Fields the door answers itself and so sends to no provider, listed in `x-fleet-dropped`:
# stream_options only means something for a stream (a provider refuses it without one)
DOOR_DROPPED = ("stream_options",)
# The fleet's own Job fields a chat request may not set: the key, the model name and the
# Idempotency-Key header set them; passed on to a provider they would mean nothing
FLEET_ONLY = {
    "id": "the gateway names the job (its id comes back in 'x-fleet-job-id')",
    "app": "it is set by the gateway, from the key",
    "reservation": "it is set by the gateway, from the key",
    "profile": "name the profile as the model: 'profile/<name>'",
    "focus": "name the focus as the model: 'focus/<name>'",
    "idempotency_key": "send it as the 'Idempotency-Key' header",
    "extra_body": "send unknown fields at the top level: the gateway passes them on",
}


class ChatRequest(BaseModel):
    """OpenAI's chat completion request as the fleet takes it, and the fleet's own fields.

    The fields declared here are the door's own; the rest of OpenAI's (`tuning`) pass to
    the Job by name and are validated there. A field the fleet does not know is never
    refused: it goes into the Job's `extra_body`, which passes it on to OpenAI-compatible
    providers and drops it (listed in the Result's `dropped`) for a model whose adapter
    cannot take it. A client on a newer SDK than the fleet keeps working
    (docs/architecture.md, the gateway)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Any]
    temperature: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None  # OpenAI's newer name for max_tokens
    n: Any = None
    stream: Any = None
    stream_options: Any = None
    metadata: dict[str, Any] | None = None
    # The fleet's own fields (the openai SDK sends them with `extra_body`)
    task_class: str | None = None
    source: Any = None
    priority: Any = None
    deadline: Any = None
    timeout_s: float | None = None

    @property
    def tuning(self) -> dict[str, Any]:
        """The rest of OpenAI's fields the Job carries under their own names and validates
        (tools, response_format, stop, seed, ...: TUNING_FIELDS in router/jobs.py)."""
        extra = self.model_extra or {}
        return {k: v for k, v in extra.items() if k in TUNING_FIELDS and v is not None}

    @property
    def unknown(self) -> dict[str, Any]:
        """The request's fields the fleet does not know, to be passed on unchanged."""
        extra = self.model_extra or {}
        return {k: v for k, v in extra.items() if k not in TUNING_FIELDS}

    @property
    def include_usage(self) -> bool:
        """Whether a stream's last chunk carries the usage (`stream_options`)."""
        return bool(
            isinstance(self.stream_options, dict) and self.stream_options.get("include_usage")
        )

    @property
    def door_dropped(self) -> list[str]:
        """The fields the door itself drops (sent to no provider)."""
        return [name for name in DOOR_DROPPED if getattr(self, name) is not None]


def chat_request(body: Any) -> ChatRequest:
    """The body as a ChatRequest, or InvalidJob naming the field (`param`)."""
    if not isinstance(body, dict):
        raise invalid(f"the body must be a JSON object (got {type(body).__name__})", None)
    for name, why in FLEET_ONLY.items():
        if name in body:
            raise invalid(f"field {name!r} may not be sent here: {why}", name)
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in error["loc"]) or "body"
        shown = repr(error.get("input"))[:80]
        message = f"field {field!r}: {error['msg'].lower()} (got {shown})"
        raise invalid(message, str(error["loc"][0]) if error["loc"] else None) from None
    if request.stream is not None and not isinstance(request.stream, bool):
        shown = repr(request.stream)[:80]
        raise invalid(
            f"field 'stream': must be a boolean (valid: true, false; got {shown})", "stream"
        )
    options = request.stream_options
    if options is not None and (
        not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)
    ):
        shown = repr(options)[:80]
        message = (
            "field 'stream_options': must be an object whose 'include_usage' is a boolean"
            f" (got {shown})"
        )
        raise invalid(message, "stream_options")
    if request.n not in (None, 1) or isinstance(request.n, bool):
        raise invalid(f"field 'n': only one choice is made (valid: 1; got {request.n!r})", "n")
    return request


def invalid(message: str, param: str | None) -> InvalidJob:
    """An InvalidJob whose `param` names the request's field at fault (OpenAI's `param`)."""
    exc = InvalidJob(message)
    exc.param = param
    return exc


def chat_job(request: ChatRequest, app: str, catalog: Catalog) -> Job:
    """The fleet Job an OpenAI chat request asks for."""
    fields: dict[str, Any] = {"messages": request.messages, "app": app}
    fields.update(_route_fields(request.model, request.task_class, catalog))
    newer = request.max_completion_tokens
    max_tokens = newer if newer is not None else request.max_tokens
    optional = {
        "temperature": request.temperature,
        "max_tokens": max_tokens,
        "source": request.source,
        "priority": request.priority,
        "deadline": request.deadline,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    fields.update(request.tuning)
    if request.unknown:
        fields["extra_body"] = request.unknown
    metadata = dict(request.metadata or {})
    if isinstance(user := request.tuning.get("user"), str):
        metadata.setdefault("user", user)
    if metadata:
        fields["metadata"] = metadata
    try:
        return parse_job(fields)
    except InvalidJob as exc:
        if newer is not None and exc.param == "max_tokens":
            exc.param = "max_completion_tokens"
        raise


def _route_fields(model: str, task_class: str | None, catalog: Catalog) -> dict[str, Any]:
    name = model.partition("/")[2]
    if model.startswith("fleet/"):
        if name not in TASK_CLASSES:
            raise UnknownModel(_unknown(model))
        if task_class not in (None, name):
            raise InvalidJob(f"field 'task_class' {task_class!r} contradicts model {model!r}")
        return {"task_class": name}
    cls = task_class or DEFAULT_CLASS
    if model.startswith("profile/") and name in catalog.policy.profiles:
        return {"task_class": cls, "profile": name}
    if model.startswith("focus/") and name in catalog.policy.focus:
        return {"task_class": cls, "focus": name}
    if model in catalog.by_id:
        return {"task_class": cls, "model": model}
    raise UnknownModel(_unknown(model))


def _unknown(model: str) -> str:
    return (
        f"model {model!r} not found (valid: fleet/<task_class>, profile/<name>, focus/<name>"
        " or a catalog model id; GET /v1/models lists them)"
    )


def fleet_job(body: Any, app: str) -> Job:
    """A fleet Job sent to /v1/jobs, as `dispatch()` takes it."""
    if not isinstance(body, dict):
        raise InvalidJob(f"the body must be a JSON object (got {type(body).__name__})")
    for name in GATEWAY_FIELDS:
        if name in body:
            raise InvalidJob(f"job field {name!r} is set by the gateway, from the key")
    return parse_job({**body, "app": app})


def worst_cost(catalog: Catalog, decision: Route) -> float:
    """The most one call of this job may cost: its prompt and max_tokens on the dearest
    paid model of its chain (free, local and subscription models cost nothing a call)."""
    worst = 0.0
    for hop in decision.chain:
        model = catalog.model(hop.model)
        if model.tier == "paid":
            tokens_out = decision.max_tokens or DEFAULT_MAX_TOKENS
            usd = decision.prompt_tokens * model.usd_per_mtok_in
            usd += tokens_out * model.usd_per_mtok_out
            worst = max(worst, usd / PER_MTOK)
    return worst


def cost_of(result: Result, catalog: Catalog) -> float:
    return sum(attempt_cost(catalog.by_id.get(a.model), a).usd for a in result.attempts)


def completion(result: Result, catalog: Catalog) -> dict[str, Any]:
    """OpenAI's chat.completion object for a Result that has an answer."""
    return {
        "id": f"chatcmpl-{result.job_id}",
        "object": "chat.completion",
        "created": int(result.finished_at or time.time()),
        "model": result.model,
        "choices": [
            {
                "index": 0,
                "message": message(result),
                "finish_reason": result.finish_reason or "stop",
                "logprobs": result.logprobs,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.total_tokens,
            "cost": round(cost_of(result, catalog), 9),
        },
    }


def message(result: Result) -> dict[str, Any]:
    """The answer as OpenAI's assistant message: `content` null when the answer is only
    tool calls; `tool_calls` when there are any; `reasoning_content` when the provider
    gave its reasoning (the name DeepSeek's and vLLM's APIs use)."""
    tool_calls = result.tool_calls
    out: dict[str, Any] = {
        "role": "assistant",
        "content": result.text if result.text or not tool_calls else None,
        "refusal": result.refusal,
    }
    if tool_calls:
        out["tool_calls"] = tool_calls
    reasoning = result.reasoning
    if reasoning:
        out["reasoning_content"] = reasoning
    return out


def fleet_headers(result: Result, door_dropped: list[str] | None = None) -> dict[str, str]:
    """What the fleet did for the request, in response headers: `x-fleet-dropped` lists
    the request's fields the answering model was not sent (and those the door drops)."""
    headers = {
        "x-fleet-job-id": result.job_id,
        "x-fleet-model": result.model or "",
        "x-fleet-attempts": str(len([a for a in result.attempts if a.outcome != "skipped"])),
        "x-fleet-queues": ",".join(result.queue_path),
    }
    dropped = [*(door_dropped or []), *result.dropped]
    if dropped:
        headers["x-fleet-dropped"] = ",".join(dict.fromkeys(dropped))
    return headers


def model_list(catalog: Catalog) -> dict[str, Any]:
    """Every catalog model and every route name, in OpenAI's list shape."""
    rows: list[dict[str, Any]] = []
    for cls in TASK_CLASSES:
        rows.append(_virtual(f"fleet/{cls}", "task class", cls))
    for name in sorted(catalog.policy.profiles):
        rows.append(_virtual(f"profile/{name}", "profile", catalog.policy.profiles[name].model))
    for name in sorted(catalog.policy.focus):
        rows.append(_virtual(f"focus/{name}", "focus", catalog.policy.focus[name]))
    for m in catalog.models:
        listing = m.listing()
        provider = listing.pop("provider")
        rows.append({"id": m.id, "object": "model", "created": 0, "owned_by": provider, **listing})
    return {"object": "list", "data": rows}


def _virtual(name: str, kind: str, target: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "modelfleet",
        "route": kind,
        "primary": target if kind != "task class" else None,
        "task_class": target if kind == "task class" else None,
    }
