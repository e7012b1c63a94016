"""The fleet's live state as dispatchers and `fleet route` see it: which models are blocked
now, read from the state Redis through a one-second cache.

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
from typing import Any

from router.catalog import Catalog
from workers.state import Block, FleetState

log = logging.getLogger(__name__)
CACHE_S = 1.0


class LiveView:
    def __init__(self, state: FleetState, cache_s: float = CACHE_S) -> None:
        self.state = state
        self.cache_s = cache_s
        self._cache: dict[tuple[str, str], tuple[float, Block | None]] = {}
        self._lock = threading.Lock()

    def blocks(self, task_class: str, models: list[str]) -> dict[str, Block]:
        """Blocked models among `models` (a Redis outage reads as: none blocked)."""
        import redis

        now = time.monotonic()
        found: dict[str, Block] = {}
        for model in models:
            key = (task_class, model)
            with self._lock:
                cached = self._cache.get(key)
            if cached is None or cached[0] < now:
                try:
                    block = self.state.block(task_class, model)
                except redis.RedisError as exc:
                    log.warning("fleet state unreachable: %s", type(exc).__name__)
                    return {}
                cached = (now + self.cache_s, block)
                with self._lock:
                    self._cache[key] = cached
            if cached[1] is not None:
                found[model] = cached[1]
        return found


_views: dict[str, LiveView] = {}


def live_view(catalog: Catalog, environ: Mapping[str, str] = os.environ) -> LiveView:
    """One view per state URL (and catalog) for this process."""
    import redis

    from workers.config import fleet_urls

    url = fleet_urls(environ)[1]
    key = f"{url}|{id(catalog)}"
    if key not in _views:
        client: Any = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        _views[key] = LiveView(FleetState(client, catalog))
    return _views[key]
