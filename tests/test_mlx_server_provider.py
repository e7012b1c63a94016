"""The OpenAI-compatible adapter against a server nobody here wrote: `mlx_lm.server`
serving the tiny generated model. Then a fleet worker whose catalog points the litellm
provider at that server answers a real job through Redis."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from client import dispatch
from router import load_catalog
from router.tokens import estimate_message_tokens
from tests.mlx_server import free_port, start_mlx_server, stop_mlx_server, wait_for_mlx_server
from workers.ops.pools import worker_argv
from workers.providers.base import (
    CompletionRequest,
    ModelUnusable,
    Permanent,
    Retryable,
)
from workers.providers.openai_compat import OpenAICompatProvider, make_client

ROOT = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "Hello there, tiny model"}]
MODEL = "default_model"  # mlx_lm.server's name for the model it was started with


@dataclass
class Server:
    url: str  # base URL, with /v1
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def mlx_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    proc = start_mlx_server(tiny_model_dir, port, tmp_path_factory.mktemp("mlx-server"))
    try:
        wait_for_mlx_server(proc, port, timeout_s=30)
        yield Server(f"http://127.0.0.1:{port}/v1", proc)
    finally:
        stop_mlx_server(proc)


@pytest.fixture(scope="module")
def sent() -> list[dict[str, Any]]:
    """The JSON bodies the adapter put on the wire, newest last."""
    return []


@pytest.fixture(scope="module")
def provider(mlx_server: Server, sent: list[dict[str, Any]]) -> Iterator[OpenAICompatProvider]:
    def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    with make_client(concurrency=4, timeout_s=30) as client:
        client.event_hooks = {"request": [record]}
        # A key the server ignores: the adapter must still work with one set.
        yield OpenAICompatProvider(mlx_server.url, "sk-mlx-unused", client)


def chat_ids(model_dir: Path, messages: list[dict[str, Any]]) -> list[int]:
    """The chat-templated prompt's token ids, computed independently of the server."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def ask(provider: OpenAICompatProvider, **kwargs: Any) -> Any:
    return provider.complete(CompletionRequest(MODEL, HELLO, timeout_s=30, **kwargs))


def test_text_and_the_servers_own_token_counts(provider, tiny_model_dir) -> None:
    completion = ask(provider, max_tokens=6)
    assert completion.text.strip()
    assert completion.raw_model == MODEL
    assert str(completion.extra["id"]).startswith("chatcmpl-")
    # Parsed from the server's usage, not estimated: the templated prompt's real length.
    assert not completion.tokens_estimated
    assert completion.prompt_tokens == len(chat_ids(tiny_model_dir, HELLO))
    assert completion.prompt_tokens != estimate_message_tokens(HELLO)
    assert completion.extra["finish_reason"] == "length"  # gibberish never stops early
    assert completion.completion_tokens == 6


@pytest.mark.parametrize("max_tokens", [1, 3, 17])
def test_max_tokens_reaches_the_server_and_bounds_the_answer(provider, sent, max_tokens) -> None:
    completion = ask(provider, max_tokens=max_tokens)
    assert sent[-1]["max_tokens"] == max_tokens
    assert 0 < completion.completion_tokens <= max_tokens


def test_temperature_reaches_the_server(provider, sent) -> None:
    greedy = [ask(provider, max_tokens=8, temperature=0.0).text for _ in range(2)]
    assert sent[-1]["temperature"] == 0.0
    assert greedy[0] == greedy[1]  # temperature 0: the same answer every time
    sampled = {ask(provider, max_tokens=8, temperature=1.5).text for _ in range(4)}
    assert sent[-1]["temperature"] == 1.5
    # Sampling at 1.5 over a random model's flat distribution: 4 equal answers of
    # 8 tokens would be a near-impossible coincidence.
    assert len(sampled | {greedy[0]}) >= 2


def test_no_temperature_or_max_tokens_means_none_sent(provider, sent) -> None:
    completion = provider.complete(CompletionRequest(MODEL, HELLO, timeout_s=30))
    assert "temperature" not in sent[-1] and "max_tokens" not in sent[-1]
    assert completion.completion_tokens > 0 and not completion.tokens_estimated


