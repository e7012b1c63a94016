"""Errors of the decision layer, by what the caller should do about them.

    FleetError
    ├── ConfigError        the catalog/policy file is wrong: fix the file
    ├── InvalidJob         the job is wrong: fix the job (nothing was queued)
    │   └── CapabilityUnavailable
    │                      no model of the job's chain can serve what it needs (tools, a
    │                      JSON schema, video): another class, model or request will
    ├── NoRouteAvailable   no model may serve this job now: every model's reason is listed
    └── BatchRefused       some jobs of a dispatch_many batch are wrong or unroutable:
                           one line per job; nothing of the batch was queued

Each renders as one line naming the problem and, where there are any, the valid choices.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class FleetError(Exception):
    """Root of the errors modelfleet raises on purpose."""


class ConfigError(FleetError):
    pass


class InvalidJob(FleetError, ValueError):
    # The request field at fault (OpenAI's error `param`: "messages", "tools", ...), or
    # None when unknown; parse_job() sets it from the validation error's location.
    param: str | None = None


class NoRouteAvailable(FleetError):
    def __init__(self, task_class: str, reasons: Sequence[tuple[str, str]]) -> None:
        self.task_class = task_class
        self.reasons = list(reasons)
        listed = "; ".join(f"{model}: {why}" for model, why in self.reasons) or "empty chain"
        super().__init__(f"no usable model for a {task_class} job ({listed})")

    def __reduce__(self) -> tuple[type, tuple[str, list[tuple[str, str]]]]:
        return (type(self), (self.task_class, self.reasons))


# The request field a capability comes from, for an API error's `param`.
CAPABILITY_PARAMS = {
    "tools": "tools",
    "parallel_tool_calls": "parallel_tool_calls",
    "json_object": "response_format",
    "json_schema": "response_format",
    "vision": "messages",
    "video": "messages",
    "logprobs": "logprobs",
    "seed": "seed",
    "reasoning": "reasoning_effort",
}


class CapabilityUnavailable(InvalidJob):
    """No model of the job's chain can serve a capability the job needs: waiting will not
    help, so it is the job's (or the catalog's) to change. `capability` is the first such
    capability, `param` the request field it comes from; `reasons` lists every model of
    the chain with why it was dropped."""

    def __init__(
        self, chain: str, capabilities: Sequence[str], reasons: Sequence[tuple[str, str]]
    ) -> None:
        self.chain = chain
        self.capabilities = list(capabilities)
        self.capability = self.capabilities[0]
        self.param = CAPABILITY_PARAMS.get(self.capability, self.capability)
        self.reasons = list(reasons)
        listed = ", ".join(f"{model} ({why})" for model, why in self.reasons) or "empty chain"
        super().__init__(
            f"no model of chain {chain} can serve {', '.join(self.capabilities)}: {listed}"
        )

    def __reduce__(self) -> tuple[type, tuple[str, list[str], list[tuple[str, str]]]]:
        return (type(self), (self.chain, self.capabilities, self.reasons))


class BatchRefused(InvalidJob):
    """Jobs of a batch that cannot go (InvalidJob or NoRouteAvailable, each), by index."""

    def __init__(self, errors: Sequence[tuple[int, str]], size: int) -> None:
        self.errors = list(errors)
        self.size = size
        lines = "\n".join(f"job {index}: {message}" for index, message in self.errors)
        super().__init__(f"{len(self.errors)} of {size} jobs refused, none queued:\n{lines}")

    def __reduce__(self) -> tuple[type, tuple[list[tuple[int, str]], int]]:
        return (type(self), (self.errors, self.size))


def choices(values: Iterable[str]) -> str:
    """'a, b, c' for an error message's list of valid choices."""
    return ", ".join(sorted(values))


class JobFailed(FleetError):
    """The job ended without an answer. `result` holds every attempt and its reason.

    Crosses Celery's JSON result backend: its args are a string and a plain dict.
    """

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message, result or {})
        self.message = message
        self.result = result or {}

    def __str__(self) -> str:
        return self.message


class JobRevoked(JobFailed):
    """The job's app revoked it: no answer. `result` holds the attempts made before, as a
    failed job's does, and the job's class and source. The exception a revoked job's
    final state (REVOKED) carries."""

    MESSAGE = "revoked by its app"


class StreamInterrupted(JobFailed):
    """A streaming job's stream stopped after part of its answer went out (the model's
    stream broke, or the worker writing it died): no more of it comes, and none of it is
    sent again. The job itself goes on down its chain, unstreamed: its Result comes from
    `JobHandle.get()` (or the gateway's `GET /v1/jobs/{id}`). `result` holds `job_id`."""
