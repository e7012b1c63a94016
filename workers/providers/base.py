"""The provider seam: one request in, one completion (with token counts) out.

Every adapter (OpenAI-compatible HTTP, MLX in-process) implements `Provider.complete`
and maps whatever its library raises onto the `ProviderError` tree below, once, at its
boundary. The error's `action` tells the escalation logic what to do next:

    ProviderError
    ├── Retryable       action "retry"     429, 408, 5xx, timeout, connection error,
    │                                       malformed JSON, empty choices
    ├── ModelUnusable   action "next"      401/403 bad key, 404 unknown model, no key set
    │   └── CapabilityRefused              the model refuses a capability the request
    │                                       uses (tools, a response format): kind
    │                                       "unsupported", its `capability` named
    └── Permanent       action "fail"      400 bad request: no other model will do better

Errors cross Celery as JSON, so they carry primitives only (`kind`, `message`,
`retry_after_s`) and `to_dict()` gives exactly those.

Streaming: `Provider.stream` yields `Delta`s as the model writes them, then exactly one
`Completion` (the same one `complete()` would give). Until the first delta nothing has
reached the caller, so a failure raises the error `complete()` would raise for it; after
it, a failure raises `StreamBroken` (a Retryable, kind "stream_broken") carrying the
`partial` Completion of what was written, so the tokens already made can be billed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from urllib.parse import quote

from router.results import Delta as Delta  # adapters yield them


@dataclass(frozen=True)
class CompletionRequest:
    """What a provider is asked to do: one chat completion on one upstream model."""

    model: str  # the provider's own name for the model (catalog `upstream`)
    messages: list[dict[str, Any]]  # OpenAI-style messages, text and image_url parts
    temperature: float | None = None
    max_tokens: int | None = None
    timeout_s: float = 120.0
    # The job's other request-body fields kept for this model (OpenAI names: tools,
    # response_format, stop, seed, ...): an OpenAI-compatible adapter merges them into
    # the body; an adapter takes only those its `OPTIONS` lists (see accepted_options).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    """A provider's answer with its usage. `text` is "" when the answer is only tool
    calls."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    tokens_estimated: bool = False  # True when the provider returned no usage
    provider_cost_usd: float | None = None  # e.g. OpenRouter's usage.cost
    raw_model: str | None = None  # the model name the provider says answered
    extra: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's shape, in order
    finish_reason: str | None = None  # as the provider gave it: stop, length, tool_calls, ...
    refusal: str | None = None
    logprobs: dict[str, Any] | None = None  # the choice's logprobs object
    reasoning: str | None = None  # the message's reasoning_content (or reasoning)


@dataclass(frozen=True)
class EmbeddingRequest:
    """What an embedding model is asked: vectors for `input`, in order (docs/embeddings.md)."""

    model: str  # the provider's own name for the model (catalog `upstream`)
    input: list[str]  # one or more texts; none empty
    dimensions: int | None = None  # shorter vectors (Matryoshka): the first n, normalised
    timeout_s: float = 120.0


@dataclass(frozen=True)
class Embeddings:
    """An embedding model's answer: one vector per input, in the input's order, each of
    the `dimensions` asked for (when asked), with the call's usage."""

    vectors: list[list[float]]
    prompt_tokens: int
    tokens_estimated: bool = False  # True when the provider returned no usage
    provider_cost_usd: float | None = None
    raw_model: str | None = None


class Provider(Protocol):
    def complete(self, request: CompletionRequest) -> Completion: ...

    def embed(self, request: EmbeddingRequest) -> Embeddings:
        """Vectors for the request's texts. Raises the ProviderError tree as complete()
        does; a model that cannot embed raises ModelUnusable (kind "unsupported")."""
        ...

    def stream(self, request: CompletionRequest) -> Iterator[Delta | Completion]:
        """Deltas as they come, then exactly one Completion: the whole answer with its
        usage, as complete() gives it. Raises what complete() would before the first
        delta, StreamBroken after it. Closing the iterator early ends the call."""
        ...


def accepted_options(provider: Provider) -> frozenset[str] | None:
    """The request options (CompletionRequest.options keys) `provider` takes, or None
    for any: an adapter that cannot take them all lists those it can in a class attribute
    `OPTIONS`; the rest are dropped before the call and listed in the job's Result."""
    options: frozenset[str] | None = getattr(provider, "OPTIONS", None)
    return options


