"""The OpenAI-compatible adapter: one chat completion (or one embedding call) over httpx.

Most providers of the fleet (OpenRouter, LiteLLM proxies, Z.ai, MiniMax, Moonshot, Ollama,
the simulator) speak OpenAI's `POST /chat/completions` and `POST /embeddings`. This adapter
sends one request and maps every failure, once, onto base.py's error tree:

    HTTP 429                          Retryable("rate_limited", retry_after_s from Retry-After)
    HTTP 408, httpx timeouts          Retryable("timeout")
    HTTP 5xx                          Retryable("server_error")
    refused, reset, protocol errors   Retryable("connection")
    200 that is not the OpenAI shape  Retryable("malformed")
    200 with no choice, or a message  Retryable("empty")
      with no content, tool call or
      refusal (unless its finish_reason
      is content_filter)
    HTTP 401, 403                     ModelUnusable("auth")
    HTTP 404 saying the endpoints do  CapabilityRefused("unsupported", .capability: tools,
      not support a capability the     json_schema, json_object, vision or video)
      request uses (OpenRouter's "No
      endpoints found that support
      tool use")
    HTTP 404                          ModelUnusable("not_found")
    HTTP 400 saying the model takes   CapabilityRefused("unsupported", .capability: tools)
      no tools, for a request with
      tools (Ollama, vLLM)
    HTTP 400 saying the model makes   CapabilityRefused("unsupported", .capability:
      no embeddings (Ollama)            embedding)
    HTTP 400, 422, other 4xx          Permanent("bad_request")

The request's options (the job's tools, response_format, stop, seed, ...) are merged into
the body as they are. An answer's tool calls, finish_reason, refusal, logprobs and
reasoning (`reasoning_content`, or OpenRouter's `reasoning`) are kept in the Completion;
an answer made only of tool calls (content null) is an answer.

`embed()` posts the texts to `/embeddings` (floats asked for) and gives the vectors in the
inputs' order (by each item's `index`). Asked for `dimensions`, a server that ignores them
(Ollama does) and answers longer vectors has them cut to the first n and L2-normalised
again, as a Matryoshka model (nomic-embed-text v1.5, Qwen3-Embedding) is meant to be
shortened; a vector shorter than asked, one vector too many or too few, or a body that is
not the OpenAI shape is Retryable("malformed"). Usage as the provider says, else estimated.

`stream()` asks for the answer as server-sent events (openai_stream.py reads them): the
same failures map to the same errors until the first delta is given; after it, whatever
fails raises StreamBroken, which carries the partial answer (base.py). OpenRouter's
mid-stream `data: {"error": ...}` event (under HTTP 200) is such a failure.

Error messages carry the status and a truncated piece of the provider's own message, and
never the API key (it is redacted should a provider echo it back). A call made for a job
carries `X-Fleet-Job: <job id>; message=N; delivery=N; process=P` (base.Caller), which
providers ignore and the simulator logs.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import httpx

from router.tokens import estimate_message_tokens, estimate_tokens
from workers.providers.base import (
    FLEET_JOB_HEADER,
    CapabilityRefused,
    Completion,
    CompletionRequest,
    Delta,
    EmbeddingRequest,
    Embeddings,
    ModelUnusable,
    Permanent,
    ProviderError,
    Retryable,
    StreamBroken,
    about_to_send,
    current_caller,
)
from workers.providers.openai_stream import DONE, Assembler, sse_data

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
        self.embeddings_url = base_url.rstrip("/") + "/embeddings"
        self._api_key = api_key or None
        self._client = client
        self._headers = dict(extra_headers or {})
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAICompatProvider({self.url!r})"

    def complete(self, request: CompletionRequest) -> Completion:
        response = self._post(self.url, self._payload(request), request.timeout_s, request)
        return self._parse(request, response)

    def embed(self, request: EmbeddingRequest) -> Embeddings:
        payload: dict[str, Any] = {
            "model": request.model,
            "input": request.input,
            "encoding_format": "float",
        }
        if request.dimensions is not None:
            payload["dimensions"] = request.dimensions
        response = self._post(self.embeddings_url, payload, request.timeout_s, None)
        return self._parse_embeddings(request, response)

    def _post(
        self,
        url: str,
        payload: dict[str, Any],
        timeout_s: float,
        request: CompletionRequest | None,
    ) -> httpx.Response:
        """One whole (not streamed) call: a 2xx response, or its error on the tree.
        `request` is the chat request whose capabilities a 4xx may be refusing."""
        try:
            response = self._client.post(
                url,
                json=payload,
                headers=self._call_headers(),
                timeout=timeout_s,
                extensions={"trace": _trace},
            )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, url) from exc
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise self._status_error(response, request, url) from exc
        return response

    def stream(self, request: CompletionRequest) -> Iterator[Delta | Completion]:
        """The answer as it is written (openai_stream.py reads the events), then the whole
        Completion. Failures before the first delta raise what complete() would; after
        it, StreamBroken with what was written. `timeout_s` bounds each wait for the next
        bytes, not the length of the whole stream. The connection goes back to the pool
        before the Completion is given, so a caller that stops there holds nothing."""
        payload = self._payload(request)
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}  # usage (and cost) in the last chunk
        assembler = Assembler()
        with contextlib.ExitStack() as held:
            try:
                response = held.enter_context(
                    self._client.stream(
                        "POST",
                        self.url,
                        json=payload,
                        headers=self._call_headers(),
                        timeout=request.timeout_s,
                        extensions={"trace": _trace},
                    )
                )
                if not response.is_success or _answers_whole(response):
                    response.read()
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
            if not response.is_success:
                raise self._status_error(response, request)
            if _answers_whole(response):  # a server that does not stream: one delta
                whole = self._parse(request, response)
                delta = Delta(whole.text, whole.reasoning or "", _as_fragments(whole.tool_calls))
                if delta != Delta():
                    yield delta
                yield whole
                return
            yield from self._events(request, response, assembler)
        yield self._assembled(request, assembler)

    def _events(
        self, request: CompletionRequest, response: httpx.Response, assembler: Assembler
    ) -> Iterator[Delta]:
        """The deltas of the stream, read to its end (so the connection can be kept)."""
        ended = False
        events = 0
        try:
            for data in sse_data(response.iter_lines()):
                events += 1
                if ended:
                    continue  # nothing counts after [DONE]; read on to the body's end
                if data.strip() == DONE:
                    ended = True
                    continue
                delta = self._feed(request, assembler, data)
                if delta is not None:
                    yield delta
        except httpx.HTTPError as exc:  # cut, reset, a read timeout between two chunks
            if ended:
                return  # the answer came whole: only the body's end was lost
            raise self._broken(request, assembler, self._transport_error(exc)) from exc
        if not ended and assembler.finish_reason is None:
            # no event at all: a 200 that is no stream (an HTML page), as complete() says
            kind = "connection" if events else "malformed"
            cut = Retryable(kind, self._redact(f"stream from {self.url} ended early"))
            raise self._broken(request, assembler, cut)

    def _feed(self, request: CompletionRequest, assembler: Assembler, data: str) -> Delta | None:
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            bad = Retryable("malformed", self._redact(f"event from {self.url}: {_truncate(data)}"))
            raise self._broken(request, assembler, bad) from exc
        if isinstance(chunk, dict) and chunk.get("error") is not None:
            # OpenRouter's report of a failure once the answer began, under HTTP 200
            raise self._broken(request, assembler, self._event_error(chunk["error"], request))
        try:
            return assembler.feed(chunk)
        except (TypeError, ValueError) as exc:
            bad = Retryable("malformed", self._redact(f"event from {self.url}: {exc!r}"))
            raise self._broken(request, assembler, bad) from exc

    def _broken(
        self, request: CompletionRequest, assembler: Assembler, error: ProviderError
    ) -> ProviderError:
        """`error` as it is when nothing reached the caller yet; else StreamBroken."""
        if not assembler.deltas:
            return error
        partial = _completion(
            request,
            text=assembler.written(),
            tool_calls=assembler.tool_calls(),
            refusal="".join(assembler.refusal) or None,
            reasoning="".join(assembler.reasoning) or None,
            finish_reason=assembler.finish_reason,
            usage=assembler.usage,
            raw_model=assembler.model,
            answer_id=assembler.id,
            logprobs=None,
        )
        message = f"after {assembler.deltas} deltas, {error.kind}: {error.message}"
        return StreamBroken(message, partial)

    def _assembled(self, request: CompletionRequest, assembler: Assembler) -> Completion:
        """The whole answer of a stream that ended well, checked as complete() checks it."""
        text = assembler.written()
        tool_calls = assembler.tool_calls()
        refusal = "".join(assembler.refusal) or None
        if assembler.nameless_call():
            nameless = Retryable("malformed", self._redact(f"a nameless tool call from {self.url}"))
            raise self._broken(request, assembler, nameless)
        if assembler.finish_reason == "error":  # OpenRouter's mark of a failed stream
            failed = Retryable("server_error", self._redact(f"finish_reason error from {self.url}"))
            raise self._broken(request, assembler, failed)
        if not (text or tool_calls or refusal) and assembler.finish_reason != "content_filter":
            raise Retryable("empty", self._redact(f"no content from {self.url}"))
        return _completion(
            request,
            text=text,
            tool_calls=tool_calls,
            refusal=refusal,
            reasoning="".join(assembler.reasoning) or None,
            finish_reason=assembler.finish_reason,
            usage=assembler.usage,
            raw_model=assembler.model,
            answer_id=assembler.id,
            logprobs=None if assembler.logprobs is None else {"content": assembler.logprobs},
        )

    def _payload(self, request: CompletionRequest) -> dict[str, Any]:
        # the fleet's own fields last: options never override them
        payload: dict[str, Any] = {
            **request.options,
            "model": request.model,
            "messages": request.messages,
        }
        if request.temperature is not None:
            payload["temperature"] = request.temperature
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        return payload

    def _call_headers(self) -> dict[str, str]:
        caller = current_caller()
        if caller is None:
            return self._headers
        # the job and delivery, for the provider's own log
        return {**self._headers, FLEET_JOB_HEADER: caller.header()}

    def _transport_error(self, exc: httpx.HTTPError, url: str | None = None) -> ProviderError:
        described = self._describe(exc, url or self.url)
        if isinstance(exc, httpx.TimeoutException):
            return Retryable("timeout", described)
        if isinstance(exc, httpx.DecodingError):  # a body its Content-Encoding cannot decode
            return Retryable("malformed", described)
        # refused, reset, protocol errors, bad URL
        return Retryable("connection", described)

    def _event_error(self, error: Any, request: CompletionRequest) -> ProviderError:
        """The error an error event reports: by its code when that is an HTTP status (as
        the same failure answered before the stream began would be), else a server
        error."""
        if not isinstance(error, dict):
            error = {"message": error}
        code = error.get("code")
        detail = _truncate(str(error.get("message") or error))
        status = code if isinstance(code, int) and not isinstance(code, bool) else None
        if isinstance(code, str) and code.isdigit():
            status = int(code)
        if status is not None and 400 <= status < 600:
            return self._status_kind(status, detail, httpx.Headers(), request, "error event")
        return Retryable("server_error", self._redact(f"error event from {self.url}: {detail}"))

    def _describe(self, exc: Exception, url: str) -> str:
        return self._redact(f"{type(exc).__name__} calling {url}: {exc}")

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _status_error(
        self, response: httpx.Response, request: CompletionRequest | None, url: str | None = None
    ) -> ProviderError:
        """The error for a non-2xx answer, by status (`request` None: an embedding call)."""
        status = response.status_code
        return self._status_kind(status, _detail(response), response.headers, request, url=url)

    def _status_kind(
        self,
        status: int,
        detail: str,
        headers: Mapping[str, str],
        request: CompletionRequest | None,
        came_as: str = "",
        url: str | None = None,
    ) -> ProviderError:
        said = f"HTTP {status}" + (f" ({came_as})" if came_as else "")
        message = self._redact(f"{said} from {url or self.url}: {detail}")
        if status == 429:
            return Retryable("rate_limited", message, parse_retry_after(headers))
        if status == 408:
            return Retryable("timeout", message)
        if status >= 500:
            return Retryable("server_error", message)
        if status in (401, 403):
            return ModelUnusable("auth", message)
        if status == 404:
            capability = refused_capability(detail, request) if request is not None else None
            if capability is not None:
                return CapabilityRefused(capability, message)
            return ModelUnusable("not_found", message)
        if status == 400 and request is None and _NO_EMBEDDINGS_400.search(detail):
            return CapabilityRefused("embedding", message)
        tools = request is not None and request.options.get("tools")
        if status == 400 and tools and _NO_TOOLS_400.search(detail):
            return CapabilityRefused("tools", message)
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
            choice = choices[0]
            message = choice["message"]
            text = _content(message.get("content"))
            tool_calls = _tool_calls(message.get("tool_calls"))
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise Retryable("malformed", self._malformed(response, repr(exc))) from exc
        refusal = _text(message.get("refusal"))
        finish_reason = _text(choice.get("finish_reason"))
        # a filtered answer is empty on purpose: the client hears why (finish_reason)
        if not (text or tool_calls or refusal) and finish_reason != "content_filter":
            raise Retryable("empty", self._redact(f"no content from {self.url}"))
        reasoning = _text(message.get("reasoning_content")) or _text(message.get("reasoning"))
        raw_model = body.get("model")
        logprobs = choice.get("logprobs")
        return _completion(
            request,
            text=text or "",
            tool_calls=tool_calls,
            refusal=refusal,
            reasoning=reasoning,
            finish_reason=finish_reason,
            usage=body.get("usage"),
            raw_model=raw_model if isinstance(raw_model, str) else None,
            answer_id=body.get("id"),
            logprobs=logprobs if isinstance(logprobs, dict) else None,
        )

    def _malformed(self, response: httpx.Response, why: str, url: str | None = None) -> str:
        return self._redact(
            f"HTTP {response.status_code} from {url or self.url}, unexpected body ({why}): "
            f"{_truncate(response.text)}"
        )

    def _parse_embeddings(self, request: EmbeddingRequest, response: httpx.Response) -> Embeddings:
        """The vectors of a 2xx answer, in the inputs' order and of the dimensions asked, or
        Retryable("malformed")."""
        url = self.embeddings_url
        try:
            body = response.json()
        except ValueError as exc:  # not JSON, or not UTF-8
            raise Retryable("malformed", self._malformed(response, "not JSON", url)) from exc
        try:
            vectors = _vectors(body["data"], len(request.input), request.dimensions)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise Retryable("malformed", self._malformed(response, repr(exc), url)) from exc
        usage = body.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        prompt_tokens = _count(usage.get("prompt_tokens"))
        raw_model = body.get("model")
        return Embeddings(
            vectors=vectors,
            prompt_tokens=(
                prompt_tokens
                if prompt_tokens is not None
                else sum(map(estimate_tokens, request.input))
            ),
            tokens_estimated=prompt_tokens is None,
            provider_cost_usd=_number(usage.get("cost")),
            raw_model=raw_model if isinstance(raw_model, str) else None,
        )


def _completion(
    request: CompletionRequest,
    *,
    text: str,
    tool_calls: list[dict[str, Any]],
    refusal: str | None,
    reasoning: str | None,
    finish_reason: str | None,
    usage: Any,
    raw_model: str | None,
    answer_id: Any,
    logprobs: dict[str, Any] | None,
) -> Completion:
    """The Completion of an answer, whole or streamed: its usage as the provider gave it,
    else estimated from the request and from what was written (and flagged so)."""
    usage = usage if isinstance(usage, dict) else {}
    prompt_tokens = _count(usage.get("prompt_tokens"))
    completion_tokens = _count(usage.get("completion_tokens"))
    estimated = prompt_tokens is None or completion_tokens is None
    if prompt_tokens is None:
        tools = request.options.get("tools")
        prompt_tokens = estimate_message_tokens(
            request.messages, tools=tools if isinstance(tools, list) else ()
        )
    if completion_tokens is None:
        written = [text, refusal or "", reasoning or ""]
        written += [c["function"]["name"] + c["function"]["arguments"] for c in tool_calls]
        completion_tokens = sum(map(estimate_tokens, written))
    return Completion(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        tokens_estimated=estimated,
        provider_cost_usd=_number(usage.get("cost")),
        raw_model=raw_model,
        extra={"id": answer_id, "finish_reason": finish_reason},
        tool_calls=tool_calls,
        finish_reason=finish_reason,
        refusal=refusal,
        logprobs=logprobs,
        reasoning=reasoning,
    )


def _answers_whole(response: httpx.Response) -> bool:
    """A JSON body, not events (any other type is read as events: some servers stream
    without saying text/event-stream)."""
    return "json" in str(response.headers.get("content-type", "")).lower()


def _as_fragments(tool_calls: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Whole tool calls as the first (and only) fragments of a stream."""
    return tuple({"index": i, **call} for i, call in enumerate(tool_calls))


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


