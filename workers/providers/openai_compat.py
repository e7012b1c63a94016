"""The OpenAI-compatible adapter: one chat completion over httpx.

Most providers of the fleet (OpenRouter, LiteLLM proxies, Z.ai, MiniMax, Moonshot, the
simulator) speak OpenAI's `POST /chat/completions`. This adapter sends one request and maps
every failure, once, onto base.py's error tree:

    HTTP 429                          Retryable("rate_limited", retry_after_s from Retry-After)
    HTTP 408, httpx timeouts          Retryable("timeout")
    HTTP 5xx                          Retryable("server_error")
    refused, reset, protocol errors   Retryable("connection")
    200 that is not the OpenAI shape  Retryable("malformed")
    200 with no choice or no content  Retryable("empty")
    HTTP 401, 403                     ModelUnusable("auth")
    HTTP 404                          ModelUnusable("not_found")
    HTTP 400, 422, other 4xx          Permanent("bad_request")

Error messages carry the status and a truncated piece of the provider's own message, and
never the API key (it is redacted should a provider echo it back). A call made for a job
carries `X-Fleet-Job: <job id>; message=N; delivery=N` (base.Caller), which providers
ignore and the simulator logs.
"""

from __future__ import annotations

import email.utils
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx

from router.tokens import estimate_message_tokens, estimate_tokens
from workers.providers.base import (
    FLEET_JOB_HEADER,
    Completion,
    CompletionRequest,
    ModelUnusable,
    Permanent,
    ProviderError,
    Retryable,
    about_to_send,
    current_caller,
)

MAX_DETAIL = 200  # characters of the provider's error message kept in ours
SHARD_SIZE = 32  # connections per httpcore pool (see ShardedTransport)


def make_client(concurrency: int, timeout_s: float = 120) -> httpx.Client:
    """One client per worker process, its connection pool sized to the worker's concurrency."""
    return httpx.Client(transport=ShardedTransport(concurrency), timeout=httpx.Timeout(timeout_s))


class ShardedTransport(httpx.BaseTransport):
    """A connection pool of `concurrency` connections, made of small httpcore pools.

    httpcore rescans its whole pool (polling every idle socket) under one lock each time a
    request starts or ends, so a single pool of 1,000 connections spends its time scanning:
    1,000 one-second calls from 1,000 threads took 13 s through one pool, 2 s through shards
    of 32. Each request goes to the shard with the most free connections; the shards' sizes
    add up to `concurrency`, so up to that many callers never wait for a connection.
    """

    def __init__(self, concurrency: int, shard_size: int = SHARD_SIZE) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        count = math.ceil(concurrency / shard_size)
        sizes = [concurrency // count + (i < concurrency % count) for i in range(count)]
        ssl_context = httpx.create_ssl_context()  # built once: loading CA certs is slow
        self._shards = [
            httpx.HTTPTransport(
                verify=ssl_context,
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            )
            for size in sizes
        ]
        self._free = sizes
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            shard = max(range(len(self._free)), key=self._free.__getitem__)
            self._free[shard] -= 1
        try:
            response = self._shards[shard].handle_request(request)
        except BaseException:
            self._release(shard)
            raise
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_ReleasingStream(response.stream, lambda: self._release(shard)),
            extensions=response.extensions,
        )

    def _release(self, shard: int) -> None:
        with self._lock:
            self._free[shard] += 1

    def close(self) -> None:
        for transport in self._shards:
            transport.close()


class _ReleasingStream(httpx.SyncByteStream):
    """A response body that gives its connection back to the shard count when closed."""

    def __init__(self, stream: httpx.SyncByteStream, release: Callable[[], None]) -> None:
        self._stream, self._release = stream, release

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        release, self._release = self._release, _nothing
        try:
            self._stream.close()
        finally:
            release()


def _nothing() -> None:
    pass


