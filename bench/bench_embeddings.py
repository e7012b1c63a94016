"""`python -m bench.bench_embeddings [--texts 1000] [--batch 100] [--rounds 5]`: the
embedding cache (docs/embeddings.md), standalone (not part of `python -m bench`).

1. Cached lookups a second: VectorCache.get() of a batch whose every text is cached
   (1,024-float vectors), on the stack's private redis-server; median of `--rounds`
   rounds of 200 lookups, for a batch of 1 and of `--batch`.
2. Tokens saved through the fleet: a corpus of `--texts` texts embedded by dispatch() in
   batches of `--batch` (one local worker, the simulator as the Ollama upstream), then
   the same corpus again, then a corpus half old and half new. For each pass: texts the
   upstream received (its request log), prompt tokens paid, tokens the cache saved (the
   attempts' cached_tokens) and the median job time.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from bench.common import Load, Stack, median

MODEL = "ollama/nomic-embed-text"  # the simulator stands in for Ollama


def corpus(n: int, tag: str) -> list[str]:
    return [f"{tag} passage {i}: " + "lorem ipsum dolor " * (1 + i % 9) for i in range(n)]


def lookups_per_s(stack: Stack, batch: int, rounds: int) -> float:
    import redis

    from router.results import pack_vector
    from workers.state.vector_cache import Cached, VectorCache

    cache = VectorCache(redis.Redis.from_url(stack.redis.url), ttl_s=3600, max_entries=1_000_000)
    texts = corpus(batch, f"lookup-{batch}")
    vector = pack_vector([0.001 * i for i in range(1024)])
    cache.put("bench/model", None, texts, [Cached(vector, 10)] * batch)
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(200):
            found = cache.get("bench/model", None, texts)
        rates.append(200 * batch / (time.perf_counter() - started))
        assert all(f is not None for f in found)
    return median(rates)


def embed_pass(stack: Stack, texts: list[str], batch: int) -> dict[str, Any]:
    from client.dispatch import dispatch

    assert stack.sim is not None
    before = len(stack.sim.requests())
    paid = saved = 0
    times = []
    for start in range(0, len(texts), batch):
        part = texts[start : start + batch]
        clock = time.perf_counter()
        result = dispatch({"task_class": "embedding", "model": MODEL, "input": part}).get(
            timeout=120
        )
        times.append((time.perf_counter() - clock) * 1000)
        assert result.ok, result.error
        paid += sum(a.prompt_tokens for a in result.attempts)
        saved += sum(a.cached_tokens for a in result.attempts)
    sent = sum(
        len(e["input"] or []) for e in stack.sim.requests()[before:] if e.get("input") is not None
    )
    return {
        "texts": len(texts),
        "sent_upstream": sent,
        "tokens_paid": paid,
        "tokens_saved": saved,
        "job_ms_median": round(median(times), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    with Load() as load, Stack("embeddings") as stack:
        figures["lookups_per_s_batch_1"] = round(lookups_per_s(stack, 1, args.rounds))
        figures[f"lookups_per_s_batch_{args.batch}"] = round(
            lookups_per_s(stack, args.batch, args.rounds)
        )
        stack.worker("local", 4)
        stack.wait_ready()
        old = corpus(args.texts, uuid.uuid4().hex[:8])
        new = corpus(args.texts // 2, uuid.uuid4().hex[:8])
        figures["first_pass"] = embed_pass(stack, old, args.batch)
        figures["same_again"] = embed_pass(stack, old, args.batch)
        mixed = [t for pair in zip(old[: len(new)], new, strict=True) for t in pair]
        figures["half_new"] = embed_pass(stack, mixed, args.batch)
    figures["load_1m"] = load.span
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
