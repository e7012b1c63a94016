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
from router.jobs import Job, parse_job
from router.policy import Route
from router.results import Result

DEFAULT_CLASS = "fast_general"
DEFAULT_MAX_TOKENS = 4096  # a budgeted request that names none is held to this
ROUTE_PREFIXES = ("fleet/", "profile/", "focus/")
GATEWAY_FIELDS = ("app", "reservation")  # set by the gateway from the key, never by a client


class UnknownModel(InvalidJob):
    """The request's `model` names no route and no catalog model (404)."""


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request the fleet honours, and its own."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Any]
    temperature: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    n: int | None = None
    stream: bool | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    # The fleet's own fields (the openai SDK sends them with `extra_body`)
    task_class: str | None = None
    source: str | None = None
    priority: int | None = None
    deadline: str | None = None
    timeout_s: float | None = None


def chat_request(body: Any) -> ChatRequest:
    """The body as a ChatRequest, or InvalidJob naming the field and the valid ones."""
    if not isinstance(body, dict):
        raise InvalidJob(f"the body must be a JSON object (got {type(body).__name__})")
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in error["loc"]) or "body"
        if error["type"] == "extra_forbidden":
            raise InvalidJob(
                f"field {field!r} is not supported (valid: {', '.join(ChatRequest.model_fields)})"
            ) from None
        shown = repr(error.get("input"))[:80]
        raise InvalidJob(f"field {field!r}: {error['msg'].lower()} (got {shown})") from None
    if request.stream:
        raise InvalidJob("field 'stream': streaming is not supported yet (valid: false)")
    if request.n not in (None, 1):
        raise InvalidJob(f"field 'n': only one choice is made (valid: 1; got {request.n})")
    return request


def chat_job(request: ChatRequest, app: str, catalog: Catalog) -> Job:
    """The fleet Job an OpenAI chat request asks for."""
    fields: dict[str, Any] = {"messages": request.messages, "app": app}
    fields.update(_route_fields(request.model, request.task_class, catalog))
    max_tokens = request.max_completion_tokens or request.max_tokens
    optional = {
        "temperature": request.temperature,
        "max_tokens": max_tokens,
        "source": request.source,
        "priority": request.priority,
        "deadline": request.deadline,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    metadata = dict(request.metadata or {})
    if request.user is not None:
        metadata.setdefault("user", request.user)
    if metadata:
        fields["metadata"] = metadata
    return parse_job(fields)


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
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.total_tokens,
            "cost": round(cost_of(result, catalog), 9),
        },
    }


def fleet_headers(result: Result) -> dict[str, str]:
    """What the fleet did for the request, in response headers."""
    return {
        "x-fleet-job-id": result.job_id,
        "x-fleet-model": result.model or "",
        "x-fleet-attempts": str(len([a for a in result.attempts if a.outcome != "skipped"])),
        "x-fleet-queues": ",".join(result.queue_path),
    }


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
        rows.append(
            {
                "id": m.id,
                "object": "model",
                "created": 0,
                "owned_by": m.provider,
                "queue": m.queue,
                "tier": m.tier,
                "context_window": m.context_window,
                "capabilities": sorted(m.capabilities),
                "usd_per_mtok_in": m.usd_per_mtok_in,
                "usd_per_mtok_out": m.usd_per_mtok_out,
            }
        )
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
