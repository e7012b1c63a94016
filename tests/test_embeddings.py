"""Embeddings (docs/embeddings.md): the embedding class and its routing, the fleet's
cache of vectors on a real redis-server, and embedding jobs through the test fleet's
real workers, by dispatch() and by the gateway with the official openai SDK."""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml

from router.catalog import default_catalog_path, load_catalog
from router.errors import ConfigError, InvalidJob
from router.jobs import parse_job
from router.policy import route_job
from router.results import decode_vector, encode_vector, pack_vector
from workers.runtime.embedding_call import split_tokens
from workers.state import keys
from workers.state.vector_cache import Cached, VectorCache


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
