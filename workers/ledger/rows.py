"""A finished job's ledger rows (one per attempt, with its cost by router/costs.py), an
orphaned call's row, and their JSON form on the spool."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from router.catalog import Catalog
from router.costs import attempt_cost
from router.results import Attempt, Result
from workers.ledger.schema import COLUMNS, TIMESTAMPS


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def rows_for(result: Result, job: Mapping[str, Any], catalog: Catalog) -> list[dict[str, Any]]:
    """The ledger rows of a finished job: one per attempt (skipped ones included)."""
    recorded = datetime.now(UTC)
    of = {**job, "id": result.job_id, "task_class": result.task_class, "source": result.source}
    return [attempt_row(a, of, catalog, recorded) for a in result.attempts]


def attempt_row(
    a: Attempt, job: Mapping[str, Any], catalog: Catalog, recorded: datetime | None = None
) -> dict[str, Any]:
    """One attempt's ledger row, with its cost (router/costs.py): an attempt of a finished
    job's Result, or an orphaned call a redelivery bills (workers/runtime/orphans.py)."""
    model = catalog.by_id.get(a.model)
    cost = attempt_cost(model, a)
    return {
        "job_id": str(job.get("id", "")),
        "attempt": a.number,
        "task_class": str(job.get("task_class", "")),
        "source": str(job.get("source", "app")),
        "focus": job.get("focus"),
        "profile": job.get("profile"),
        "model": a.model,
        "provider": a.model.split("/", 1)[0],
        "queue": a.queue,
        "tier": model.tier if model else a.tier,
        "outcome": a.outcome,
        "error_kind": a.error_kind,
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "tokens_estimated": a.tokens_estimated,
        "cost_usd": cost.usd,
        "cost_source": cost.source,
        "usd_per_mtok_in": cost.usd_per_mtok_in,
        "usd_per_mtok_out": cost.usd_per_mtok_out,
        "latency_ms": a.latency_ms,
        "worker": a.worker,
        "started_at": _utc(a.started_at),
        "finished_at": _utc(a.started_at + a.latency_ms / 1000),
        "recorded_at": recorded or datetime.now(UTC),
        "app": job.get("app"),
        "tools": a.tools,
        "json_schema": a.json_schema,
        "items": a.items,
        "cached_items": a.cached_items,
        "cached_tokens": a.cached_tokens,
    }


def encode_rows(rows: list[dict[str, Any]]) -> str:
    """A spool entry: one job's rows as JSON."""

    def plain(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}

    return json.dumps({"rows": [plain(r) for r in rows]}, separators=(",", ":"))


def decode_rows(entry: str | bytes) -> list[dict[str, Any]]:
    rows = json.loads(entry)["rows"]
    for row in rows:
        for key in TIMESTAMPS:
            row[key] = datetime.fromisoformat(row[key])
    return [{k: row.get(k) for k in COLUMNS} for row in rows]
