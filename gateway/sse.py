"""A job's stream as OpenAI's server-sent events: `chat.completion.chunk` objects, each
record's events with the record's id (a reconnecting client's Last-Event-ID), then
`data: [DONE]`. A stream that stops after text went out ends with an error event
(`data: {"error": {...}}`, the job's id in it: the openai SDK raises it as APIError)."""

from __future__ import annotations

import json
import time
from typing import Any

from router.results import Delta, Result

DONE = b"data: [DONE]\n\n"


class Chunks:
    """The events of one job's stream, as one client is sent them."""

    def __init__(self, job_id: str, model: str, include_usage: bool) -> None:
        self.job_id, self.model, self.include_usage = job_id, model, include_usage
        self.created = int(time.time())
        self.role_sent = False

    def delta(self, record_id: str, delta: Delta) -> bytes:
        out: dict[str, Any] = {}
        if not self.role_sent:
            out["role"] = "assistant"
            self.role_sent = True
        if delta.text:
            out["content"] = delta.text
        if delta.reasoning:
            out["reasoning_content"] = delta.reasoning
        if delta.tool_calls:
            out["tool_calls"] = list(delta.tool_calls)
        return event(self.chunk(out, None), record_id)

    def end(self, record_id: str, result: Result, cost_usd: float, seen: bool) -> bytes:
        """The answer's end: its finish_reason, then (asked for) its usage, then [DONE].
        `seen`: whether its text went out as deltas (else it goes out here, whole: a job
        that did not stream)."""
        parts = []
        if not seen and (result.text or result.reasoning or result.tool_calls):
            calls = tuple({"index": i, **c} for i, c in enumerate(result.tool_calls))
            parts.append(self.delta("", Delta(result.text or "", result.reasoning or "", calls)))
        finish = self.chunk({}, result.finish_reason or "stop")
        if self.include_usage:
            usage = {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.total_tokens,
                "cost": round(cost_usd, 9),
            }
            parts.append(event(finish, None))
            finish = {**self.chunk(None, None), "choices": [], "usage": usage}
        parts.append(event(finish, None))
        return b"".join(parts) + f"id: {record_id}\n".encode() + DONE

    def chunk(self, delta: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": f"chatcmpl-{self.job_id}",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}
            ],
        }
        if self.include_usage:
            body["usage"] = None  # as OpenAI's: only the last chunk carries it
        return body


def error_event(record_id: str | None, message: str, code: str, job_id: str) -> bytes:
    """The stream stopped: the openai SDK raises this as an APIError with this body."""
    body = {
        "error": {
            "message": message,
            "type": "upstream_error",
            "param": None,
            "code": code,
            "job_id": job_id,
        }
    }
    return event(body, record_id)


def event(body: dict[str, Any], record_id: str | None) -> bytes:
    head = f"id: {record_id}\n" if record_id else ""
    return f"{head}data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()
