"""The fleet's live state as dispatchers see it: which models are blocked now, read from
the state Redis through a one-second cache.

A dispatcher must not pay a Redis round trip per chain model per job (enqueueing would
cost several times a raw `apply_async`), and a second-old view is good enough to pick a
job's first queue: the worker takes the real, atomic slot just before it calls.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping

from router.catalog import Catalog
from router.slots import Block
from workers.config import fleet_urls
from workers.state.connections import redis_client
from workers.state.limits import FleetState

log = logging.getLogger(__name__)
CACHE_S = 1.0


class LiveView:
    def __init__(self, state: FleetState, cache_s: float = CACHE_S) -> None:
        self.state = state
        self.cache_s = cache_s
        # (task class, the job's needs, model) -> (fresh until, the Block or None)
        self._cache: dict[tuple[str, frozenset[str], str], tuple[float, Block | None]] = {}
        self._lock = threading.Lock()

    def blocks(
        self, task_class: str, models: list[str], needs: frozenset[str] = frozenset()
    ) -> dict[str, Block]:
        """Blocked models among `models` for a job of `task_class` that needs `needs` (a
        model resting for one of them is blocked: "refused tools"). A Redis outage reads
        as: none blocked. Models not seen within the last second are looked at in one
        round trip."""
        import redis

        now = time.monotonic()
        with self._lock:
            cached = {m: self._cache.get((task_class, needs, m)) for m in models}
        stale = [m for m, c in cached.items() if c is None or c[0] < now]
        if stale:
            try:
                fresh = self.state.blocks(task_class, stale, needs=needs)
            except redis.RedisError as exc:
                log.warning("fleet state unreachable: %s", type(exc).__name__)
                return {}
            with self._lock:
                for model in stale:
                    cached[model] = self._cache[(task_class, needs, model)] = (
                        now + self.cache_s,
                        fresh.get(model),
                    )
        return {m: c[1] for m, c in cached.items() if c is not None and c[1] is not None}


_views: dict[tuple[str, int], LiveView] = {}


def live_view(catalog: Catalog, environ: Mapping[str, str] = os.environ) -> LiveView:
    """One view per state URL (and catalog) for this process."""
    url = fleet_urls(environ)[1]
    key = (url, id(catalog))
    if key not in _views:
        _views[key] = LiveView(FleetState(redis_client(url), catalog))
    return _views[key]


def forget_views() -> None:
    """Drop this process's views and what they cached (their Redis went away, or a test
    changed live state behind their back)."""
    _views.clear()
