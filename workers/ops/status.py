"""`fleet status`: per queue, jobs waiting and the workers consuming it; per model, its
cooldown, circuit, limit windows and spend; per beat entry, whether it is failing; per
task class, the dead letters held and those its retention took out. Read from the
fleet's Redis."""

from __future__ import annotations

from typing import Any

from router.catalog import QUEUES, Catalog
from workers.runtime.celery_app import queue_depths
from workers.state import beathealth, deadletter
from workers.state.limits import FleetState


def queue_status(app: Any, timeout_s: float = 1.0) -> list[dict[str, Any]]:
    """Messages waiting per queue (any broker kombu speaks) and who consumes each."""
    consumers: dict[str, list[str]] = {q: [] for q in QUEUES}
    replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
    for worker, queues in sorted(replies.items()):
        for queue in queues:
            consumers.setdefault(queue["name"], []).append(worker)
    depths = queue_depths(app)
    return [
        {"queue": queue, "waiting": depths[queue], "workers": consumers[queue]} for queue in QUEUES
    ]


def model_status(state: FleetState, catalog: Catalog) -> list[dict[str, Any]]:
    return [state.model_status(model.id) for model in catalog.models]


def dead_letter_status(state: FleetState, catalog: Catalog) -> list[dict[str, Any]]:
    """Per task class: dead letters held and trimmed, after applying its retention (so
    that a class that filed nothing lately shows none past its age)."""
    policy = catalog.policy.dead_letters
    deadletter.trim(state.redis, policy)
    return deadletter.summary(state.redis, policy)


def fleet_status(app: Any, state: FleetState, catalog: Catalog) -> dict[str, Any]:
    return {
        "queues": queue_status(app),
        "models": model_status(state, catalog),
        "beat": beathealth.entries(state.redis),
        "dead_letters": dead_letter_status(state, catalog),
    }
