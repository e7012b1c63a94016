"""The OpenAI-compatible adapter: against the real simulator over HTTP, and MockTransport."""

from __future__ import annotations

import concurrent.futures
import email.utils
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from router.tokens import estimate_message_tokens, estimate_tokens
from workers.providers.base import (
    Completion,
    CompletionRequest,
    ModelUnusable,
    Permanent,
    ProviderError,
    Retryable,
)
from workers.providers.openai_compat import (
    OpenAICompatProvider,
    ShardedTransport,
    make_client,
    parse_retry_after,
)
from workers.sim.simulator import Simulator

KEY = "sk-test-VERY-SECRET-KEY-4242"
CLIENT_TIMEOUT_S = 10  # the shared client's own timeout; a request's timeout_s overrides it
MODEL = "zai/glm-4.7"
HELLO = [{"role": "user", "content": "Say hello to the fleet"}]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with make_client(concurrency=16, timeout_s=CLIENT_TIMEOUT_S) as http:
        yield http


@pytest.fixture
def provider(sim: Simulator, client: httpx.Client) -> OpenAICompatProvider:
    return OpenAICompatProvider(sim.url, KEY, client)


def ask(provider: OpenAICompatProvider, text: str = "hi", **kwargs: Any) -> Completion:
    messages = [{"role": "user", "content": text}]
    return provider.complete(CompletionRequest(MODEL, messages, **kwargs))


def assert_clean(exc: ProviderError) -> None:
    """The error crosses Celery as JSON, names no key, and chains the library error."""
    assert KEY not in str(exc) and KEY not in repr(exc)
    dumped = json.dumps(exc.to_dict())
    assert KEY not in dumped
    assert json.loads(dumped)["kind"] == exc.kind


# --- success against the simulator ----------------------------------------------------------


def test_completion_with_usage(provider, sim):
    completion = provider.complete(CompletionRequest(MODEL, HELLO))
    assert completion.text == "[sim zai/glm-4.7] Say hello to the fleet"
    assert completion.prompt_tokens == estimate_message_tokens(HELLO)
    assert completion.completion_tokens == estimate_tokens(completion.text)
    assert completion.tokens_estimated is False
    assert completion.provider_cost_usd is None
    assert completion.raw_model == MODEL
    assert completion.extra["finish_reason"] == "stop"
    assert sim.requests()[0]["authorization_present"] is True


def test_provider_cost_is_kept(provider, sim):
    sim.configure(models={MODEL: {"cost": 0.00125}})
    assert ask(provider).provider_cost_usd == 0.00125


def test_missing_usage_is_estimated(provider, sim):
    sim.configure(models={MODEL: {"usage": False}})
    completion = provider.complete(CompletionRequest(MODEL, HELLO))
    assert completion.tokens_estimated is True
    assert completion.prompt_tokens == estimate_message_tokens(HELLO)
    assert completion.completion_tokens == estimate_tokens(completion.text)


def test_image_parts_and_sampling_params_reach_the_provider(provider, sim):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ]
    request = CompletionRequest("vision-model", messages, temperature=0.3, max_tokens=3)
    completion = provider.complete(request)
    [logged] = sim.requests()
    assert (logged["temperature"], logged["max_tokens"], logged["images"]) == (0.3, 3, 1)
    assert completion.prompt_tokens == estimate_message_tokens(messages)
    assert completion.completion_tokens == 3  # capped by max_tokens
    assert completion.text.startswith("[sim vision-model] What is in this picture?")


def test_no_key_sends_no_authorization(sim, client):
    OpenAICompatProvider(sim.url + "/", None, client).complete(CompletionRequest(MODEL, HELLO))
    assert sim.requests()[0]["authorization_present"] is False


def test_base_url_without_v1(sim, client):
    provider = OpenAICompatProvider(sim.base_url, KEY, client)
    assert provider.complete(CompletionRequest(MODEL, HELLO)).text.startswith("[sim ")


# --- every fault maps to its kind -----------------------------------------------------------

FAULTS = [
    # fault, error class, kind
    ("429", Retryable, "rate_limited"),
    ("408", Retryable, "timeout"),
    ("500", Retryable, "server_error"),
    ("502", Retryable, "server_error"),
    ("503", Retryable, "server_error"),
    ("400", Permanent, "bad_request"),
    ("401", ModelUnusable, "auth"),
    ("403", ModelUnusable, "auth"),
    ("404", ModelUnusable, "not_found"),
    ("malformed", Retryable, "malformed"),
    ("empty", Retryable, "empty"),
    ("reset", Retryable, "connection"),
    ("timeout", Retryable, "timeout"),
    ("stall", Retryable, "timeout"),
]
ACTIONS = {Retryable: "retry", ModelUnusable: "next", Permanent: "fail"}