def _vectors(data: Any, inputs: int, dimensions: int | None) -> list[list[float]]:
    """The vectors of an embeddings answer's `data`, in input order, each cut to
    `dimensions` (and normalised again) when longer. Raises ValueError (or TypeError,
    KeyError) when they are not one vector of numbers per input, all of one length or
    at least `dimensions` long."""
    vectors = [_numbers(item["embedding"]) for item in _in_order(data, inputs)]
    if dimensions is None:
        if len({len(v) for v in vectors}) > 1:
            raise ValueError("vectors of different lengths")
        return vectors
    if any(len(v) < dimensions for v in vectors):
        found = min(map(len, vectors))
        raise ValueError(f"asked for {dimensions} dimensions, got a vector of {found}")
    return [v if len(v) == dimensions else normalised(v[:dimensions]) for v in vectors]


def _in_order(data: Any, inputs: int) -> list[Any]:
    """The items of `data`, one per input, by their `index` when they all carry one (else
    as given)."""
    if not isinstance(data, list):
        raise TypeError("`data` is not a list")
    if len(data) != inputs:
        raise ValueError(f"{len(data)} vectors for {inputs} inputs")
    if not all(isinstance(item, dict) and "index" in item for item in data):
        return data
    if sorted(item["index"] for item in data) != list(range(inputs)):
        raise ValueError("the items' indexes are not 0 to n-1, once each")
    return sorted(data, key=lambda item: item["index"])


