"""Embeddings (docs/embeddings.md): the embedding class and its routing, the fleet's
cache of vectors on a real redis-server, and embedding jobs through the test fleet's
real workers, by dispatch() and by the gateway with the official openai SDK."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest
import yaml

from router.catalog import default_catalog_path, load_catalog
from router.errors import ConfigError, InvalidJob
from router.jobs import parse_job
from router.policy import route_job
from router.results import decode_vector, encode_vector, pack_vector
from tests.fixtures import ledger_rows, reset_live_state
from tests.test_gateway import client, gateway_fixture, new_key
from tests.test_state_round_trips import trips
from workers.runtime.embedding_call import split_tokens
from workers.state import keys
from workers.state.vector_cache import Cached, VectorCache

gateway = gateway_fixture("embeddings-gateway", 60)


def job(**fields: Any) -> Any:
    return parse_job({"task_class": "embedding", "input": ["a text"], **fields})


# --- the job and its route ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"input": None}, "'input' is required for an embedding job"),
        ({"input": ""}, "'input' must not be empty"),
        ({"input": ["ok", ""]}, "'input.1'"),
        ({"input": [1, 2]}, "'input.0'"),
        ({"dimensions": 0}, "'dimensions'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "'messages' is for chat jobs"),
        ({"stream": True}, "'stream' is for chat jobs"),
        ({"max_tokens": 5}, "'max_tokens' is for chat jobs"),
        ({"task_class": "creative"}, "'input' is for embedding jobs"),
    ],
)
def test_a_bad_embedding_job_is_refused_in_one_line(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidJob) as refused:
        parse_job({"task_class": "embedding", "input": ["a"], **fields})
    assert needle in str(refused.value) and "\n" not in str(refused.value)


def test_a_chat_job_cannot_ask_for_dimensions() -> None:
    with pytest.raises(InvalidJob, match="'dimensions' is for embedding jobs"):
        parse_job(
            {
                "task_class": "creative",
                "messages": [{"role": "user", "content": "x"}],
                "dimensions": 8,
            }
        )


def test_an_embedding_job_takes_the_embedding_chain_local_first() -> None:
    catalog = load_catalog()
    decision = route_job(catalog, job(input="one text"))
    assert [h.model for h in decision.chain] == catalog.policy.chains["embedding"]
    assert decision.chain[0].tier == "local" and decision.needs == frozenset({"embedding"})


def callable_here(model: str) -> Any:
    """A provider lookup for which every model is callable from this worker."""
    return None


def test_an_embedding_delivery_takes_no_slot_before_its_cache_lookup() -> None:
    # A slot taken with the delivery's first round trip would be spent on no call when
    # the cache answers the whole batch: an embedding job asks for it only when it calls.
    from router.travel import travelling_state
    from workers.runtime.step import first_call

    catalog = load_catalog()
    chat = {"task_class": "cost_free", "messages": [{"role": "user", "content": "x"}]}
    for data, want in ((chat, True), ({"task_class": "embedding", "input": ["x"]}, False)):
        state = travelling_state(route_job(catalog, parse_job(data)), time.time())
        here = state.chain[0].queue
        found = first_call(data, state, here=here, providers=callable_here, now=time.time())
        assert (found == state.chain[0].model) is want, data


def test_each_input_not_the_batch_must_fit_the_context_window() -> None:
    # 64 inputs of ~3,000 tokens: 190k in all, far past every window, but each fits
    decision = route_job(load_catalog(), job(input=["word " * 3000] * 64))
    assert decision.chain and not decision.dropped
    # one input past nomic's 8,192 tokens drops it (and the free one), not the local model
    one = route_job(load_catalog(), job(input=["word " * 10_000]))
    assert [h.model for h in one.chain] == ["local/qwen3-embedding"]
    assert dict(one.dropped)["ollama/nomic-embed-text"].startswith("context too small")


def test_a_chat_job_naming_an_embedding_model_is_told_it_does_not_chat() -> None:
    chat = parse_job(
        {
            "task_class": "creative",
            "model": "local/qwen3-embedding",
            "messages": [{"role": "user", "content": "hello"}],
        }
    )
    decision = route_job(load_catalog(), chat)
    assert dict(decision.dropped)["local/qwen3-embedding"] == "an embedding model: it does not chat"
    assert all(h.model != "local/qwen3-embedding" for h in decision.chain)


def test_the_catalog_keeps_embedding_models_to_their_chain(tmp_path) -> None:
    data = yaml.safe_load(default_catalog_path().read_text())
    data["policy"]["chains"]["creative"].append("ollama/nomic-embed-text")
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="is an embedding model"):
        load_catalog(path)


def test_a_catalog_without_an_embedding_chain_loads_and_refuses_embedding_jobs(tmp_path) -> None:
    data = yaml.safe_load(default_catalog_path().read_text())
    del data["policy"]["chains"]["embedding"]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    older = load_catalog(path)  # a copy made before the class existed
    with pytest.raises(InvalidJob, match="no chain for task class 'embedding'"):
        route_job(older, job())


def test_vectors_travel_as_little_endian_float32_base64() -> None:
    vector = [0.5, -1.25, 3.0]
    assert decode_vector(encode_vector(vector)) == vector
    assert pack_vector(vector) == b"\x00\x00\x00?\x00\x00\xa0\xbf\x00\x00@@"


def test_a_calls_tokens_are_shared_among_its_texts_and_add_up() -> None:
    assert split_tokens(10, [1, 1, 2]) == [3, 2, 5]
    assert sum(split_tokens(1001, [7, 3, 5, 0])) == 1001
    assert split_tokens(0, [4, 4]) == [0, 0] and split_tokens(5, []) == []


# --- the cache on a real redis-server ----------------------------------------------


def entry(seed: float, tokens: int = 3) -> Cached:
    return Cached(pack_vector([seed, seed + 1]), tokens)


def test_the_cache_answers_item_by_item_per_model_and_length(fresh_redis: Any) -> None:
    cache = VectorCache(fresh_redis, ttl_s=60, max_entries=100)
    cache.put("m/a", None, ["one", "two"], [entry(1), entry(2, tokens=5)])
    found = cache.get("m/a", None, ["two", "three", "one"])
    assert found[0] == entry(2, tokens=5) and found[1] is None and found[2] == entry(1)
    # another model, or another length, knows nothing of them
    assert cache.get("m/b", None, ["one"]) == [None]
    assert cache.get("m/a", 256, ["one"]) == [None]
    # a lookup is one round trip, and marks its hits as used: a miss adds nothing to the
    # index
    sent = trips(fresh_redis)
    cache.get("m/a", None, ["one", "four"])
    assert sent == [1]
    assert fresh_redis.zcard(keys.vector_index()) == 2


def test_cached_vectors_expire_after_their_ttl(fresh_redis: Any) -> None:
    cache = VectorCache(fresh_redis, ttl_s=0.3, max_entries=100)
    cache.put("m/a", None, ["one"], [entry(1)])
    assert cache.get("m/a", None, ["one"]) == [entry(1)]
    time.sleep(0.5)
    assert cache.get("m/a", None, ["one"]) == [None]


def test_past_its_bound_the_least_recently_used_go(fresh_redis: Any) -> None:
    cache = VectorCache(fresh_redis, ttl_s=60, max_entries=3)
    for n, text in enumerate(["a", "b", "c"]):
        cache.put("m/a", None, [text], [entry(n)])
        time.sleep(0.01)
    cache.get("m/a", None, ["a"])  # used again: "b" is now the least recently used
    time.sleep(0.01)
    cache.put("m/a", None, ["d"], [entry(9)])
    found = cache.get("m/a", None, ["a", "b", "c", "d"])
    assert [f is not None for f in found] == [True, False, True, True]
    assert fresh_redis.zcard(keys.vector_index()) == 3
    assert len(fresh_redis.keys(keys.vector("m/a", None, "*"))) == 3


def test_an_unreachable_redis_is_a_cache_that_knows_nothing() -> None:
    import redis

    away = redis.Redis(port=1, socket_connect_timeout=0.2)
    cache = VectorCache(away, ttl_s=60, max_entries=3)
    assert cache.get("m/a", None, ["a", "b"]) == [None, None]
    cache.put("m/a", None, ["a"], [entry(1)])  # no error: the job goes on


# --- through the test fleet: dispatch() and the gateway -----------------------------

SIM_MODEL = "ollama/nomic-embed-text"  # answered by the simulator (no key, like Ollama)


def texts(n: int, tag: str | None = None) -> list[str]:
    tag = tag or uuid.uuid4().hex[:10]
    return [f"document {i} about {tag}: " + "words " * (i % 7) for i in range(n)]


def embedded_by_upstream(simulator: Any, batch: list[str]) -> list[str]:
    """The texts of `batch` the simulator was asked to embed (its request log)."""
    wanted = set(batch)
    sent: list[str] = []
    for entry in simulator.requests():
        body = entry.get("body")
        if isinstance(body, dict) and "input" in body:
            given = body["input"] if isinstance(body["input"], list) else [body["input"]]
            sent += [t for t in given if t in wanted]
    return sent


@pytest.fixture(scope="module")
def _usable(fleet_env: dict[str, str]) -> None:
    reset_live_state(fleet_env)


def test_an_embedding_job_through_dispatch_then_again_from_the_cache(
    fleet_app: Any, fleet_env: dict[str, str], simulator: Any, _usable: None
) -> None:
    from client.dispatch import dispatch

    batch = texts(20)
    first = dispatch(
        {"task_class": "embedding", "model": SIM_MODEL, "input": batch, "dimensions": 64}
    ).get(timeout=60)
    assert first.ok and first.model == SIM_MODEL, first.error
    vectors = first.embeddings()
    assert vectors is not None and len(vectors) == 20 and {len(v) for v in vectors} == {64}
    assert embedded_by_upstream(simulator, batch) == batch
    [attempt] = first.attempts
    assert (attempt.items, attempt.cached_items, attempt.prompt_tokens > 0) == (20, 0, True)

    # The same batch again: answered from the cache, the upstream asked nothing more
    again = dispatch(
        {"task_class": "embedding", "model": SIM_MODEL, "input": batch, "dimensions": 64}
    ).get(timeout=60)
    assert again.ok and again.embeddings() == vectors
    assert embedded_by_upstream(simulator, batch) == batch  # still only the first call's
    [hit] = again.attempts
    assert (hit.items, hit.cached_items, hit.prompt_tokens) == (0, 20, 0)
    assert hit.cached_tokens == attempt.prompt_tokens  # what the cache saved
    # and the ledger has it: what the first call embedded, what the cache then answered
    [first_row] = ledger_rows(fleet_env, first.job_id).values()
    [again_row] = ledger_rows(fleet_env, again.job_id).values()
    assert (first_row["items"], first_row["cached_items"]) == (20, 0)
    assert (again_row["items"], again_row["cached_items"], again_row["prompt_tokens"]) == (0, 20, 0)
    assert again_row["cached_tokens"] == first_row["prompt_tokens"]


def test_a_half_cached_batch_sends_only_the_missing_half(
    fleet_app: Any, simulator: Any, _usable: None
) -> None:
    from client.dispatch import dispatch

    known, new = texts(30), texts(30)
    dispatch({"task_class": "embedding", "model": SIM_MODEL, "input": known}).get(timeout=60)
    mixed = [t for pair in zip(known, new, strict=True) for t in pair]  # interleaved
    result = dispatch({"task_class": "embedding", "model": SIM_MODEL, "input": mixed}).get(
        timeout=60
    )
    assert result.ok, result.error
    assert embedded_by_upstream(simulator, new) == new  # only the unknown half went up
    assert embedded_by_upstream(simulator, known) == known  # (once, by the first job)
    [attempt] = result.attempts
    assert (attempt.items, attempt.cached_items) == (30, 30)
    # every vector in its place: each equals the one the text gets alone
    alone = dispatch(
        {"task_class": "embedding", "model": SIM_MODEL, "input": [new[3], known[3]]}
    ).get(timeout=60)
    vectors = result.embeddings() or []
    assert alone.embeddings() == [vectors[7], vectors[6]]


def test_the_default_chain_embeds_locally_with_mlx(fleet_app: Any, _usable: None) -> None:
    from client.dispatch import dispatch

    result = dispatch({"task_class": "embedding", "input": texts(3)}).get(timeout=120)
    assert result.ok and result.model == "local/qwen3-embedding", result.error
    vectors = result.embeddings() or []
    assert len(vectors) == 3
    for vector in vectors:  # unit length, as the model's pooling leaves them
        assert abs(sum(x * x for x in vector) - 1) < 1e-3


def test_the_openai_sdk_embeds_through_the_gateway(
    gateway: Any, fleet_env: dict[str, str], simulator: Any, _usable: None
) -> None:
    sdk = client(gateway, new_key(fleet_env, "search-app"))
    batch = texts(8)
    made = sdk.embeddings.create(model=SIM_MODEL, input=batch, dimensions=32)
    assert [d.index for d in made.data] == list(range(8))
    assert {len(d.embedding) for d in made.data} == {32} and made.model == SIM_MODEL
    assert made.usage.prompt_tokens > 0
    assert embedded_by_upstream(simulator, batch) == batch
    # base64, as OpenAI encodes it, gives the same vectors; from the cache this time
    raw = sdk.embeddings.with_raw_response.create(
        model=SIM_MODEL, input=batch, dimensions=32, encoding_format="base64"
    )
    body = json.loads(raw.text)
    assert [decode_vector(d["embedding"]) for d in body["data"]] == [d.embedding for d in made.data]
    assert body["usage"]["cached_items"] == 8 and body["usage"]["prompt_tokens"] == 0
    assert embedded_by_upstream(simulator, batch) == batch
    # fleet/embedding and one text
    one = sdk.embeddings.create(model="fleet/embedding", input="just one text")
    assert len(one.data) == 1 and one.model == "local/qwen3-embedding"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "fleet/embedding", "input": [1, 2, 3]}, 400, "input"),
        (
            {"model": "fleet/embedding", "input": "x", "encoding_format": "int8"},
            400,
            "encoding_format",
        ),
        ({"model": "fleet/embedding", "input": "x", "dimensions": -1}, 400, "dimensions"),
        ({"model": "zai/glm-4.7", "input": "x"}, 400, None),
        ({"model": "nope/nothing", "input": "x"}, 404, "model"),
        ({"model": "fleet/embedding", "input": "x", "colour": 1}, 400, "colour"),
    ],
)
def test_a_bad_embedding_request_is_refused_naming_its_field(
    gateway: Any, fleet_env: dict[str, str], body: dict[str, Any], status: int, param: str | None
) -> None:
    key = new_key(fleet_env, "bad-embeds")
    answer = httpx.post(
        f"{gateway.url}/embeddings", json=body, headers={"authorization": f"Bearer {key}"}
    )
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and "\n" not in error["message"]