@pytest.mark.parametrize(("fault", "error", "kind"), FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_maps_to_its_kind(provider, sim, fault, error, kind):
    # Given the model answers every request with the fault
    sim.configure(models={MODEL: {"fault": fault}})
    # When a request is made with a short timeout
    start = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        ask(provider, timeout_s=0.5)
    elapsed = time.monotonic() - start
    # Then the error is of the documented class, kind and action, and leaks no key
    exc = caught.value
    assert type(exc) is error
    assert (exc.kind, exc.action) == (kind, ACTIONS[error])
    if kind != "empty":  # an empty answer has no library error to chain
        assert exc.__cause__ is not None  # mapped once, with `raise ... from`
    assert exc.retry_after_s is None
    assert_clean(exc)
    # A held answer is given up on at the request's timeout, not the client's
    if fault in ("timeout", "stall"):
        assert 0.5 <= elapsed < CLIENT_TIMEOUT_S, elapsed


def test_status_errors_carry_the_status_and_the_providers_message(provider, sim):
    sim.configure(models={MODEL: {"fault": "503"}})
    with pytest.raises(Retryable) as caught:
        ask(provider)
    assert "HTTP 503" in caught.value.message
    assert "simulated 503" in caught.value.message


def test_directive_in_the_prompt_scripts_one_job(provider):
    with pytest.raises(ModelUnusable):
        ask(provider, text=f"[[sim:{MODEL}=401]] hi")
    assert ask(provider, text="[[sim:other=401]] hi").text.endswith("hi")


@pytest.mark.parametrize("fault", ["429:12", "429:date:12"])
def test_retry_after_is_parsed(provider, sim, fault):
    sim.configure(models={MODEL: {"fault": fault}})
    with pytest.raises(Retryable) as caught:
        ask(provider)
    assert caught.value.kind == "rate_limited"
    assert caught.value.retry_after_s is not None
    assert 10.5 <= caught.value.retry_after_s <= 12.5
    assert_clean(caught.value)


def test_connection_refused(client):
    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = OpenAICompatProvider(f"http://127.0.0.1:{port}/v1", KEY, client)
    with pytest.raises(Retryable) as caught:
        ask(provider)
    assert caught.value.kind == "connection"
    assert_clean(caught.value)


def test_the_pool_survives_faults(provider, sim):
    for fault in ("reset", "stall", "timeout", "malformed"):
        with pytest.raises(Retryable):
            ask(provider, text=f"[[sim:*={fault}]]", timeout_s=0.3)
        assert ask(provider).text.startswith("[sim ")


# --- capacity -------------------------------------------------------------------------------


def test_1000_concurrent_slow_requests(sim):
    # Given a provider answering in 3 s (longer than 1,000 threads take to send) and a
    # worker of 1,000 threads sharing one client
    sim.configure(default={"latency_ms": 3000})
    request = CompletionRequest(MODEL, HELLO, timeout_s=30)
    answered: list[float] = []
    provider: OpenAICompatProvider  # this test's own, made below (not the fixture)

    def call(_: int) -> Completion:
        completion = provider.complete(request)
        answered.append(time.time())
        return completion

    with make_client(1000) as http, concurrent.futures.ThreadPoolExecutor(1000) as pool:
        provider = OpenAICompatProvider(sim.url, KEY, http)
        list(pool.map(lambda _: warm_up(), range(1000)))
        # When all of them call at once
        results = list(pool.map(call, range(1000)))
    assert len(results) == 1000 and all(r.text for r in results)
    # Then the calls were in flight together: far more requests reached the provider
    # before the first answer came back than a pool of httpx's default 100 connections
    # would let through (on a loaded machine the last few threads may start late, so not
    # all 1,000 are required)
    arrived = [r["t"] for r in sim.requests()]
    assert len(arrived) == 1000
    early = sum(t < min(answered) for t in arrived)
    assert early > 500, f"only {early} calls in flight before the first answer"


def warm_up() -> None:
    """Make the executor start all its threads before the clock starts."""
    time.sleep(0.01)


# --- unit tests on MockTransport ------------------------------------------------------------


def mock_provider(
    handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any
) -> tuple[OpenAICompatProvider, httpx.Client]:
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return OpenAICompatProvider("https://api.example.com/v1/", KEY, http, **kwargs), http


def ok(content: Any = "fine", usage: Any = None, **extra: Any) -> httpx.Response:
    body = {"model": "served-model", "choices": [{"message": {"content": content}}], **extra}
    if usage is not None:
        body["usage"] = usage
    return httpx.Response(200, json=body)


def test_request_shape_omits_unset_params_and_sends_headers():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(usage={"prompt_tokens": 5, "completion_tokens": 2})

    provider, http = mock_provider(handler, extra_headers={"X-Title": "modelfleet"})
    with http:
        completion = provider.complete(CompletionRequest("m", HELLO, timeout_s=7))
        provider.complete(CompletionRequest("m", HELLO, temperature=0.0, max_tokens=0))
    first, second = seen
    assert str(first.url) == "https://api.example.com/v1/chat/completions"
    assert json.loads(first.content) == {"model": "m", "messages": HELLO}
    assert json.loads(second.content)["temperature"] == 0.0
    assert json.loads(second.content)["max_tokens"] == 0
    assert first.headers["authorization"] == f"Bearer {KEY}"
    assert first.headers["x-title"] == "modelfleet"
    assert first.extensions["timeout"]["read"] == 7
    assert (completion.prompt_tokens, completion.completion_tokens) == (5, 2)
    assert completion.raw_model == "served-model"
    assert KEY not in repr(provider)


def test_a_key_echoed_by_the_provider_is_redacted():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": f"Incorrect API key: {KEY}"}})

    provider, http = mock_provider(handler)
    with http, pytest.raises(ModelUnusable) as caught:
        provider.complete(CompletionRequest("m", HELLO))
    assert "Incorrect API key: ***" in caught.value.message
    assert_clean(caught.value)


@pytest.mark.parametrize(
    ("response", "error", "kind"),
    [
        (httpx.Response(422, json={"detail": "bad field"}), Permanent, "bad_request"),
        (httpx.Response(413, text="too large"), Permanent, "bad_request"),
        (httpx.Response(504, text="gateway timeout"), Retryable, "server_error"),
        (httpx.Response(302, headers={"Location": "/elsewhere"}), Retryable, "malformed"),
        (ok(content=None), Retryable, "empty"),
        (ok(content=""), Retryable, "empty"),
        (httpx.Response(200, json={"choices": "nope"}), Retryable, "malformed"),
        (httpx.Response(200, json={"choices": [{"text": "legacy"}]}), Retryable, "malformed"),
        (httpx.Response(200, json=["not", "an", "object"]), Retryable, "malformed"),
        (httpx.Response(200, content=b"\xff\xfe garbage"), Retryable, "malformed"),
        (ok(content={"unexpected": "object"}), Retryable, "malformed"),
    ],
    ids=[
        "422",
        "413",
        "504",
        "302",
        "null",
        "blank",
        "choices-str",
        "no-message",
        "list",
        "bytes",
        "content-object",
    ],
)
def test_status_and_shape_mapping(response, error, kind):
    provider, http = mock_provider(lambda request: response)
    with http, pytest.raises(ProviderError) as caught:
        provider.complete(CompletionRequest("m", HELLO))
    assert (type(caught.value), caught.value.kind) == (error, kind)
    assert len(caught.value.message) < 400


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (httpx.ConnectTimeout("connect timed out"), "timeout"),
        (httpx.PoolTimeout("no connection free"), "timeout"),
        (httpx.WriteTimeout("write timed out"), "timeout"),
        (httpx.ConnectError("refused"), "connection"),
        (httpx.RemoteProtocolError("server disconnected"), "connection"),
        (httpx.ReadError("reset by peer"), "connection"),
    ],
)
def test_transport_exceptions_map_to_retryable(raised, kind):
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    provider, http = mock_provider(handler)
    with http, pytest.raises(Retryable) as caught:
        provider.complete(CompletionRequest("m", HELLO))
    assert caught.value.kind == kind
    assert caught.value.__cause__ is raised