def test_unknown_model_is_not_found(provider) -> None:
    # The server tries to load the name, offline, and answers 404 with its reason.
    with pytest.raises(ModelUnusable) as caught:
        provider.complete(CompletionRequest("no-such/model", HELLO, max_tokens=4, timeout_s=30))
    assert caught.value.kind == "not_found"
    assert "HTTP 404" in caught.value.message and "/chat/completions" in caught.value.message


def test_wrong_path_is_not_found(mlx_server, provider) -> None:
    wrong = OpenAICompatProvider(mlx_server.url.replace("/v1", "/v2"), None, provider._client)
    with pytest.raises(ModelUnusable) as caught:
        wrong.complete(CompletionRequest(MODEL, HELLO, max_tokens=4, timeout_s=30))
    assert caught.value.kind == "not_found" and "Not Found" in caught.value.message


def test_bad_request_is_permanent(provider) -> None:
    with pytest.raises(Permanent) as caught:
        ask(provider, max_tokens=0)  # the server refuses it with a 400
    assert caught.value.kind == "bad_request" and caught.value.action == "fail"
    assert "HTTP 400" in caught.value.message and "max_tokens" in caught.value.message


def test_answer_slower_than_the_timeout_is_retryable(provider) -> None:
    with pytest.raises(Retryable) as caught:
        provider.complete(CompletionRequest(MODEL, HELLO, max_tokens=400, timeout_s=0.05))
    assert caught.value.kind == "timeout"
    assert ask(provider, max_tokens=2).completion_tokens <= 2  # the server still answers


def test_refused_connection_is_retryable(provider) -> None:
    gone = OpenAICompatProvider(f"http://127.0.0.1:{free_port()}/v1", None, provider._client)
    with pytest.raises(Retryable) as caught:
        gone.complete(CompletionRequest(MODEL, HELLO, max_tokens=4, timeout_s=5))
    assert caught.value.kind == "connection"


# --- a fleet worker whose catalog points litellm at mlx_lm.server ------------------------


@pytest.fixture(scope="module")
def mlx_fleet(
    mlx_server: Server,
    fleet_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    """A `free` worker on its own Redis database (so it takes no job of the main test
    fleet), with litellm/gpt-oss-free served by mlx_lm.server."""
    tmp = tmp_path_factory.mktemp("mlx-fleet")
    data = yaml.safe_load(Path(fleet_env["FLEET_CATALOG"]).read_text())
    data["providers"]["litellm"]["base_url"] = mlx_server.url
    data["providers"]["litellm"]["timeout_s"] = 30
    for model in data["models"]:
        if model["id"] == "litellm/gpt-oss-free":
            model["upstream"] = MODEL
    catalog = tmp / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(data, sort_keys=False))
    load_catalog(catalog)
    broker = fleet_env["FLEET_BROKER_URL"].rsplit("/", 1)[0] + "/13"
    env = {**fleet_env, "FLEET_BROKER_URL": broker, "FLEET_CATALOG": str(catalog)}
    log_path = tmp / "worker.log"
    argv = worker_argv(["free"], concurrency=2, name="test-mlx-litellm")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "mlx fleet worker not ready"
            time.sleep(0.1)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_fleet_job_answered_through_mlx_server(mlx_fleet, monkeypatch) -> None:
    for key in ("FLEET_BROKER_URL", "FLEET_CATALOG"):
        monkeypatch.setenv(key, mlx_fleet[key])
    job = {"task_class": "cost_free", "model": "litellm/gpt-oss-free", "max_tokens": 7}
    handle = dispatch({**job, "messages": HELLO})
    result = handle.get(timeout=30)
    assert result.ok, result.error
    assert result.model == "litellm/gpt-oss-free"
    (attempt,) = result.attempts
    assert attempt.queue == "free" and attempt.worker
    assert attempt.worker.startswith("test-mlx-litellm@")
    assert not attempt.tokens_estimated
    assert 0 < attempt.completion_tokens <= 7 and attempt.prompt_tokens > 0
    assert result.text and not result.text.startswith("[sim ")
