"""What a job produces: its attempts and its final Result. Plain data, JSON both ways."""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# orphaned: a call whose worker died before recording its outcome, billed by the job's
# redelivery on estimated tokens (workers/runtime/orphans.py); it is in no Result, only in
# the ledger.
Outcome = Literal["ok", "error", "skipped", "orphaned"]


@dataclass(frozen=True)
class Delta:
    """A piece of an answer as it is written: text, reasoning, or tool-call fragments in
    OpenAI's streaming shape (`{"index", "id"?, "type"?, "function": {"name"?,
    "arguments"}}`: the first fragment of a call carries its id and name, the next ones
    pieces of its arguments, which joined in order give the call's arguments). Providers
    yield them; a streaming job's caller receives them (`JobHandle.stream()`)."""

    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()


class Attempt(BaseModel):
    """One model's try at a job (or a model skipped without a call, with its reason)."""

    model_config = ConfigDict(extra="ignore")

    number: int  # 1-based, in the order tried
    model: str
    queue: str
    tier: str
    outcome: Outcome
    error_kind: str | None = None  # rate_limited, timeout, server_error, auth, no_key, ...
    error: str | None = None  # one line; never holds a secret
    action: str | None = None  # what the error led to: next, retry, fail
    retry_after_s: float | None = None  # a rate limit's Retry-After
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_estimated: bool = False
    provider_cost_usd: float | None = None
    latency_ms: float = 0.0
    worker: str | None = None
    started_at: float = 0.0  # unix seconds
    tools: bool = False  # the call was sent tool definitions
    json_schema: bool = False  # the call asked for a JSON schema (response_format)
    # An embedding job's attempt: the inputs the call embedded, and those the fleet's
    # cache answered for this model instead, with the prompt tokens the cache saved
    # (what those inputs cost when they were embedded). A job answered wholly from the
    # cache has one "ok" attempt with no call: items 0, prompt_tokens 0.
    items: int = 0
    cached_items: int = 0
    cached_tokens: int = 0


class Result(BaseModel):
    """The final word on a job: the answer (or why there is none) and every attempt."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    task_class: str
    source: str
    ok: bool
    text: str | None = None  # "" (or None) when the answer is only tool calls
    model: str | None = None  # the model that answered
    error: str | None = None
    # The answer as the provider gave it, in OpenAI's shapes: every tool call in order
    # ({"id", "type": "function", "function": {"name", "arguments"}}), why it stopped
    # (stop, length, tool_calls, content_filter), a refusal, logprobs, reasoning content.
    tool_calls: list[dict[str, Any]] = []
    finish_reason: str | None = None
    refusal: str | None = None
    logprobs: dict[str, Any] | None = None
    reasoning: str | None = None
    dropped: list[str] = []  # the job's request fields the answering model was not sent
    # An embedding job's answer: one vector per input, in order, each as OpenAI's base64
    # encoding (little-endian float32): a quarter of the JSON floats' size in the result
    # store. `embeddings()` gives them as lists of floats.
    vectors: list[str] | None = None
    attempts: list[Attempt] = []
    metadata: dict[str, str | int | float | bool | None] = {}  # the job's, echoed back
    dispatched_at: float | None = None  # unix seconds
    finished_at: float | None = None

    def embeddings(self) -> list[list[float]] | None:
        """An embedding job's vectors as lists of floats (None for a chat job)."""
        if self.vectors is None:
            return None
        return [decode_vector(v) for v in self.vectors]

    @property
    def latency_ms(self) -> float | None:
        """From dispatch to the final word, through every queue and attempt."""
        if self.dispatched_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.dispatched_at) * 1000

    @property
    def prompt_tokens(self) -> int:
        return sum(a.prompt_tokens for a in self.attempts)

    @property
    def completion_tokens(self) -> int:
        return sum(a.completion_tokens for a in self.attempts)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def queue_path(self) -> list[str]:
        return [a.queue for a in self.attempts if a.outcome != "skipped"]

    def summary(self) -> dict[str, object]:
        """The Result as JSON-ready data, with its totals."""
        return {
            **self.model_dump(mode="json"),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "queue_path": self.queue_path,
            "latency_ms": self.latency_ms,
        }


def encode_vector(vector: Sequence[float]) -> str:
    """A vector as OpenAI's `encoding_format: "base64"` gives it: little-endian float32."""
    return encode_bytes(pack_vector(vector))


def pack_vector(vector: Sequence[float]) -> bytes:
    """A vector as little-endian float32 bytes (how the fleet keeps and sends vectors)."""
    packed = array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def encode_bytes(packed: bytes) -> str:
    """Little-endian float32 bytes as base64 text."""
    return base64.b64encode(packed).decode("ascii")


def decode_vector(encoded: str) -> list[float]:
    packed = array("f")
    packed.frombytes(base64.b64decode(encoded))
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tolist()