def test_partial_usage_is_completed_by_estimates_and_odd_costs_ignored():
    provider, http = mock_provider(
        lambda request: ok(
            content="four words right here", usage={"prompt_tokens": 9, "cost": "0.1"}
        )
    )
    with http:
        completion = provider.complete(CompletionRequest("m", HELLO))
    assert completion.prompt_tokens == 9
    assert completion.completion_tokens == estimate_tokens("four words right here")
    assert completion.tokens_estimated is True
    assert completion.provider_cost_usd is None


def test_content_given_as_text_parts_is_joined():
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "fleet"}]
    provider, http = mock_provider(lambda request: ok(content=parts))
    with http:
        assert provider.complete(CompletionRequest("m", HELLO)).text == "Hello, fleet"


# --- Retry-After and the client -------------------------------------------------------------


def test_parse_retry_after():
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    past = email.utils.formatdate(now - 30, usegmt=True)
    cases = {
        "5": 5.0,
        " 2.5 ": 2.5,
        "-3": 0.0,
        date: 30.0,
        past: 0.0,
        "soon": None,
        "": None,
        "nan": None,
        "inf": None,
        "Mon, 99 Foo 2024 99:99:99 GMT": None,
    }
    for value, expected in cases.items():
        assert parse_retry_after(httpx.Headers({"Retry-After": value}), now=now) == expected, value
    assert parse_retry_after(httpx.Headers({})) is None
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5


def test_make_client_sizes_its_pool_to_the_concurrency():
    with make_client(100, timeout_s=30) as http:
        transport = http._transport
        assert isinstance(transport, ShardedTransport)
        assert sum(transport._free) == 100
        assert all(
            shard._pool._max_connections == shard._pool._max_keepalive_connections == size
            for shard, size in zip(transport._shards, transport._free, strict=True)
        )
        assert http.timeout.read == 30
    with pytest.raises(ValueError):
        make_client(0)


def test_sharded_transport_returns_connections_it_lends(sim):
    with make_client(40) as http:
        provider = OpenAICompatProvider(sim.url, KEY, http)
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            list(pool.map(lambda _: ask(provider), range(200)))
        for fault in ("stall", "reset", "503"):
            with pytest.raises(Retryable):
                ask(provider, text=f"[[sim:*={fault}]]", timeout_s=0.3)
        transport = http._transport
        assert isinstance(transport, ShardedTransport)
        assert sum(transport._free) == 40
