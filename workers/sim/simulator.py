"""A provider simulator: an OpenAI-compatible chat and embeddings server with scriptable faults.

`fleet demo`, the tests and the bench use it in place of every remote provider. It is a
small asyncio HTTP/1.1 server (stdlib only, keep-alive, one event loop thread), so it holds
thousands of slow requests in flight without a thread each.

Endpoints (every path also works with a `/v1` prefix, so base URLs with or without it do):

    POST /chat/completions   an OpenAI-style chat completion (see "Answers" below)
    POST /embeddings         OpenAI-style embeddings (see "Embeddings" below)
    GET  /models             the configured model names
    POST /_sim/config        merge {"models": {NAME: SETTINGS}, "default": SETTINGS}
    GET  /_sim/config        the current configuration
    POST /_sim/reset         clear the configuration and the request log
    GET  /_sim/requests      the log of model calls received, one entry each: model,
                             endpoint (chat/completions or embeddings), t (arrival,
                             epoch s), fault, authorization_present
                             (never the key), temperature, max_tokens, images, the fleet's
                             caller from the X-Fleet-Job header (job, job_message,
                             job_delivery, job_process; None when absent), and `body`:
                             the request body as received, every field included (None
                             once BODIES_KEPT newer requests came), so a test can check
                             what reached the provider; and for a streamed answer
                             `stream` true, `chunks` (events sent so far, [DONE]
                             included) and `stream_end` (done, cut, error, stalled,
                             gone: the client left first); for an embeddings call
                             `input` (the texts, in order; None once its body is)
                             and `dimensions`

SETTINGS (all optional): `latency_ms` delay before answering; `faults` a queue of faults
consumed one per request; `fault` a fault applied to every request; `usage: false` to
answer without a usage object; `cost` a number put in `usage.cost` (OpenRouter style);
`tools: false` for a model that takes no tools (below); `chunk_ms` the time between two
events of a streamed answer (`latency_ms` comes before the first); for an embedding model
`embedding_size` its vectors' length (768 unless set), `ignore_dimensions: true` to answer
whole vectors whatever `dimensions` asks (as Ollama does), `reverse_data: true` to list
the vectors last input first (each with its `index`, as OpenAI allows).

Embeddings. Each input text gets a unit vector drawn from its sha256 (`embedding_of`):
the same text, the same vector, whatever else the request holds. `dimensions` gives the
first n numbers of that vector scaled to unit length again (a Matryoshka model's way; a
400 when more than the model's size); `encoding_format: "base64"` gives each as
little-endian float32. Usage: `prompt_tokens` and `total_tokens`, the texts' estimated
tokens (with `cost` when set). Faults and directives (in any input text) apply as to a
chat completion that does not stream; `empty` answers `data: []`.

Answers. The simulator answers as a model that obeys the request would, deterministically
(the same request, the same answer):
- plain: `[sim MODEL] ` and the start of the last user text (directives removed);
- `tools` given, `tool_choice` not "none", and no tool result since the last user message:
  `tool_calls` with `content` null and finish_reason "tool_calls"; each call's id is
  `call_...` and its `arguments` a JSON object valid against the tool's `parameters`
  schema (workers/sim/schema_values.py). The tool called: the one `tool_choice` names;
  else every tool, one call each, when the last user message holds `[[sim:parallel]]` and
  `parallel_tool_calls` is not false; else the first tool whose name the last user message
  holds, or the first tool. A `tool_choice` naming no given tool is a 400, as OpenAI's;
- after tool results (a `tool` message after the last user message): a final text quoting
  each result with its function's name, `[sim MODEL] get_weather returned {...}`,
  finish_reason "stop";
- `response_format` json_object: a JSON object text (`{"answer": TEXT}`); json_schema: a
  JSON value valid against the given schema;
- finish_reason "length" when the text's estimated tokens exceed `max_tokens` (the text is
  left whole, so tests can read it; usage.completion_tokens is capped at max_tokens);
- `logprobs: true`: `choices[0].logprobs` with made-up values for each piece of the text and
  `top_logprobs` alternatives each; `reasoning_effort` set: `message.reasoning_content`.

Streaming. A request with `"stream": true` gets the same answer as server-sent events in
OpenAI's chunk format, over HTTP chunked encoding: a first chunk with the role, then the
reasoning (`delta.reasoning_content`), the text (with its logprobs when asked), the refusal
and each tool call (a fragment with its index, id and name, then its arguments) in pieces
of about a word, a chunk with the finish_reason, a chunk of usage (no choices; with
`cost` when set) when `stream_options.include_usage` is true, and `data: [DONE]`. Faults
that fail a request fail it before the stream begins, as they fail a whole answer (a
status fault is answered with its status and error JSON; `stall` sends the stream's head
and half an event; `malformed` an event that is not JSON; `empty` no choice, only the
usage).

Models without tools: upstream names given with `--no-tools a,b`, the env var SIM_NO_TOOLS
(comma-separated; read by the CLI and by `Simulator()` when `no_tools` is not given) or the
model setting `tools: false` answer a request carrying `tools` with OpenRouter's 404:
`{"error": {"message": "No endpoints found that support tool use. ...", "code": 404}}`.

A prompt can script a fault for itself: `[[sim:MODEL=FAULT]]` applies FAULT when the
request's model is MODEL (or MODEL is `provider/` + the request's model, a fleet id), and
`[[sim:*=FAULT]]` applies to any model. Precedence: directive, then queue, then sticky.
Flags in the last user message shape the answer: `[[sim:parallel]]` (one call per tool,
above), `[[sim:refuse]]` (content null, `message.refusal` set), `[[sim:filter]]` (empty
content, finish_reason "content_filter").

Faults: 429, 429:N (Retry-After: N s), 429:date:N (Retry-After as an HTTP-date), 408,
400, 401, 403, 404, 500, 502, 503 (OpenAI-style error JSON); `timeout` (no answer for an
hour), `stall` (headers and half the body, then nothing), `malformed` (200, not JSON),
`empty` (200, `choices: []`), `reset` (the socket is closed with a TCP reset).
Faults of a stream once begun, after N events (the role chunk is the first; a request
that does not stream answers whole, unharmed): `cut-after:N` (the connection is closed
without the body's end), `error-after:N` (OpenRouter's error event under HTTP 200:
`data: {"error": {"code": "server_error", ...}, "choices": [{"finish_reason": "error",
...}]}`, then the body ends without [DONE]), `stall-after:N` (nothing more is sent). A
prompt scripts them as any fault: `[[sim:*=cut-after:4]]`.

Run it with `python -m workers.sim.simulator --host 127.0.0.1 --port 0 [--config FILE]
[--no-tools a,b]`, or from Python with `Simulator(port=0).start()`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import email.utils
import hashlib
import http
import itertools
import json
import math
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote

from router.results import encode_vector
from router.tokens import estimate_message_tokens, estimate_tokens
from workers.sim.schema_values import arguments_for, value_for

MALFORMED = b'{"id": "chatcmpl-sim", "choices": [ this is not json'
HOLD_S = 3600.0  # how long `timeout` and `stall` keep a client waiting
MAX_BODY = 64 * 1024 * 1024  # request bodies above this are refused (413)
LOG_SIZE = 100_000  # the request log keeps the newest entries only
BODIES_KEPT = 1_000  # the newest entries of the log keep the request body they came with
SETTING_KEYS = {
    "latency_ms",
    "faults",
    "fault",
    "usage",
    "cost",
    "tools",
    "chunk_ms",
    "embedding_size",
    "ignore_dimensions",
    "reverse_data",
}
EMBEDDING_SIZE = 768  # a vector's length, unless the model's `embedding_size` says
NO_TOOLS_ENV = "SIM_NO_TOOLS"  # upstream model names answering 404 to requests with tools
NO_TOOL_USE = (  # OpenRouter's words when no provider of the model takes tools
    "No endpoints found that support tool use. To learn more about provider routing, "
    "visit: https://openrouter.ai/docs/provider-routing"
)

_STATUS_FAULTS = {"400", "401", "403", "404", "408", "429", "500", "502", "503"}
_OTHER_FAULTS = {"timeout", "stall", "malformed", "empty", "reset"}
_STREAM_FAULTS = {"cut-after", "error-after", "stall-after"}  # `cut-after:N`: streams only
_ERROR_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout_error", "request_timeout"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
_DIRECTIVE = re.compile(r"\[\[sim:([^=\]]+)=([^\]]+)\]\]")
_FLAG = re.compile(r"\[\[sim:(\w+)\]\]")  # [[sim:parallel]], [[sim:refuse]], ...
_FLAGS = {"parallel", "refuse", "filter"}
_PIECES = re.compile(r" ?\w+| ?[^\w\s]+|\s+")  # the tokens logprobs are given for


def check_fault(fault: str) -> str:
    """Return `fault` if it names a known fault, else raise ValueError."""
    parts = fault.split(":")
    if fault in _STATUS_FAULTS or fault in _OTHER_FAULTS:
        return fault
    if parts[0] == "429" and len(parts) in (2, 3) and (len(parts) == 2 or parts[1] == "date"):
        with contextlib.suppress(ValueError):
            float(parts[-1])
            return fault
    if parts[0] in _STREAM_FAULTS and len(parts) == 2 and parts[1].isdigit():
        return fault
    raise ValueError(f"unknown simulator fault {fault!r}")


def _check_settings(settings: Any) -> dict[str, Any]:
    if not isinstance(settings, dict) or not set(settings) <= SETTING_KEYS:
        raise ValueError(f"model settings must be an object with keys {sorted(SETTING_KEYS)}")
    for fault in [settings.get("fault"), *(settings.get("faults") or [])]:
        if fault is not None:
            check_fault(str(fault))
    for flag in ("tools", "ignore_dimensions", "reverse_data"):
        if not isinstance(settings.get(flag, True), bool):
            raise ValueError(f"model setting `{flag}` must be true or false")
    size = settings.get("embedding_size", EMBEDDING_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError("model setting `embedding_size` must be a positive integer")
    return settings


class _State:
    """Configuration, fault queues and the request log, shared by threads under one lock.

    `no_tools` (upstream model names that refuse tools) is fixed at start: a reset keeps
    it, as it describes the providers rather than a test's script."""

    def __init__(self, no_tools: Iterable[str] = ()) -> None:
        self.lock = threading.Lock()
        self.models: dict[str, dict[str, Any]] = {}
        self.default: dict[str, Any] = {}
        self.no_tools = frozenset(no_tools)
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=LOG_SIZE)
        self.with_body: collections.deque[dict[str, Any]] = collections.deque()

    def configure(self, config: dict[str, Any]) -> None:
        """Merge `config`: each model's given settings replace the previous ones."""
        if not isinstance(config, dict) or not set(config) <= {"models", "default"}:
            raise ValueError('config must be {"models": {...}, "default": {...}}')
        models = {str(k): _check_settings(v) for k, v in (config.get("models") or {}).items()}
        default = _check_settings(config.get("default") or {})
        with self.lock:
            for name, settings in models.items():
                self.models.setdefault(name, {}).update(_copy(settings))
            self.default.update(_copy(default))

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            copied: dict[str, Any] = json.loads(
                json.dumps({"models": self.models, "default": self.default})
            )
            return copied

    def reset(self) -> None:
        with self.lock:
            self.models.clear()
            self.default.clear()
            self.log.clear()
            self.with_body.clear()

    def plan(self, model: str, directive: str | None) -> tuple[dict[str, Any], str | None]:
        """Settings for one request of `model` and the fault it gets (consuming a queue)."""
        with self.lock:
            own = self.models.get(model, {})
            settings = {**self.default, **own}
            queue = own.get("faults") if own.get("faults") else self.default.get("faults")
            queued = queue.pop(0) if queue else None
            return settings, directive or queued or settings.get("fault")

    def record(self, entry: dict[str, Any]) -> None:
        """Log `entry`; the entry BODIES_KEPT requests older loses its body (to None), and
        an embedding call's entry its input too."""
        with self.lock:
            self.log.append(entry)
            self.with_body.append(entry)
            if len(self.with_body) > BODIES_KEPT:
                old = self.with_body.popleft()
                old["body"] = None
                if "input" in old:
                    old["input"] = None

    def takes_tools(self, model: str, settings: dict[str, Any]) -> bool:
        return model not in self.no_tools and settings.get("tools", True) is not False


