"""A worker process's announcement of what it can serve (workers/state/serving.py): per
queue it consumes, the models of that queue it cannot serve from here, said once a beat
on the state Redis, so that dispatch skips a model no live worker can serve instead of
queueing jobs for it.

Beside the liveness beat, not in it: from a daemon thread of its own, every quarter of
the lapse (FLEET_WORKER_LAPSE_S), each announcement living one lapse. So a state Redis
that is slow or away delays nothing but the announcement (the beat that keeps a worker's
jobs its own runs on the broker's Redis, and must never wait behind this), and a worker
that dies, hangs or loses Redis stops being counted within a lapse, which can only
unblock models. A clean shutdown withdraws the announcement at once.

What it cannot serve comes from the provider registry's own checks (ProviderRegistry.
lacks: the key variable, never its value; a local model's presence, offline, as fleet
doctor decides it), worked out again every RECHECK_S, so a beat costs one small write
and no disk: a key set needs a restart anyway, and a model pulled meanwhile is seen
within RECHECK_S.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis

from router.catalog import Catalog
from workers.providers.registry import ProviderRegistry
from workers.runtime.liveness import BEATS_PER_LAPSE
from workers.state import serving
from workers.state.deliveries import this_process

log = logging.getLogger(__name__)

RECHECK_S = 30.0


class Announcer:
    def __init__(
        self,
        catalog: Catalog,
        queues: list[str],
        client: Any,
        lapse_s: float,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.catalog = catalog
        self.queues = sorted({q for q in queues if any(m.queue == q for m in catalog.models)})
        self.client = client
        self.lapse_ms = int(lapse_s * 1000)
        self.interval_s = lapse_s / BEATS_PER_LAPSE
        self.process = this_process()
        # its checks only: lacks() builds no adapter and no HTTP client
        self.registry = ProviderRegistry(catalog, 1, environ)
        self._lacking: dict[str, dict[str, str]] = {}
        self._checked_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable = False

    def lacking(self) -> dict[str, dict[str, str]]:
        """Per queue consumed, the models of it this process cannot serve, and why."""
        now = time.monotonic()
        if self._checked_at is None or now - self._checked_at >= RECHECK_S:
            found: dict[str, dict[str, str]] = {q: {} for q in self.queues}
            for model in self.catalog.models:
                if model.queue in found:
                    why = self.registry.lacks(model.id)
                    if why is not None:
                        found[model.queue][model.id] = why
            self._lacking, self._checked_at = found, now
        return self._lacking

    def announce(self) -> None:
        """One announcement: one round trip."""
        serving.announce(self.client, self.process, self.lapse_ms, self.lacking())

    def start(self) -> None:
        """Announce now (a worker that says it is ready has announced), then once a beat."""
        if not self.queues or self._thread is not None:
            return
        self._once()
        self._thread = threading.Thread(target=self._run, name="fleet-serving", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop announcing, and withdraw what was said."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 5)
            self._thread = None
        try:
            serving.withdraw(self.client, self.process, self.queues)
        except redis.RedisError as exc:  # it goes at its lapse instead
            log.info("serving: could not withdraw the announcement (%r)", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._once()

    def _once(self) -> None:
        try:
            self.announce()
            self._unreachable = False
        except Exception as exc:  # Redis away, or a check that failed: said once
            if not self._unreachable:
                log.warning("serving: could not announce what this worker serves (%r)", exc)
            self._unreachable = True
