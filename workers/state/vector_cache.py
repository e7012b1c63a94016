"""The fleet's embedding cache: a text's vector from one model at one length, kept on the
state Redis so that every worker (and every app) shares it (docs/embeddings.md).

Keyed by model, dimensions and the text's sha256: a text embedded once is not sent again
to that model while its vector is kept. A batch is looked up item by item in one round
trip (MGET, and the hits marked as used), so a batch of 100 with 60 known sends only the
other 40. Each vector keeps the prompt tokens it cost, so a hit says how many tokens it
saved. Bounded twice: each entry expires `ttl_s` after it was stored, and past
`max_entries` the least recently used go (an index sorted by last use). A state Redis that
cannot be reached is a cache that knows nothing and keeps nothing: the job is embedded
whole.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from workers.state import keys

log = logging.getLogger(__name__)
_TOKENS = struct.Struct("<I")


@dataclass(frozen=True)
class Cached:
    """A text's vector (little-endian float32 bytes) and the prompt tokens it cost."""

    vector: bytes
    tokens: int


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class VectorCache:
    def __init__(self, redis: Any, ttl_s: float, max_entries: int) -> None:
        self.redis, self.ttl_s, self.max_entries = redis, ttl_s, max_entries

    def get(self, model: str, dimensions: int | None, texts: Sequence[str]) -> list[Cached | None]:
        """Each text's cached vector, or None: one round trip, whose hits count as a use."""
        names = [keys.vector(model, dimensions, digest(t)) for t in texts]
        if not names:
            return []
        # One round trip, MGET and the LRU touch together. ZADD XX leaves a miss out of
        # the index, but refreshes one whose key expired while still indexed: it stays
        # counted against the bound until pruned (no Lua script: copying the vectors
        # through Lua made a batch of 100 slower, bench/README.md measure 12).
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget(names)
        pipe.zadd(keys.vector_index(), dict.fromkeys(names, int(time.time() * 1000)), xx=True)
        try:
            found = pipe.execute()[0]
        except redis.RedisError as exc:
            log.warning("embedding cache not read: %s", type(exc).__name__)
            return [None] * len(texts)
        return [_decode(v) if v is not None else None for v in found]

    def put(
        self, model: str, dimensions: int | None, texts: Sequence[str], found: Sequence[Cached]
    ) -> None:
        """Keep each text's vector; then drop the least recently used past the bound."""
        if not texts:
            return
        try:
            self._put(model, dimensions, texts, found)
        except redis.RedisError as exc:
            log.warning("embedding cache not written: %s", type(exc).__name__)

    def _put(
        self, model: str, dimensions: int | None, texts: Sequence[str], found: Sequence[Cached]
    ) -> None:
        now = int(time.time() * 1000)
        names = [keys.vector(model, dimensions, digest(t)) for t in texts]
        pipe = self.redis.pipeline(transaction=False)
        for name, entry in zip(names, found, strict=True):
            pipe.set(name, _TOKENS.pack(entry.tokens) + entry.vector, px=int(self.ttl_s * 1000))
        index = keys.vector_index()
        pipe.zadd(index, dict.fromkeys(names, now))
        pipe.zremrangebyscore(index, "-inf", now - int(self.ttl_s * 1000))  # expired
        pipe.zcard(index)
        over = pipe.execute()[-1] - self.max_entries
        if over > 0:
            oldest = [name for name, _ in self.redis.zpopmin(index, over)]
            if oldest:
                self.redis.delete(*oldest)


def _decode(raw: bytes) -> Cached:
    (tokens,) = _TOKENS.unpack_from(raw)
    return Cached(vector=bytes(raw[_TOKENS.size :]), tokens=tokens)