def _numbers(vector: Any) -> list[float]:
    if not isinstance(vector, list) or not vector:
        raise TypeError("an embedding is not a list of numbers")
    numbers = [_number(x) for x in vector]
    if None in numbers:
        raise ValueError("an embedding holds something other than finite numbers")
    return cast(list[float], numbers)


def normalised(vector: list[float]) -> list[float]:
    """`vector` scaled to unit length (L2); a zero vector as it is."""
    norm = math.sqrt(math.fsum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector


def _content(content: Any) -> str | None:
    """The text of a message's content: a string, or text parts joined (some providers)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    raise TypeError(f"content is a {type(content).__name__}")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    """A message's tool calls in OpenAI's shape. Arguments some providers give as an
    object are written as JSON text; a call without an id is given one (the client
    answers each call by its id). Raises TypeError/KeyError on a call without a name."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise TypeError("`tool_calls` is not a list")
    found = []
    for call in calls:
        function = call["function"]
        name = function["name"]
        if not isinstance(name, str) or not name:
            raise TypeError("a tool call has no function name")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = "{}"
        elif not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        call_id = call.get("id")
        found.append(
            {
                "id": call_id
                if isinstance(call_id, str) and call_id
                else f"call_{uuid.uuid4().hex}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return found


# What a provider's 404 says when its endpoints lack a capability the request uses
# (OpenRouter: "No endpoints found that support tool use", "... support image input").
_REFUSALS = (
    (re.compile(r"support[s]? (the )?tool|tool (use|calling) is not supported", re.I), "tools"),
    (
        re.compile(r"response[_ ]format|structured output|json[_ ]schema|json mode", re.I),
        "response_format",
    ),
    (re.compile(r"support[s]? (the )?image|image input", re.I), "vision"),
    (re.compile(r"support[s]? (the )?video|video input", re.I), "video"),
)


# A 400 that says the model takes no tools (Ollama: "... does not support tools"; vLLM
# started without tool parsing: '"auto" tool choice requires --enable-auto-tool-choice').
# Only tools: a 400 about a response format is as likely the schema's own fault.
_NO_TOOLS_400 = re.compile(r"does not support tools|enable-auto-tool-choice", re.I)

# A 400 that says the model makes no embeddings (Ollama, for a chat model: "this model does
# not support embeddings").
_NO_EMBEDDINGS_400 = re.compile(r"does not support embeddings", re.I)


def refused_capability(detail: str, request: CompletionRequest) -> str | None:
    """The capability a 404's message says the model does not serve, when the request
    uses it (else the 404 means what it usually does: no such model)."""
    for pattern, capability in _REFUSALS:
        if not pattern.search(detail):
            continue
        if capability == "tools" and request.options.get("tools"):
            return "tools"
        if capability == "response_format":
            kind = (request.options.get("response_format") or {}).get("type")
            return kind if kind in ("json_object", "json_schema") else None
        if capability in ("vision", "video") and _has_part(request, capability):
            return capability
    return None


def _has_part(request: CompletionRequest, capability: str) -> bool:
    kind = "image_url" if capability == "vision" else "video_url"
    return any(
        isinstance(part, dict) and part.get("type") == kind
        for message in request.messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
    )


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
