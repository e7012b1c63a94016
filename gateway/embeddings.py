"""OpenAI's embeddings API at the door (`POST /v1/embeddings`), and the fleet's
embedding Job and Result behind it (docs/embeddings.md).

    embedding_job(body, app, catalog)   the request -> (a Job of class embedding, format)
    embedding_list(result, format)      a finished Result -> OpenAI's list of embeddings

`model` is `fleet/embedding` (the embedding chain) or an embedding model's catalog id
(that model first, the chain behind it). `input` is one text or a list of texts (token
arrays are refused: the fleet's models are named, not tokenized, at the door);
`dimensions` asks for shorter vectors; `encoding_format` is `float` (the default) or
`base64` (little-endian float32, as OpenAI sends it, and as the fleet keeps vectors).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.shapes import UnknownModel, cost_of, invalid
from router.catalog import Catalog
from router.errors import InvalidJob
from router.jobs import EMBEDDING, Job, parse_job
from router.results import Result

FORMATS = ("float", "base64")


class EmbeddingRequest(BaseModel):
    """OpenAI's embedding request as the fleet takes it; `user` and the fleet's own
    fields (sent with the openai SDK's `extra_body`) besides."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: Any
    dimensions: Any = None
    encoding_format: Any = None
    user: Any = None
    metadata: Any = None
    source: Any = None
    priority: Any = None
    deadline: Any = None


def embedding_job(body: Any, app: str, catalog: Catalog) -> tuple[Job, str]:
    """The request's Job and the encoding its vectors go back in."""
    if not isinstance(body, dict):
        raise invalid(f"the body must be a JSON object (got {type(body).__name__})", None)
    try:
        request = EmbeddingRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        name = str(error["loc"][0]) if error["loc"] else None
        if error["type"] == "extra_forbidden":
            valid = ", ".join(EmbeddingRequest.model_fields)
            raise invalid(f"field {name!r} is unknown (valid: {valid})", name) from None
        raise invalid(f"field {name!r} is required", name) from None
    encoding = request.encoding_format or "float"
    if encoding not in FORMATS:
        raise invalid(
            f"field 'encoding_format' {encoding!r} is not one of {', '.join(FORMATS)}",
            "encoding_format",
        )
    fields: dict[str, Any] = {
        "task_class": EMBEDDING,
        "input": _texts(request.input),
        "app": app,
        **_route(request.model, catalog),
    }
    for name in ("dimensions", "metadata", "source", "priority", "deadline"):
        value = getattr(request, name)
        if value is not None:
            fields[name] = value
    return parse_job(fields), encoding


def _texts(value: Any) -> Any:
    """`input` as the Job takes it: token arrays are refused here, in OpenAI's terms."""
    if isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
        raise invalid(
            "field 'input' must be a string or a list of strings (token arrays are not"
            " taken: send the text)",
            "input",
        )
    return value


def _route(model: str, catalog: Catalog) -> dict[str, Any]:
    if model == f"fleet/{EMBEDDING}":
        return {}
    found = catalog.by_id.get(model)
    if found is not None and found.supports("embedding"):
        return {"model": model}
    embedders = [m.id for m in catalog.models if m.supports("embedding")]
    message = (
        f"model {model!r} is not an embedding model (valid: fleet/{EMBEDDING},"
        f" {', '.join(embedders)})"
    )
    if found is not None:
        raise InvalidJob(message)
    raise UnknownModel(message)


def embedding_list(result: Result, encoding: str, catalog: Catalog) -> dict[str, Any]:
    """OpenAI's embedding list for a Result with vectors; usage with its cost, and what
    the fleet's cache answered (`cached_items`, `cached_tokens`: tokens not paid again)."""
    vectors: list[Any] = list(result.vectors or [])
    if encoding == "float":
        vectors = result.embeddings() or []
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector}
            for i, vector in enumerate(vectors)
        ],
        "model": result.model,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "total_tokens": result.prompt_tokens,
            "cost": round(cost_of(result, catalog), 9),
            "cached_items": sum(a.cached_items for a in result.attempts),
            "cached_tokens": sum(a.cached_tokens for a in result.attempts),
        },
    }
