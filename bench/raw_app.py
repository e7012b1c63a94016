"""Raw Celery, the yardstick: the fleet's own Celery settings (broker, result backend,
JSON, late acks, events, prefetch 1) with none of the fleet's logic.

    celery -A bench.raw_app worker -Q raw -P threads -c N

Tasks:
    bench.noop(**kwargs)      does nothing (the enqueue benchmark sends it, no worker runs it)
    bench.raw_call(job, model)
                              one POST to $BENCH_SIM_URL/chat/completions with httpx, as a
                              plain Celery user would write it: one client per process, its
                              pool sized to the worker's concurrency; returns text and usage
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import httpx
from celery import Celery
from celery.signals import worker_init
from kombu.entity import Exchange, Queue

from workers.runtime.celery_app import celery_settings

RAW_QUEUE = "raw"
NOOP = "bench.noop"
RAW_CALL = "bench.raw_call"
TRIES = 3  # per call, on a transport error (the fleet would escalate instead)

_lock = threading.Lock()
_process: dict[str, Any] = {}


@worker_init.connect
def _remember_concurrency(sender: Any = None, **_: Any) -> None:
    _process["concurrency"] = getattr(sender, "concurrency", None) or 10


def _client() -> httpx.Client:
    with _lock:
        if "client" not in _process:
            size = int(_process.get("concurrency") or 10)
            _process["client"] = httpx.Client(
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                timeout=httpx.Timeout(30.0),
            )
        return _process["client"]


def noop(**kwargs: Any) -> None:
    return None


def raw_call(job: dict[str, Any], model: str) -> dict[str, Any]:
    url = os.environ["BENCH_SIM_URL"].rstrip("/") + "/chat/completions"
    for attempt in range(TRIES):  # httpx's one pool, shared by ~1,000 threads, now and
        try:  # then hands a thread a connection another one just closed
            response = _client().post(
                url,
                json={"model": model, "messages": job["messages"]},
                headers={"Authorization": "Bearer sim-placeholder-key"},
            )
            break
        except httpx.TransportError:
            _process["transport_errors"] = _process.get("transport_errors", 0) + 1
            if attempt == TRIES - 1:
                raise
    response.raise_for_status()
    body = response.json()
    return {"text": body["choices"][0]["message"]["content"], "usage": body.get("usage")}


def create_app(environ: Mapping[str, str] = os.environ) -> Celery:
    app = Celery("bench-raw", set_as_current=False)
    settings = celery_settings(environ)
    settings.pop("beat_schedule", None)
    queue = Queue(RAW_QUEUE, Exchange(RAW_QUEUE, type="direct"), routing_key=RAW_QUEUE)
    settings["task_queues"] = [*settings["task_queues"], queue]
    app.conf.update(settings)
    app.task(name=NOOP)(noop)
    app.task(name=RAW_CALL)(raw_call)
    return app


_apps: dict[str, Celery] = {}


def get_raw_app() -> Celery:
    url = os.environ.get("FLEET_BROKER_URL", "")
    if url not in _apps:
        _apps.clear()
        _apps[url] = create_app()
    return _apps[url]


def __getattr__(name: str) -> Any:
    if name == "app":  # `celery -A bench.raw_app`
        return get_raw_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