@dataclass(frozen=True)
class Caller:
    """Which delivery of which job is calling, from which process: an HTTP adapter sends
    it to the provider (the `X-Fleet-Job` header), so a provider's own request log can be
    held against the ledger call by call (the chaos suite does, with the simulator's),
    and tell the calls of a killed or cut-off process from a live one's. A job id is no
    secret: logs, Flower and the ledger show it, and the gateway serves a job only to the
    app that sent it."""

    job_id: str
    message: int  # which of the job's messages (`sends` in its travelling state)
    delivery: int  # which delivery of that message: more than 1 when it came back
    # The worker process making the call (workers.state.deliveries.this_process(), passed
    # in by the task: this layer does not read fleet state), so the provider's log says
    # whose calls died with a killed or cut-off process.
    process: str | None = None

    def header(self) -> str:
        # Job ids are `[\w.:-]+`, and `\w` admits non-ASCII letters: percent-encoded,
        # the value is plain ASCII, as HTTP headers must be (and a process name holds
        # no `;` or `=` the header's parameters would split on).
        job = quote(self.job_id, safe=":")
        found = f"{job}; message={self.message}; delivery={self.delivery}"
        if self.process is not None:
            found += f"; process={quote(self.process, safe=':')}"
        return found


FLEET_JOB_HEADER = "X-Fleet-Job"
_caller: ContextVar[Caller | None] = ContextVar("fleet_caller", default=None)


@contextmanager
def calling_for(caller: Caller) -> Iterator[None]:
    """Provider calls made inside this block (in this thread) are made for `caller`.
    A context variable rather than a field of CompletionRequest: the task knows the
    delivery, and the code between it and the adapter need not carry it."""
    token = _caller.set(caller)
    try:
        yield
    finally:
        _caller.reset(token)


def current_caller() -> Caller | None:
    return _caller.get()


_on_send: ContextVar[Callable[[], None] | None] = ContextVar("fleet_on_send", default=None)


@contextmanager
def on_send(hook: Callable[[], None]) -> Iterator[None]:
    """Run `hook` when a call made inside this block (in this thread) is about to leave:
    the fleet marks it in flight there (workers/state/inflight.py), as late as it can, so
    that a worker killed before the request left is not billed for it."""
    token = _on_send.set(hook)
    try:
        yield
    finally:
        _on_send.reset(token)


def about_to_send() -> None:
    """Adapters call this once the connection is made and right before the request's first
    byte is written (or an in-process model starts generating). An error the hook raises
    stops the call before it leaves."""
    hook = _on_send.get()
    if hook is not None:
        hook()


@dataclass(frozen=True)
class Target:
    """A model as a worker calls it: its adapter, the provider's name for it, the timeout."""

    provider: Provider
    upstream: str
    timeout_s: float


class ProviderError(Exception):
    """Root of every error a provider adapter raises."""

    action: ClassVar[str] = "fail"

    def __init__(self, kind: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "action": self.action,
            "message": self.message,
            "retry_after_s": self.retry_after_s,
        }


class Retryable(ProviderError):
    """Transient: this model may answer later; the job moves on (or waits Retry-After)."""

    action = "retry"


class ModelUnusable(ProviderError):
    """This model cannot serve any job now (bad key, unknown model): move on."""

    action = "next"


class CapabilityRefused(ModelUnusable):
    """The model (its provider's endpoints) does not serve a capability the request uses,
    though the catalog said it does: move on, and rest the model for that capability."""

    def __init__(self, capability: str, message: str) -> None:
        super().__init__("unsupported", message)
        self.capability = capability

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "capability": self.capability}


class Permanent(ProviderError):
    """The request itself is wrong: trying other models would burn the chain for nothing."""

    action = "fail"


class StreamBroken(Retryable):
    """A stream failed after it had yielded text: the caller has seen part of an answer.
    `partial` is what was written until then, its tokens counted when the provider said
    so, else estimated (`tokens_estimated`): the call is billed for them either way."""

    def __init__(self, message: str, partial: Completion) -> None:
        super().__init__("stream_broken", message)
        self.partial = partial

    def __reduce__(self) -> tuple[Any, ...]:  # pickled and copied with its partial
        return (type(self), (self.message, self.partial))

    def to_dict(self) -> dict[str, Any]:
        partial = self.partial
        return {
            **super().to_dict(),
            "partial": {
                "chars": len(partial.text),
                "prompt_tokens": partial.prompt_tokens,
                "completion_tokens": partial.completion_tokens,
                "tokens_estimated": partial.tokens_estimated,
                "provider_cost_usd": partial.provider_cost_usd,
            },
        }