class OpenAICompatProvider:
    """A `Provider` for any server speaking OpenAI's chat completions API."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        client: httpx.Client,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key or None
        self._client = client
        self._headers = dict(extra_headers or {})
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAICompatProvider({self.url!r})"

    def complete(self, request: CompletionRequest) -> Completion:
        payload: dict[str, Any] = {"model": request.model, "messages": request.messages}
        if request.temperature is not None:
            payload["temperature"] = request.temperature
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        headers = self._headers
        caller = current_caller()
        if caller is not None:  # the job and delivery, for the provider's own log
            headers = {**headers, FLEET_JOB_HEADER: caller.header()}
        try:
            response = self._client.post(
                self.url,
                json=payload,
                headers=headers,
                timeout=request.timeout_s,
                extensions={"trace": _trace},
            )
        except httpx.TimeoutException as exc:
            raise Retryable("timeout", self._describe(exc)) from exc
        except httpx.DecodingError as exc:  # a body its Content-Encoding cannot decode
            raise Retryable("malformed", self._describe(exc)) from exc
        except httpx.HTTPError as exc:  # refused, reset, protocol errors, bad URL
            raise Retryable("connection", self._describe(exc)) from exc
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise self._status_error(response) from exc
        return self._parse(request, response)

    def _describe(self, exc: Exception) -> str:
        return self._redact(f"{type(exc).__name__} calling {self.url}: {exc}")

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _status_error(self, response: httpx.Response) -> ProviderError:
        """The error for a non-2xx answer, by status."""
        status = response.status_code
        message = self._redact(f"HTTP {status} from {self.url}: {_detail(response)}")
        if status == 429:
            return Retryable("rate_limited", message, parse_retry_after(response.headers))
        if status == 408:
            return Retryable("timeout", message)
        if status >= 500:
            return Retryable("server_error", message)
        if status in (401, 403):
            return ModelUnusable("auth", message)
        if status == 404:
            return ModelUnusable("not_found", message)
        if 400 <= status < 500:
            return Permanent("bad_request", message)
        return Retryable("malformed", message)  # 1xx or an unfollowed 3xx

    def _parse(self, request: CompletionRequest, response: httpx.Response) -> Completion:
        """The completion in a 2xx answer, or Retryable("malformed" / "empty")."""
        try:
            body = response.json()
        except ValueError as exc:  # not JSON, or not UTF-8
            raise Retryable("malformed", self._malformed(response, "not JSON")) from exc
        try:
            choices = body["choices"]
            if not isinstance(choices, list):
                raise TypeError("`choices` is not a list")
            if not choices:
                raise Retryable("empty", self._redact(f"no choices from {self.url}"))
            text = _content(choices[0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as exc:
            raise Retryable("malformed", self._malformed(response, repr(exc))) from exc
        if not text:
            raise Retryable("empty", self._redact(f"no content from {self.url}"))
        usage = body.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        prompt_tokens = _count(usage.get("prompt_tokens"))
        completion_tokens = _count(usage.get("completion_tokens"))
        estimated = prompt_tokens is None or completion_tokens is None
        if prompt_tokens is None:
            prompt_tokens = estimate_message_tokens(request.messages)
        if completion_tokens is None:
            completion_tokens = estimate_tokens(text)
        cost = usage.get("cost")
        raw_model = body.get("model")
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            tokens_estimated=estimated,
            provider_cost_usd=_number(cost),
            raw_model=raw_model if isinstance(raw_model, str) else None,
            extra={"id": body.get("id"), "finish_reason": choices[0].get("finish_reason")},
        )

    def _malformed(self, response: httpx.Response, why: str) -> str:
        return self._redact(
            f"HTTP {response.status_code} from {self.url}, unexpected body ({why}): "
            f"{_truncate(response.text)}"
        )


def _trace(event: str, info: dict[str, Any]) -> None:
    """httpcore's trace hook (the `trace` request extension): the request's headers are
    about to be written on a connection already made."""
    if event.endswith("send_request_headers.started"):
        about_to_send()


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from Retry-After (seconds or HTTP-date), or `retry-after-ms`.

    None when absent or unparseable; never negative.
    """
    millis = _number(_to_float(headers.get("retry-after-ms")))
    if millis is not None:
        return max(0.0, millis / 1000)
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    seconds = _to_float(value)
    if seconds is None:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is always GMT
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _to_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    """A finite number (not a bool) as a float, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: Any) -> int | None:
    """A token count: a non-negative int (or integral float), else None."""
    number = _number(value)
    return int(number) if number is not None and number >= 0 and number.is_integer() else None


def _content(content: Any) -> str | None:
    """The text of a message's content: a string, or text parts joined (some providers)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    raise TypeError(f"content is a {type(content).__name__}")


def _detail(response: httpx.Response) -> str:
    """The provider's error message: OpenAI's error.message, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return _truncate(response.text)
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or body.get("message") or body.get("detail")
        if message:
            return _truncate(str(message))
    return _truncate(response.text)


def _truncate(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"