def _copy(settings: dict[str, Any]) -> dict[str, Any]:
    out = dict(settings)
    if "faults" in out:
        out["faults"] = [str(f) for f in out["faults"] or []]
    if out.get("fault") is not None:
        out["fault"] = str(out["fault"])
    return out


def _texts(messages: list[Any]) -> list[tuple[str, str]]:
    """(role, text) of every text piece of the messages, in order."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts or ():
            if isinstance(part, dict) and part.get("type") == "text":
                out.append((str(message.get("role")), str(part.get("text", ""))))
    return out


def _directive_fault(model: str, texts: list[tuple[str, str]]) -> str | None:
    for _, text in texts:
        for target, fault in _DIRECTIVE.findall(text):
            if target == "*" or target == model or target.endswith("/" + model):
                return str(fault).strip()
    return None


def _fleet_job(header: str | None) -> dict[str, Any]:
    """The fleet's caller, from `X-Fleet-Job: <job id>; message=N; delivery=N;
    process=P` (sent by workers/providers/openai_compat.py): which job, message and
    delivery made the call, and from which worker process."""
    found: dict[str, Any] = {
        "job": None,
        "job_message": None,
        "job_delivery": None,
        "job_process": None,
    }
    if not header:
        return found
    job, *params = header.split(";")
    found["job"] = unquote(job.strip()) or None
    for param in params:
        name, _, value = param.strip().partition("=")
        if name in ("message", "delivery"):
            with contextlib.suppress(ValueError):
                found[f"job_{name}"] = int(value)
        elif name == "process":
            found["job_process"] = unquote(value.strip()) or None
    return found


Answer = tuple[int, bytes, dict[str, str]]  # status, body, extra headers


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> Answer:
    return status, json.dumps(obj).encode(), headers or {}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Answer:
    kind, code = _ERROR_TYPES.get(status, ("server_error", "server_error"))
    return _json(status, {"error": {"message": message, "type": kind, "code": code}}, headers)


def _head(status: int, length: int, headers: dict[str, str], keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    lines += [f"{k}: {v}" for k, v in {"Content-Type": "application/json", **headers}.items()]
    lines.append(f"Content-Length: {length}")
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Request:
    """One parsed HTTP request."""

    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.method, target, version = [*lines[0].split(" ", 2), "", ""][:3]
        path = target.split("?", 1)[0].rstrip("/")
        self.path = path[3:] if path.startswith("/v1/") else path  # /v1 is optional
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        connection = self.headers.get("connection", "").lower()
        self.keep_alive = connection != "close" and (
            version == "HTTP/1.1" or connection == "keep-alive"
        )
        self.length = int(self.headers.get("content-length") or 0)
        self.body: Any = None  # the parsed JSON body, None when absent or not JSON

    @property
    def supported(self) -> bool:
        return self.length <= MAX_BODY and "chunked" not in self.headers.get(
            "transfer-encoding", ""
        )


class _Connection:
    """One client connection: reads requests in turn and answers them (HTTP keep-alive)."""

    def __init__(
        self, state: _State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.state, self.reader, self.writer = state, reader, writer

    async def serve(self) -> None:
        try:
            while await self.serve_one():
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away mid-request
        except ValueError:
            pass  # garbage in the request head (a bad Content-Length): just hang up
        finally:
            self.writer.close()

    async def serve_one(self) -> bool:
        """Read and answer one request; False when the connection must close."""
        try:
            request = _Request(await self.reader.readuntil(b"\r\n\r\n"))
        except asyncio.IncompleteReadError:
            return False  # the client closed the connection between requests
        if not request.supported:
            await self.send(_error(413, "body too large, or chunked"), keep_alive=False)
            return False
        if request.headers.get("expect", "").lower() == "100-continue":  # curl, large bodies
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        payload = await self.reader.readexactly(request.length)
        with contextlib.suppress(ValueError):
            request.body = json.loads(payload) if payload else {}
        if request.method == "POST" and request.path == "/chat/completions":
            return await _Completer(self, request).run()
        if request.method == "POST" and request.path == "/embeddings":
            return await _Embedder(self, request).run()
        await self.send(self.control(request), request.keep_alive)
        return request.keep_alive

    def control(self, request: _Request) -> Answer:
        """The models list and the /_sim control API."""
        state, body = self.state, request.body
        route = f"{request.method} {request.path}"
        if body is None:
            return _error(400, "request body is not JSON")
        if route == "GET /models":
            models = [
                {"id": name, "object": "model", "created": 0, "owned_by": "simulator"}
                for name in sorted(state.snapshot()["models"])
            ]
            return _json(200, {"object": "list", "data": models})
        if route == "POST /_sim/config":
            try:
                state.configure(body)
            except (ValueError, TypeError) as exc:
                return _error(400, str(exc))
            return _json(200, state.snapshot())
        if route == "GET /_sim/config":
            return _json(200, state.snapshot())
        if route == "POST /_sim/reset":
            state.reset()
            return _json(200, {"ok": True})
        if route == "GET /_sim/requests":
            with state.lock:
                return _json(200, list(state.log))
        return _error(404, f"no route {route}")

    async def send(self, answer: Answer, keep_alive: bool) -> None:
        status, body, headers = answer
        self.writer.write(_head(status, len(body), headers, keep_alive) + body)
        await self.writer.drain()

    async def hold(self, seconds: float) -> bool:
        """Wait `seconds`; False if the client hung up first (its socket then frees at once)."""
        try:
            await asyncio.wait_for(self.reader.read(1), seconds)
        except TimeoutError:
            return True
        return False  # EOF, or a pipelined byte we will not parse: close either way

    def reset(self) -> None:
        """Drop the connection with a TCP reset (SO_LINGER 0), as a crashing server would."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


class _Call:
    """One call of a model (a chat completion, an embedding): logged, its fault picked and
    applied, its latency waited, then answered as the endpoint's subclass says."""

    endpoint = ""  # the path it serves, as the log names it

    def __init__(self, conn: _Connection, request: _Request) -> None:
        self.conn, self.request = conn, request
        body = request.body if isinstance(request.body, dict) else {}
        self.body: dict[str, Any] = body
        self.model = str(body.get("model") or "")
        self.entry: dict[str, Any] = {}  # this request's entry in the log

    def shapeless(self) -> str | None:
        """Why the body is not a request of this endpoint (a 400), if it is not."""
        raise NotImplementedError

    def texts_said(self) -> list[tuple[str, str]]:
        """(role, text) of the request's texts: where directives are looked for."""
        raise NotImplementedError

    def logged(self) -> dict[str, Any]:
        """The endpoint's own fields of the request's log entry."""
        raise NotImplementedError

    def answer(self, settings: dict[str, Any], fault: str | None) -> Answer:
        """The answer of a call that is not held, cut or streamed."""
        raise NotImplementedError

    async def run(self) -> bool:
        conn, keep_alive = self.conn, self.request.keep_alive
        shapeless = self.shapeless()
        if shapeless is not None:
            await conn.send(_error(400, shapeless), keep_alive)
            return keep_alive
        settings, fault = conn.state.plan(
            self.model, _directive_fault(self.model, self.texts_said())
        )
        self.log(fault)
        try:
            fault = check_fault(fault) if fault is not None else None
        except ValueError as exc:
            await conn.send(_error(400, f"simulator: {exc}"), keep_alive)
            return keep_alive
        if fault == "reset":
            conn.reset()
            return False
        if fault == "timeout":
            await conn.hold(HOLD_S)
            return False
        delay = float(settings.get("latency_ms") or 0) / 1000
        if delay > 0 and not await conn.hold(delay):
            return False  # the client gave up waiting
        return await self.respond(settings, fault)

    async def respond(self, settings: dict[str, Any], fault: str | None) -> bool:
        """Answer whole (or stall): the faults that end the call early are applied."""
        if fault == "stall":
            await self.stall()
            return False
        try:
            answer = self.answer(settings, fault)
        except Exception as exc:  # a simulator bug: say so rather than drop the connection
            answer = _error(500, f"simulator failed: {type(exc).__name__}: {exc}")
        await self.conn.send(answer, self.request.keep_alive)
        return self.request.keep_alive

    def log(self, fault: str | None) -> None:
        self.entry = {
            "model": self.model,
            "endpoint": self.endpoint,
            "t": time.time(),
            "fault": fault,
            "authorization_present": bool(self.request.headers.get("authorization")),
            "temperature": None,
            "max_tokens": None,
            "images": 0,
            # the caller's end of the connection, so a test can tell which process called
            "client_port": (self.conn.writer.get_extra_info("peername") or ("", 0))[1],
            **_fleet_job(self.request.headers.get("x-fleet-job")),
            # everything the provider was sent (headers aside), for tests to check fields
            "body": self.request.body,
            # a stream's progress: events sent so far ([DONE] included), and how it ended
            "stream": False,
            "chunks": None,
            "stream_end": None,
        }
        self.entry.update(self.logged())
        self.conn.state.record(self.entry)

    async def stall(self) -> None:
        """Headers with a Content-Length, half the body, then silence until the client quits."""
        body = json.dumps({"choices": [{"message": {"content": "never finished"}}]}).encode()
        self.conn.writer.write(_head(200, len(body), {}, False) + body[: len(body) // 2])
        await self.conn.writer.drain()
        await self.conn.hold(HOLD_S)


def _status_fault(fault: str | None, model: str) -> Answer | None:
    """The error answer of a status fault (`503`, `429:N`, `429:date:N`), if it is one."""
    if fault is None or fault.split(":")[0] not in _STATUS_FAULTS:
        return None
    status, *rest = fault.split(":")
    headers = {}
    if rest and rest[0] == "date":
        ahead = time.time() + float(rest[1])
        headers["Retry-After"] = email.utils.formatdate(ahead, usegmt=True)
    elif rest:
        headers["Retry-After"] = rest[0]
    return _error(int(status), f"simulated {status} for model {model}", headers)


class _Completer(_Call):
    """Answers one chat completion request: logs it, picks its fault, applies it, or
    answers as a model obeying the request would (tool calls, JSON, logprobs, ...)."""

    endpoint = "chat/completions"

    def __init__(self, conn: _Connection, request: _Request) -> None:
        super().__init__(conn, request)
        body = self.body
        self.messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        self.texts = _texts(self.messages)
        self.max_tokens = body.get("max_tokens")
        tools = body.get("tools")
        self.tools = [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
        self.last_user = next(
            (i for i in range(len(self.messages) - 1, -1, -1) if _role(self.messages[i]) == "user"),
            -1,
        )
        user_text = _text_of(self.messages[self.last_user]) if self.last_user >= 0 else ""
        self.user_text = user_text
        self.flags = {f for f in _FLAG.findall(user_text) if f in _FLAGS}
        self.streams = body.get("stream") is True

    def shapeless(self) -> str | None:
        body = self.request.body
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return "body must be a JSON object with `messages`"
        return None

    def texts_said(self) -> list[tuple[str, str]]:
        return self.texts

    async def respond(self, settings: dict[str, Any], fault: str | None) -> bool:
        if self.streams:
            return await _Streamer(self, settings, fault).run()
        return await super().respond(settings, fault)

    def logged(self) -> dict[str, Any]:
        images = sum(
            1
            for m in self.messages
            if isinstance(m.get("content"), list)
            for p in m["content"]
            if isinstance(p, dict) and p.get("type") == "image_url"
        )
        return {
            "temperature": self.body.get("temperature"),
            "max_tokens": self.max_tokens,
            "images": images,
            "stream": self.streams,
            "chunks": 0 if self.streams else None,
        }

    def answer(self, settings: dict[str, Any], fault: str | None) -> Answer:
        """The completion, or the error answer a fault or the request asks for."""
        if fault == "malformed":
            return 200, MALFORMED, {}
        return self.refusal(settings, fault) or _json(200, self.completion(settings, fault))

    def refusal(self, settings: dict[str, Any], fault: str | None) -> Answer | None:
        """The error answer a status fault or the request itself calls for, if any."""
        status = _status_fault(fault, self.model)
        if status is not None:
            return status
        invalid = self.invalid()
        if invalid:
            return _error(400, invalid)
        if self.tools and not self.conn.state.takes_tools(self.model, settings):
            return _json(404, {"error": {"message": NO_TOOL_USE, "code": 404}})
        return None

    def completion(self, settings: dict[str, Any], fault: str | None) -> dict[str, Any]:
        """The answer's body, as a request that does not stream gets it."""
        message, finish_reason = self.reply()
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish_reason}
        if self.body.get("logprobs") is True:
            choice["logprobs"] = self.logprobs(message.get("content"))
        body: dict[str, Any] = {
            "id": f"chatcmpl-sim-{next(_IDS)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [] if fault == "empty" else [choice],
        }
        if settings.get("usage", True) is not False:
            body["usage"] = self.usage(message, settings.get("cost"))
        return body

    def invalid(self) -> str | None:
        """Why a provider would refuse the request's tools or tool_choice (400), if so."""
        tools = self.body.get("tools")
        if tools is not None and not isinstance(tools, list):
            return "'tools' must be an array"
        names = []
        for tool in tools or []:
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                return "each tool must be {'type': 'function', 'function': {'name': ...}}"
            names.append(function["name"])
        choice = self.body.get("tool_choice")
        if choice is None or choice == "auto" or choice == "none":
            return None
        if not names:
            return "'tool_choice' is only allowed when 'tools' are specified"
        if choice == "required":
            return None
        function = choice.get("function") if isinstance(choice, dict) else None
        if not isinstance(function, dict) or function.get("name") not in names:
            return f"'tool_choice' names no given tool: {json.dumps(choice)}"
        return None

    def reply(self) -> tuple[dict[str, Any], str]:
        """The assistant message and its finish_reason."""
        message: dict[str, Any] = {"role": "assistant"}
        effort = self.body.get("reasoning_effort")
        if isinstance(effort, str) and effort != "none":
            topic = _strip(self.user_text)[:60]
            message["reasoning_content"] = f"[sim {self.model}] thinking ({effort}): {topic}"
        if self.calls_tools():
            message.update(content=None, tool_calls=self.tool_calls())
            return message, "tool_calls"
        if "refuse" in self.flags:
            message.update(content=None, refusal=f"[sim {self.model}] I can't help with that.")
            return message, "stop"
        if "filter" in self.flags:
            message["content"] = ""
            return message, "content_filter"
        text = self.content()
        message["content"] = text
        cut = isinstance(self.max_tokens, int) and estimate_tokens(text) > self.max_tokens
        return message, "length" if cut else "stop"

    def calls_tools(self) -> bool:
        """Tools given, not turned off, and no tool result since the last user message."""
        if not self.tools or self.body.get("tool_choice") == "none":
            return False
        return not any(_role(m) == "tool" for m in self.messages[self.last_user + 1 :])

    def tool_calls(self) -> list[dict[str, Any]]:
        """The named function (tool_choice); every tool (`[[sim:parallel]]`, unless
        parallel_tool_calls is false); else the first tool the user's text names, or the
        first tool."""
        functions = [t["function"] for t in self.tools]
        choice = self.body.get("tool_choice")
        if isinstance(choice, dict):
            chosen = [f for f in functions if f["name"] == choice["function"]["name"]][:1]
        elif "parallel" in self.flags and self.body.get("parallel_tool_calls") is not False:
            chosen = functions
        else:
            named = [f for f in functions if f["name"] in self.user_text]
            chosen = (named or functions)[:1]
        # the same calls whether the answer streams or not
        asked = {k: v for k, v in self.body.items() if k not in ("stream", "stream_options")}
        seed = json.dumps(asked, sort_keys=True, default=str)
        return [
            {
                "id": "call_" + hashlib.sha256(f"{i}:{seed}".encode()).hexdigest()[:24],
                "type": "function",
                "function": {"name": f["name"], "arguments": arguments_for(f.get("parameters"))},
            }
            for i, f in enumerate(chosen)
        ]

    def content(self) -> str:
        """The text answer, shaped as `response_format` asks."""
        text = self.quote() if self.tool_results() else self.text()
        response_format = self.body.get("response_format")
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            return json.dumps({"answer": text})
        if kind == "json_schema" and isinstance(response_format, dict):
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            return json.dumps(value_for(schema if isinstance(schema, dict) else {}, "answer"))
        return text

    def tool_results(self) -> list[dict[str, Any]]:
        return [m for m in self.messages[self.last_user + 1 :] if _role(m) == "tool"]

    def quote(self) -> str:
        """The final answer after tool results: each result, named by its function."""
        names = {
            str(call.get("id")): call["function"].get("name")
            for m in self.messages
            if _role(m) == "assistant" and isinstance(m.get("tool_calls"), list)
            for call in m["tool_calls"]
            if isinstance(call, dict) and isinstance(call.get("function"), dict)
        }
        quoted = [
            f"{names.get(str(m.get('tool_call_id'))) or 'tool'} returned {_text_of(m)}"
            for m in self.tool_results()
        ]
        return f"[sim {self.model}] " + "; ".join(quoted)

    def text(self) -> str:
        """Deterministic and small: the model name and the start of the last user text."""
        user = [t for role, t in self.texts if role == "user"] or [t for _, t in self.texts]
        last = _strip(user[-1] if user else "")
        return f"[sim {self.model}] {last[:60]}"

    def logprobs(self, content: Any) -> dict[str, Any]:
        """OpenAI's logprobs object: made-up, deterministic values for each piece of text,
        with `top_logprobs` alternatives each when asked."""
        if not isinstance(content, str):
            return {"content": None, "refusal": None}
        top = self.body.get("top_logprobs")
        top = min(top, 20) if isinstance(top, int) and top > 0 else 0  # OpenAI's maximum
        entries = []
        for i, token in enumerate(_PIECES.findall(content)):
            logprob = -round(0.05 * (i % 7) + 0.01, 4)
            alternatives = [(token, logprob)] + [
                (f"{token}~{k}", round(logprob - k, 4)) for k in range(1, top)
            ]
            entries.append(
                {
                    "token": token,
                    "logprob": logprob,
                    "bytes": list(token.encode()),
                    "top_logprobs": [
                        {"token": t, "logprob": lp, "bytes": list(t.encode())}
                        for t, lp in alternatives[:top]
                    ],
                }
            )
        return {"content": entries, "refusal": None}

    def usage(self, message: dict[str, Any], cost: Any) -> dict[str, Any]:
        """Estimated token counts; the completion counts what was written (text or refusal,
        tool calls, reasoning, the reasoning also given apart as OpenAI does), capped at
        max_tokens."""
        prompt = estimate_message_tokens(_countable(self.messages))
        if self.tools:
            prompt += estimate_tokens(json.dumps(self.tools))
        said = [message.get("content") or message.get("refusal") or ""]
        said += [
            c["function"]["name"] + c["function"]["arguments"]
            for c in message.get("tool_calls") or []
        ]
        reasoning = estimate_tokens(message.get("reasoning_content") or "")
        completion = sum(estimate_tokens(s) for s in said) + reasoning
        if isinstance(self.max_tokens, int) and self.max_tokens >= 0:
            completion = min(completion, self.max_tokens)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": min(reasoning, completion)}
        return usage if cost is None else {**usage, "cost": cost}


class _Embedder(_Call):
    """Answers one embeddings request (`POST /embeddings`): a unit vector per input text,
    drawn from the text's sha256 (`embedding_of`), `dimensions` long when asked, unless
    the model's `ignore_dimensions` (Ollama's way) gives the whole `embedding_size`."""

    endpoint = "embeddings"

    def __init__(self, conn: _Connection, request: _Request) -> None:
        super().__init__(conn, request)
        given = self.body.get("input")
        self.inputs: list[Any] = [given] if isinstance(given, str) else []
        if isinstance(given, list):
            self.inputs = given

    def shapeless(self) -> str | None:
        body, inputs = self.request.body, self.inputs
        if not isinstance(body, dict) or not isinstance(body.get("input"), str | list):
            return "body must be a JSON object with `input`: a text or a list of texts"
        if not inputs or not all(isinstance(text, str) and text for text in inputs):
            return "`input` must be a non-empty text or a non-empty list of non-empty texts"
        if body.get("encoding_format", "float") not in ("float", "base64"):
            return "`encoding_format` must be float or base64"
        return None

    def texts_said(self) -> list[tuple[str, str]]:
        return [("user", text) for text in self.inputs]

    def logged(self) -> dict[str, Any]:
        return {"input": self.inputs, "dimensions": self.body.get("dimensions")}

    def answer(self, settings: dict[str, Any], fault: str | None) -> Answer:
        """The vectors, or the error answer a fault or the request asks for."""
        if fault == "malformed":
            return 200, MALFORMED, {}
        status = _status_fault(fault, self.model)
        if status is not None:
            return status
        size = int(settings.get("embedding_size") or EMBEDDING_SIZE)
        try:
            dimensions = self.dimensions(settings, size)
        except ValueError as exc:
            return _error(400, str(exc))
        base64 = self.body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _encoded(embedding_of(text, size, dimensions), base64),
            }
            for i, text in enumerate(self.inputs)
        ]
        if settings.get("reverse_data") is True:
            data.reverse()
        body: dict[str, Any] = {
            "object": "list",
            "data": [] if fault == "empty" else data,
            "model": self.model,
        }
        if settings.get("usage", True) is not False:
            prompt = sum(estimate_tokens(text) for text in self.inputs)
            usage: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt}
            if settings.get("cost") is not None:
                usage["cost"] = settings["cost"]
            body["usage"] = usage
        return _json(200, body)

    def dimensions(self, settings: dict[str, Any], size: int) -> int | None:
        """The length asked for (None: whole vectors), or ValueError saying why not."""
        asked = self.body.get("dimensions")
        if asked is None or settings.get("ignore_dimensions") is True:
            return None
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
            raise ValueError(f"`dimensions` must be a positive integer, got {asked!r}")
        if asked > size:
            raise ValueError(f"`dimensions` {asked} is more than {self.model}'s {size}")
        return asked


def embedding_of(text: str, size: int = 0, dimensions: int | None = None) -> list[float]:
    """The simulator's vector of `text`: `size` (EMBEDDING_SIZE when 0) numbers drawn from
    the text's sha256, scaled to unit length. With `dimensions`, its first `dimensions`
    numbers scaled to unit length again, as a Matryoshka model shortens its vectors."""
    size = size or EMBEDDING_SIZE
    seed = hashlib.sha256(text.encode()).digest()
    drawn: list[float] = []
    for block in range(-(-size // 8)):  # eight 32-bit numbers per hash
        digest = hashlib.sha256(seed + block.to_bytes(4, "big")).digest()
        drawn += [n / 2**31 - 1 for n in struct.unpack("<8I", digest)]
    whole = _unit(drawn[:size])
    return whole if dimensions is None else _unit(whole[:dimensions])


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    return [x / norm for x in vector]


def _encoded(vector: list[float], base64: bool) -> list[float] | str:
    return encode_vector(vector) if base64 else vector


class _Streamer:
    """Answers a request that asks `stream: true`: the answer a request that does not
    stream would get, sent as OpenAI's chunks over server-sent events (HTTP chunked),
    `chunk_ms` apart, and cut or broken mid-way when a stream fault says so. Faults that
    fail a request fail it before the first chunk, as they do the whole answer."""

    def __init__(self, completer: _Completer, settings: dict[str, Any], fault: str | None) -> None:
        self.completer, self.settings, self.fault = completer, settings, fault
        self.conn = completer.conn
        self.keep_alive = completer.request.keep_alive
        self.gap = float(settings.get("chunk_ms") or 0) / 1000
        name, _, count = (fault or "").partition(":")
        self.cut = int(count) if name == "cut-after" else None
        self.error = int(count) if name == "error-after" else None
        self.stall = int(count) if name == "stall-after" else None

    async def run(self) -> bool:
        completer, fault = self.completer, self.fault
        if fault == "stall":  # the stream's head and half an event, then silence
            await self.open()
            self.write(b'data: {"id": "chatcmpl-sim", "choi')
            await self.conn.writer.drain()
            await self.conn.hold(HOLD_S)
            return False
        try:
            refused = completer.refusal(self.settings, fault)
            events = [] if refused else self.events()
        except Exception as exc:  # a simulator bug: say so rather than drop the connection
            refused = _error(500, f"simulator failed: {type(exc).__name__}: {exc}")
        if refused:  # an error answer, whole, before any stream began
            await self.conn.send(refused, self.keep_alive)
            return self.keep_alive
        try:
            return await self.send(events)
        except ConnectionError:
            self.ended("gone")
            return False

    def events(self) -> list[str]:
        """The data of each event, [DONE] last."""
        if self.fault == "malformed":
            return [MALFORMED.decode()]
        completer = self.completer
        body = completer.completion(self.settings, self.fault)
        options = completer.body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        chunks = _chunks(body, usage=usage and "usage" in body)
        return [json.dumps(chunk) for chunk in chunks] + ["[DONE]"]

    async def send(self, events: list[str]) -> bool:
        await self.open()
        for sent, data in enumerate(events):
            if sent == self.cut:
                self.ended("cut")
                self.conn.writer.close()  # no last chunk: the client reads a cut body
                return False
            if sent == self.error:
                await self.event(json.dumps(self.error_event()))
                return await self.close("error")
            if sent == self.stall:
                self.ended("stalled")
                await self.conn.hold(HOLD_S)
                return False
            if sent and self.gap > 0 and not await self.conn.hold(self.gap):
                self.ended("gone")
                return False
            await self.event(data)
        return await self.close("done")

    def error_event(self) -> dict[str, Any]:
        """OpenRouter's report of a failure once the answer began: HTTP 200 already sent,
        so the error comes as an event, with finish_reason "error"."""
        model = self.completer.model
        return {
            "id": f"chatcmpl-sim-{next(_IDS)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "error": {"code": "server_error", "message": f"simulated error mid-stream ({model})"},
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        }

    async def open(self) -> None:
        head = [
            "HTTP/1.1 200 OK",
            "Content-Type: text/event-stream",
            "Cache-Control: no-cache",
            "Transfer-Encoding: chunked",
            f"Connection: {'keep-alive' if self.keep_alive else 'close'}",
        ]
        self.conn.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await self.conn.writer.drain()

    def write(self, payload: bytes) -> None:
        """One HTTP chunk."""
        self.conn.writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")

    async def event(self, data: str) -> None:
        self.write(f"data: {data}\n\n".encode())
        await self.conn.writer.drain()
        with self.conn.state.lock:
            self.completer.entry["chunks"] += 1

    async def close(self, how: str) -> bool:
        self.conn.writer.write(b"0\r\n\r\n")  # the body's end
        await self.conn.writer.drain()
        self.ended(how)
        return self.keep_alive

    def ended(self, how: str) -> None:
        with self.conn.state.lock:
            self.completer.entry["stream_end"] = how


def _chunks(body: dict[str, Any], usage: bool) -> list[dict[str, Any]]:
    """A completion body as OpenAI streams it: the role first, then the reasoning, the
    text (its logprobs with it), the refusal and each tool call (its id and name, then
    its arguments) in pieces of a word or so, then the finish_reason, then the usage in
    a chunk of its own when asked. Joined, the pieces give the body's own values."""
    head = {
        "id": body["id"],
        "object": "chat.completion.chunk",
        "created": body["created"],
        "model": body["model"],
    }

    def chunk(delta: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None, **more}]}

    out = []
    for choice in body["choices"]:
        message = choice["message"]
        out.append(chunk({"role": "assistant", "content": ""}))
        out += [chunk({"reasoning_content": p}) for p in _split(message.get("reasoning_content"))]
        logprobs = (choice.get("logprobs") or {}).get("content")
        for i, piece in enumerate(_split(message.get("content"))):
            more = {"logprobs": {"content": [logprobs[i]], "refusal": None}} if logprobs else {}
            out.append(chunk({"content": piece}, **more))
        out += [chunk({"refusal": p}) for p in _split(message.get("refusal"))]
        for index, call in enumerate(message.get("tool_calls") or []):
            function = call["function"]
            first = {"name": function["name"], "arguments": ""}
            start = {"index": index, "id": call["id"], "type": "function", "function": first}
            out.append(chunk({"tool_calls": [start]}))
            for piece in _split(function["arguments"]):
                fragment = {"index": index, "function": {"arguments": piece}}
                out.append(chunk({"tool_calls": [fragment]}))
        out.append(chunk({}, finish_reason=choice["finish_reason"]))
    if usage:
        out.append({**head, "choices": [], "usage": body["usage"]})
    return out


def _split(text: str | None) -> list[str]:
    """`text` in pieces of a word or so (the pieces logprobs are given for)."""
    return _PIECES.findall(text) if text else []


def _countable(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as the prompt estimate reads them: string content, or a list of parts
    (dicts, text as a string), whatever odd shapes the request sent."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {**p, "text": str(p.get("text", ""))} if p.get("type") == "text" else p
                for p in content
                if isinstance(p, dict)
            ]
        elif content is not None and not isinstance(content, str):
            content = str(content)
        out.append({**message, "content": content})
    return out


def _role(message: dict[str, Any]) -> str:
    return str(message.get("role"))


def _text_of(message: dict[str, Any]) -> str:
    """A message's text: its string content, or its text parts joined."""
    return " ".join(t for _, t in _texts([message]))


def _strip(text: str) -> str:
    """`text` without the simulator's directives."""
    return _FLAG.sub("", _DIRECTIVE.sub("", text)).strip()


_IDS = itertools.count(1)


async def serve(
    state: _State, host: str, port: int, ready: Callable[[int], None], stop: asyncio.Event
) -> None:
    """Listen, call `ready(port)`, serve until `stop` is set, then cancel every client."""
    tasks: set[asyncio.Task[Any]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await _Connection(state, reader, writer).serve()
        except asyncio.CancelledError:
            pass  # shutting down; ending normally keeps Python 3.11's asyncio from logging it
        finally:
            tasks.discard(task)

    server = await asyncio.start_server(on_client, host, port, backlog=4096)
    async with server:
        ready(server.sockets[0].getsockname()[1])
        await stop.wait()
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def no_tools_from_env() -> list[str]:
    """The upstream model names SIM_NO_TOOLS lists (comma-separated) as refusing tools."""
    return _names(os.environ.get(NO_TOOLS_ENV, ""))


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a config file: JSON, or YAML (which needs PyYAML)."""
    text = Path(path).read_text()
    try:
        return dict(json.loads(text))
    except ValueError:
        import yaml  # optional: only YAML config files need it

        return dict(yaml.safe_load(text) or {})


class Simulator:
    """The simulator in a background thread, for tests and the demo.

    >>> sim = Simulator(port=0).start()
    >>> sim.configure({"models": {"m": {"faults": ["503"]}}})
    >>> sim.url    # 'http://127.0.0.1:PORT/v1'
    >>> sim.stop()
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        config: dict[str, Any] | None = None,
        no_tools: Iterable[str] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.state = _State(no_tools_from_env() if no_tools is None else no_tools)
        if config:
            self.state.configure(config)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + "/v1"

    def start(self, timeout_s: float = 10.0) -> Self:
        """Serve in a background thread; return once the server listens. Raises
        RuntimeError, naming the address and the cause (e.g. the port is taken), when it
        does not come up within `timeout_s`."""
        self._ready.clear()
        self._failure = None
        address = f"{self.host}:{self.port}"  # (port 0: the one the server picks)
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)
        self._thread.start()
        came_up = self._ready.wait(timeout_s)
        failure = self._failure
        if came_up and failure is None:
            return self
        self.stop()  # a server that came up late must not linger
        if failure is not None:
            raise RuntimeError(
                f"simulator failed to start on {address}: {type(failure).__name__}: {failure}"
            ) from failure
        raise RuntimeError(f"simulator did not start listening on {address} within {timeout_s:g} s")

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await serve(self.state, self.host, self.port, self._on_ready, self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by start(), never lost in the thread
            self._failure = exc
        finally:
            self._ready.set()  # up or not, start() stops waiting

    def _on_ready(self, port: int) -> None:
        self.port = port
        self._ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = self._loop = self._stop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(
        self,
        config: dict[str, Any] | None = None,
        *,
        models: dict[str, Any] | None = None,
        default: dict[str, Any] | None = None,
    ) -> None:
        """Merge settings, as POST /_sim/config: a full `config` body, or the shortcuts
        `configure(models={"m": {"faults": ["503"]}}, default={"latency_ms": 5})`."""
        self.state.configure(config or {"models": models or {}, "default": default or {}})

    def requests(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return [dict(e) for e in self.state.log]

    def reset(self) -> None:
        self.state.reset()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.sim.simulator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--config", help="JSON or YAML file, as the /_sim/config body")
    parser.add_argument("--latency-ms", type=float, help="default latency for every model")
    parser.add_argument(
        "--no-tools",
        metavar="NAMES",
        help=f"comma-separated upstream model names that refuse tools (default: ${NO_TOOLS_ENV})",
    )
    args = parser.parse_args(argv)
    no_tools = no_tools_from_env() if args.no_tools is None else _names(args.no_tools)
    state = _State(no_tools)
    try:
        if args.config:
            state.configure(load_config(args.config))
        if args.latency_ms is not None:
            state.configure({"default": {"latency_ms": args.latency_ms}})
    except (OSError, ValueError, TypeError) as exc:
        parser.error(f"--config: {exc}")

    def ready(port: int) -> None:
        print(f"simulator listening on http://{args.host}:{port}", flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(state, args.host, args.port, ready, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
