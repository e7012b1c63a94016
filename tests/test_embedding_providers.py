"""Embeddings at the provider seam: the OpenAI-compatible adapter against the simulator over
real HTTP, the simulator's own /embeddings, and the MLX provider on the tiny generated
qwen3 embedding model (no hub)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.results import decode_vector
from router.tokens import estimate_tokens
from workers.providers import mlx_local
from workers.providers.base import (
    Caller,
    CapabilityRefused,
    EmbeddingRequest,
    Embeddings,
    ModelUnusable,
    Permanent,
    ProviderError,
    Retryable,
    calling_for,
)
from workers.providers.mlx_local import MLXProvider
from workers.providers.openai_compat import OpenAICompatProvider, make_client
from workers.sim.simulator import EMBEDDING_SIZE, Simulator, embedding_of

KEY = "sk-test-EMBEDDING-SECRET-9090"
MODEL = "nomic-embed-text"
TEXTS = ["The fleet runs many small jobs.", "Blue light is scattered more.", "Practice!"]


def norm(vector: list[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in vector))


def close(a: list[float], b: list[float], tolerance: float = 1e-6) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def assert_clean(exc: ProviderError) -> None:
    """The error crosses Celery as JSON and names no key."""
    dumped = json.dumps(exc.to_dict())
    assert KEY not in str(exc) and KEY not in dumped
    assert json.loads(dumped)["kind"] == exc.kind


# --- the OpenAI-compatible adapter against the simulator ------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with make_client(concurrency=8, timeout_s=10) as http:
        yield http


@pytest.fixture
def provider(sim: Simulator, client: httpx.Client) -> OpenAICompatProvider:
    return OpenAICompatProvider(sim.url, KEY, client)


def embed(provider: OpenAICompatProvider, texts: list[str] = TEXTS, **kw: Any) -> Embeddings:
    return provider.embed(EmbeddingRequest(MODEL, texts, **kw))


def test_vectors_come_in_the_inputs_order_with_the_providers_usage(provider, sim):
    # Given an upstream that lists its vectors last input first (each with its index)
    sim.configure(models={MODEL: {"reverse_data": True, "cost": 0.0002}})
    # When three texts are embedded
    found = embed(provider)
    # Then each text has its own vector, in the inputs' order, whole and of unit length
    assert found.vectors == [embedding_of(text) for text in TEXTS]
    assert all(len(v) == EMBEDDING_SIZE and abs(norm(v) - 1) < 1e-9 for v in found.vectors)
    # with the usage the provider gave
    assert found.prompt_tokens == sum(map(estimate_tokens, TEXTS))
    assert found.tokens_estimated is False
    assert found.provider_cost_usd == 0.0002
    assert found.raw_model == MODEL
    # And the upstream received exactly these texts, asked as floats, with the key
    [logged] = sim.requests()
    assert (logged["endpoint"], logged["model"], logged["input"]) == ("embeddings", MODEL, TEXTS)
    assert logged["body"] == {"model": MODEL, "input": TEXTS, "encoding_format": "float"}
    assert logged["authorization_present"] is True
    # and the configured model is listed as any other
    assert MODEL in [m["id"] for m in httpx.get(sim.url + "/models").json()["data"]]


def test_the_same_text_gets_the_same_vector_whatever_it_is_sent_with(provider):
    alone = embed(provider, ["Practice!"]).vectors[0]
    assert embed(provider).vectors[2] == alone
    assert embed(provider, ["Practice!", "Practice!"]).vectors == [alone, alone]


def test_dimensions_are_asked_of_the_upstream(provider, sim):
    found = embed(provider, dimensions=32)
    assert found.vectors == [embedding_of(text, dimensions=32) for text in TEXTS]
    assert sim.requests()[0]["body"]["dimensions"] == 32


def test_an_upstream_ignoring_dimensions_is_cut_and_normalised_again(provider, sim):
    # Given an upstream that answers whole vectors whatever `dimensions` asks (Ollama)
    sim.configure(models={MODEL: {"ignore_dimensions": True}})
    # When 32 dimensions are asked for
    found = embed(provider, dimensions=32)
    # Then the upstream was asked for 32 and answered whole vectors...
    assert sim.requests()[0]["dimensions"] == 32
    whole = [embedding_of(text) for text in TEXTS]
    assert all(abs(norm(v[:32]) - 1) > 0.1 for v in whole)  # their start is no unit vector
    # ...and each came back as its first 32 numbers, of unit length again (Matryoshka)
    for vector, full in zip(found.vectors, whole, strict=True):
        assert len(vector) == 32 and abs(norm(vector) - 1) < 1e-9
        assert close(vector, [x / norm(full[:32]) for x in full[:32]], 1e-12)
        assert close(vector, embedding_of(TEXTS[whole.index(full)], dimensions=32), 1e-12)


def test_a_vector_shorter_than_asked_is_malformed(provider, sim):
    sim.configure(models={MODEL: {"ignore_dimensions": True, "embedding_size": 16}})
    with pytest.raises(Retryable) as caught:
        embed(provider, dimensions=32)
    assert caught.value.kind == "malformed"
    assert "asked for 32 dimensions, got a vector of 16" in caught.value.message
    assert_clean(caught.value)


def test_missing_usage_is_estimated(provider, sim):
    sim.configure(models={MODEL: {"usage": False}})
    found = embed(provider)
    assert found.tokens_estimated is True
    assert found.prompt_tokens == sum(map(estimate_tokens, TEXTS))


FAULTS = [
    # fault, error class, kind
    ("429", Retryable, "rate_limited"),
    ("408", Retryable, "timeout"),
    ("500", Retryable, "server_error"),
    ("503", Retryable, "server_error"),
    ("400", Permanent, "bad_request"),
    ("401", ModelUnusable, "auth"),
    ("403", ModelUnusable, "auth"),
    ("404", ModelUnusable, "not_found"),
    ("malformed", Retryable, "malformed"),
    ("empty", Retryable, "malformed"),  # no vector for three inputs
    ("reset", Retryable, "connection"),
    ("timeout", Retryable, "timeout"),
    ("stall", Retryable, "timeout"),
]


@pytest.mark.parametrize(("fault", "error", "kind"), FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_maps_to_its_kind(provider, sim, fault, error, kind):
    # Given the embedding model answers every request with the fault
    sim.configure(models={MODEL: {"fault": fault}})
    # When texts are embedded with a short timeout
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        embed(provider, timeout_s=0.5)
    # Then the error is of the chat path's class and kind, chained, and leaks no key
    exc = caught.value
    assert (type(exc), exc.kind) == (error, kind)
    assert exc.__cause__ is not None
    assert_clean(exc)
    assert time.monotonic() - started < 5  # a held answer is given up at the timeout
    # And the call reached the upstream, logged as an embedding call
    assert [(r["endpoint"], r["fault"]) for r in sim.requests()] == [("embeddings", fault)]


def test_retry_after_is_parsed(provider, sim):
    sim.configure(models={MODEL: {"faults": ["429:12"]}})
    with pytest.raises(Retryable) as caught:
        embed(provider)
    assert caught.value.kind == "rate_limited"
    assert caught.value.retry_after_s == 12
    assert embed(provider).vectors  # the queue is spent: the next call is answered


def test_a_directive_in_an_input_scripts_its_call(provider):
    with pytest.raises(ModelUnusable):
        embed(provider, ["hello", f"[[sim:{MODEL}=401]] world"])
    assert embed(provider, ["hello", "[[sim:other-model=401]] world"]).vectors


def test_the_call_carries_the_fleet_job_header(provider, sim):
    with calling_for(Caller("job-emb-7", message=2, delivery=3, process="w1@host")):
        embed(provider)
    [logged] = sim.requests()
    assert (logged["job"], logged["job_message"], logged["job_delivery"]) == ("job-emb-7", 2, 3)
    assert logged["job_process"] == "w1@host"


def test_the_embeddings_url_follows_the_base_url(sim, client):
    for base in (sim.url, sim.url + "/", sim.base_url):
        provider = OpenAICompatProvider(base, None, client)
        assert provider.embed(EmbeddingRequest(MODEL, ["hi"])).vectors == [embedding_of("hi")]
    assert [r["authorization_present"] for r in sim.requests()] == [False] * 3


# --- answers the simulator does not give: the adapter's checks, on MockTransport -------------


def mock_embed(body: Any, status: int = 200, **kw: Any) -> Embeddings:
    # json.dumps writes NaN as Python's json reads it (httpx's json= refuses to)
    answer = httpx.Response(status, content=json.dumps(body).encode())
    with httpx.Client(transport=httpx.MockTransport(lambda request: answer)) as http:
        provider = OpenAICompatProvider("https://api.example.com/v1", KEY, http)
        return provider.embed(EmbeddingRequest("m", ["a", "b"], **kw))


def item(vector: Any, index: int | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"object": "embedding", "embedding": vector}
    return found if index is None else {**found, "index": index}


@pytest.mark.parametrize(
    "data",
    [
        [item([1.0, 0.0], 0)],  # one vector for two inputs
        [item([1.0, 0.0], 0), item([1.0], 1)],  # lengths differ
        [item([1.0, 0.0], 0), item([0.0, 1.0], 0)],  # an index twice
        [item([1.0, 0.0], 0), item([0.0, 1.0], 2)],  # an index out of range
        [item([1.0, "x"], 0), item([0.0, 1.0], 1)],  # not a number
        [item([1.0, float("nan")], 0), item([0.0, 1.0], 1)],  # not finite
        [item([], 0), item([0.0, 1.0], 1)],  # no numbers
        [item({"v": 1}, 0), item([0.0, 1.0], 1)],  # not a list
        [{"index": 0}, item([0.0, 1.0], 1)],  # no embedding
        "nope",
    ],
    ids=[
        "count",
        "lengths",
        "twice",
        "range",
        "str",
        "nan",
        "blank",
        "object",
        "missing",
        "str-data",
    ],
)
def test_answers_not_of_one_vector_per_input_are_malformed(data):
    with pytest.raises(Retryable) as caught:
        mock_embed({"data": data})
    assert caught.value.kind == "malformed"
    assert caught.value.__cause__ is not None


def test_items_without_indexes_are_kept_in_the_order_given():
    found = mock_embed({"data": [item([3.0, 4.0]), item([0.0, 2.0])]})
    assert found.vectors == [[3.0, 4.0], [0.0, 2.0]]  # as given: not normalised
    assert found.tokens_estimated is True and found.prompt_tokens == 2  # one token each


def test_a_model_that_makes_no_embeddings_is_refused_for_that_capability():
    body = {"error": {"message": '"llama3.2" does not support embeddings'}}
    with pytest.raises(CapabilityRefused) as caught:
        mock_embed(body, status=400)
    assert (caught.value.capability, caught.value.action) == ("embedding", "next")
    with pytest.raises(Permanent):  # any other 400 is the request's own fault
        mock_embed({"error": {"message": "input is too long"}}, status=400)


# --- the simulator's /embeddings --------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "input": []},
        {"model": "m", "input": ["ok", ""]},
        {"model": "m", "input": ["ok", 7]},
        {"model": "m", "input": 7},
        {"model": "m", "input": "ok", "encoding_format": "int8"},
        {"model": "m", "input": "ok", "dimensions": 0},
        {"model": "m", "input": "ok", "dimensions": True},
        {"model": "m", "input": "ok", "dimensions": EMBEDDING_SIZE + 1},
    ],
)
def test_the_simulator_refuses_what_openai_refuses(sim, body):
    answer = httpx.post(sim.url + "/embeddings", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"]


def test_the_simulator_answers_a_text_and_base64(sim):
    answer = httpx.post(
        sim.base_url + "/embeddings",  # without /v1 too
        json={"model": "m", "input": "hello", "encoding_format": "base64", "dimensions": 8},
    ).json()
    assert answer["object"] == "list" and answer["model"] == "m"
    [data] = answer["data"]
    assert data["index"] == 0 and isinstance(data["embedding"], str)
    assert close(decode_vector(data["embedding"]), embedding_of("hello", dimensions=8), 1e-6)
    prompt = estimate_tokens("hello")
    assert answer["usage"] == {"prompt_tokens": prompt, "total_tokens": prompt}
    assert sim.requests()[0]["input"] == ["hello"]


def test_the_log_keeps_the_newest_inputs_only(sim, monkeypatch):
    from workers.sim import simulator as simulator_module

    monkeypatch.setattr(simulator_module, "BODIES_KEPT", 2)
    for text in ("one", "two", "three"):
        httpx.post(sim.url + "/embeddings", json={"model": "m", "input": [text]})
    assert [e["input"] for e in sim.requests()] == [None, ["two"], ["three"]]


def test_the_simulator_checks_its_embedding_settings(sim):
    for settings in ({"embedding_size": 0}, {"ignore_dimensions": "yes"}, {"reverse_data": 1}):
        answer = httpx.post(sim.base_url + "/_sim/config", json={"models": {"m": settings}})
        assert answer.status_code == 400, settings
    sim.configure(models={"m": {"embedding_size": 4}})
    answer = httpx.post(sim.url + "/embeddings", json={"model": "m", "input": ["a"]}).json()
    assert len(answer["data"][0]["embedding"]) == 4


# --- the MLX provider on the tiny embedding model ---------------------------------------------

HIDDEN = 64  # the tiny models' hidden size (workers/sim/tiny_model.py)


@pytest.fixture(scope="module")
def local(tiny_embedding_model_dir: Path) -> Iterator[MLXProvider]:
    p = MLXProvider(tiny_embedding_model_dir)
    p.load()
    yield p
    p.close()


def local_embed(provider: MLXProvider, texts: list[str], **kw: Any) -> Embeddings:
    return provider.embed(EmbeddingRequest("tiny-embedding", texts, **kw))


def token_ids(model_dir: Path, text: str) -> list[int]:
    """The text's tokens as the model's own tokenizer gives them, read apart from the
    provider."""
    from mlx_lm.utils import load_tokenizer

    return list(load_tokenizer(model_dir).encode(text))


def test_the_tiny_embedding_model_is_a_qwen3_body_built_once(tiny_embedding_model_dir, tmp_path):
    from workers.sim.tiny_model import build_tiny_embedding_model, is_complete

    config = json.loads((tiny_embedding_model_dir / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"]) == ("qwen3", HIDDEN)
    assert is_complete(tiny_embedding_model_dir, embedding=True)
    assert not is_complete(tiny_embedding_model_dir)  # not taken for the chat model
    files = sorted(p for p in tiny_embedding_model_dir.iterdir() if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert build_tiny_embedding_model(tiny_embedding_model_dir) == tiny_embedding_model_dir
    assert {p: p.stat().st_mtime_ns for p in files} == before  # nothing written again
    again = build_tiny_embedding_model(tmp_path / "again", force=True)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_embedding_model_dir / name).read_bytes()


def test_vectors_are_unit_length_one_per_text_and_deterministic(local):
    found = local_embed(local, TEXTS)
    assert isinstance(found, Embeddings) and len(found.vectors) == len(TEXTS)
    assert all(len(v) == HIDDEN and abs(norm(v) - 1) < 1e-5 for v in found.vectors)
    assert len({tuple(v) for v in found.vectors}) == len(TEXTS)  # each text its own
    assert local_embed(local, TEXTS).vectors == found.vectors
    assert found.tokens_estimated is False and found.raw_model == local.model


def test_prompt_tokens_are_the_tokens_run_end_token_included(
    local, tiny_embedding_model_dir, tiny_model_dir
):
    # The embedding model's tokenizer ends each text with <|endoftext|> itself (as
    # Qwen3-Embedding's does): the provider adds none
    ids = [token_ids(tiny_embedding_model_dir, text) for text in TEXTS]
    end = token_ids(tiny_embedding_model_dir, "<|endoftext|>")[0]
    assert all(seq[-1] == end and seq.count(end) == 1 for seq in ids)
    assert local_embed(local, TEXTS).prompt_tokens == sum(map(len, ids))
    # The chat model's does not: the provider appends it, one more token per text
    chat = MLXProvider(tiny_model_dir)
    try:
        found = chat.embed(EmbeddingRequest("tiny", TEXTS))
    finally:
        chat.close()
    plain = [token_ids(tiny_model_dir, text) for text in TEXTS]
    assert found.prompt_tokens == sum(map(len, plain)) + len(TEXTS)
    assert all(len(v) == HIDDEN and abs(norm(v) - 1) < 1e-5 for v in found.vectors)


def test_the_vector_is_the_last_tokens_final_hidden_state_normalised(
    local, tiny_embedding_model_dir
):
    # Reference, computed apart from the provider: the qwen3 body run on the text's
    # tokens, the last position's output (the final norm applied), to unit length
    import mlx.core as mx
    from mlx_lm.models import qwen3

    config = json.loads((tiny_embedding_model_dir / "config.json").read_text())
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    weights = mx.load(str(tiny_embedding_model_dir / "model.safetensors"))
    assert isinstance(weights, dict)
    model.load_weights([(f"model.{name}", value) for name, value in weights.items()])
    text = "Explain why the sky is blue."
    states = model.model(mx.array([token_ids(tiny_embedding_model_dir, text)]))
    last = states[0, -1]
    expected = (last / mx.linalg.norm(last)).tolist()
    assert close(local_embed(local, [text]).vectors[0], expected, 1e-5)


def test_dimensions_keep_the_first_n_normalised_again(local):
    whole = local_embed(local, TEXTS).vectors
    found = local_embed(local, TEXTS, dimensions=16).vectors
    for short, full in zip(found, whole, strict=True):
        assert len(short) == 16 and abs(norm(short) - 1) < 1e-5
        assert close(short, [x / norm(full[:16]) for x in full[:16]], 1e-5)


def test_a_texts_vector_is_the_same_alone_and_in_a_batch(local, monkeypatch):
    # Texts of very different lengths, run together (padded on the right)
    texts = ["Hi", "Good morning! How are you today?", "The quick brown fox. " * 12, "Numbers"]
    alone = [local_embed(local, [text]).vectors[0] for text in texts]
    together = local_embed(local, texts).vectors
    for a, b in zip(alone, together, strict=True):
        assert close(a, b, 1e-5)
    # in other batches (a budget of 48 tokens runs them in several), and through the KV
    # cache in steps of 8 positions (a long text's way)
    monkeypatch.setattr(mlx_local, "EMBED_BATCH_TOKENS", 48)
    monkeypatch.setattr(mlx_local, "EMBED_CHUNK_TOKENS", 8)
    assert mlx_local._batches([2, 9, 60, 3], 48) == [[0, 3, 1], [2]]
    for a, b in zip(alone, local_embed(local, texts).vectors, strict=True):
        assert close(a, b, 1e-5)


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (EmbeddingRequest("tiny", []), "non-empty list"),
        (EmbeddingRequest("tiny", ["ok", 3]), "input 1 is a int"),  # type: ignore[list-item]
        (EmbeddingRequest("tiny", ["ok"], dimensions=0), "positive integer"),
        (EmbeddingRequest("tiny", ["ok"], dimensions=HIDDEN + 1), f"more than {HIDDEN}"),
        (EmbeddingRequest("tiny", ["ok", "word " * 3000]), "more than the model's 2048"),
    ],
    ids=["none", "not-text", "zero", "too-many", "too-long"],
)
def test_bad_requests_are_permanent(local, request_, says):
    with pytest.raises(Permanent) as caught:
        local.embed(request_)
    assert caught.value.kind == "bad_request" and says in caught.value.message


def test_timeout_is_retryable_and_the_provider_recovers(local):
    many = [f"Question {i}: " + "the fleet runs many jobs " * 60 for i in range(40)]
    with pytest.raises(Retryable) as caught:
        local_embed(local, many, timeout_s=0.001)
    assert caught.value.kind == "timeout"
    assert len(local_embed(local, ["Still there?"]).vectors) == 1


def test_a_checkpoint_of_the_body_alone_loads_only_through_the_provider(
    tiny_embedding_model_dir, tmp_path
):
    # Qwen3-Embedding's layout (names without `model.`): plain mlx_lm.load refuses it
    import mlx_lm

    with pytest.raises(ValueError, match="not in model"):
        mlx_lm.load(str(tiny_embedding_model_dir))
    # A model that is not there is unusable, as for a chat
    with pytest.raises(ModelUnusable) as caught:
        local_embed(MLXProvider(tmp_path / "none"), ["hi"])
    assert caught.value.kind == "not_found"
