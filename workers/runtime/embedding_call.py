"""An embedding job's try of one model, with the fleet's cache in front of it
(docs/embeddings.md).

The texts whose vectors the cache holds for this model (and length) are not sent: the
call embeds only the rest, and the answer puts every vector back in the input's order.
A job the cache knows wholly is answered without a call, a slot or a queue hop. The
attempt says what was embedded (`items`, its prompt tokens) and what the cache answered
(`cached_items`, and `cached_tokens`: what those texts cost when they were embedded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from router.jobs import Job
from router.results import Attempt, pack_vector
from router.tokens import estimate_tokens
from router.travel import Hop
from workers.providers.base import EmbeddingRequest, ProviderError, Target
from workers.state.vector_cache import Cached


class Cache(Protocol):
    """workers/state/vector_cache.py's VectorCache."""

    def get(
        self, model: str, dimensions: int | None, texts: Sequence[str]
    ) -> list[Cached | None]: ...
    def put(
        self, model: str, dimensions: int | None, texts: Sequence[str], found: Sequence[Cached]
    ) -> None: ...


def cached_attempt(
    hop: Hop, number: int, found: Sequence[Cached], worker: str | None, now: float
) -> Attempt:
    """The attempt of a job the cache answered wholly for `hop`'s model: no call."""
    return Attempt(
        number=number,
        outcome="ok",
        cached_items=len(found),
        cached_tokens=sum(f.tokens for f in found),
        worker=worker,
        started_at=now,
        **hop.as_dict(),
    )


def try_embedding(
    job: Job,
    hop: Hop,
    number: int,
    target: Target,
    worker: str | None,
    now: Callable[[], float],
    found: Sequence[Cached | None],
    error_fields: Callable[[ProviderError], dict[str, Any]],
) -> tuple[Attempt, list[bytes] | ProviderError]:
    """One call embedding the texts `found` has no vector for: its attempt, and every
    vector in input order (float32 bytes), or the error."""
    texts = job.texts
    missing = [i for i, f in enumerate(found) if f is None]
    hits = [f for f in found if f is not None]
    base: dict[str, Any] = {
        "number": number,
        "worker": worker,
        "items": len(missing),
        "cached_items": len(hits),
        "cached_tokens": sum(f.tokens for f in hits),
        **hop.as_dict(),
    }
    request = EmbeddingRequest(
        model=target.upstream,
        input=[texts[i] for i in missing],
        dimensions=job.dimensions,
        timeout_s=target.timeout_s,
    )
    started = now()
    clock = time.perf_counter()
    try:
        got = target.provider.embed(request)
    except ProviderError as exc:
        latency = (time.perf_counter() - clock) * 1000
        failed = Attempt(outcome="error", latency_ms=latency, started_at=started, **base)
        return failed.model_copy(update=error_fields(exc)), exc
    latency = (time.perf_counter() - clock) * 1000
    ok = Attempt(
        outcome="ok",
        prompt_tokens=got.prompt_tokens,
        tokens_estimated=got.tokens_estimated,
        provider_cost_usd=got.provider_cost_usd,
        latency_ms=latency,
        started_at=started,
        **base,
    )
    made = [pack_vector(v) for v in got.vectors]
    return ok, assemble(found, missing, made)


def fresh_entries(
    job: Job, found: Sequence[Cached | None], vectors: Sequence[bytes], prompt_tokens: int
) -> tuple[list[str], list[Cached]]:
    """The texts a call embedded and their cache entries, the call's prompt tokens shared
    among them by their estimated sizes (a provider counts a batch's tokens, not each
    text's)."""
    missing = [i for i, f in enumerate(found) if f is None]
    texts = [job.texts[i] for i in missing]
    shares = split_tokens(prompt_tokens, [estimate_tokens(t) for t in texts])
    entries = [Cached(vectors[i], tokens) for i, tokens in zip(missing, shares, strict=True)]
    return texts, entries


def assemble(
    found: Sequence[Cached | None], missing: Sequence[int], made: Sequence[bytes]
) -> list[bytes]:
    """Every vector in input order: the cache's, and the call's in the gaps."""
    vectors = [f.vector if f is not None else b"" for f in found]
    for i, vector in zip(missing, made, strict=True):
        vectors[i] = vector
    return vectors


def split_tokens(total: int, weights: Sequence[int]) -> list[int]:
    """`total` shared in proportion to `weights`, in whole tokens that add up to it."""
    if not weights:
        return []
    whole = sum(weights) or len(weights)
    shares = [total * (w or (0 if sum(weights) else 1)) // whole for w in weights]
    for i in range(total - sum(shares)):
        shares[i % len(shares)] += 1
    return shares
