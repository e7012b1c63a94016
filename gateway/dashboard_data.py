"""What the dashboard shows, as plain data: the filters a query string names, the ledger's
figures for them (workers/ledger/query.py, the one query layer `fleet usage` reads too),
the fleet's live state, and the geometry of the page's inline SVG charts.

Nothing here speaks HTTP (gateway/dashboard.py does) or renders HTML (the templates do).
Every call is blocking: the routes run it in the gateway's threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from router.catalog import QUEUES, TASK_CLASSES, TIERS, Catalog
from workers.ledger.filters import SINCE_HELP, Filters, parse_since
from workers.ledger.query import PAGE_GROUPS, Usage
from workers.ledger.store import Ledger
from workers.ledger.usage import GROUPS, usage_report
from workers.state import deadletter
from workers.state.limits import FleetState

PRESETS = ("24h", "7d", "30d")
DEFAULT_SINCE = "7d"
PARAMS = ("since", "until", "from", "to", "class", "app", "model", "by")
TIER_COLOURS = {
    "local": "#4c9f70",
    "free": "#7cb5ec",
    "subscription": "#f7a35c",
    "paid": "#d9534f",
}
WORKERS_TIMEOUT_S = 0.5  # Celery's inspect broadcast waits this long for the workers...
WORKERS_CACHE_S = 15.0  # ...so its answer is kept this long: one broadcast per 15 s at most


class BadFilter(ValueError):
    """A query parameter the dashboard cannot take: one line naming the valid choices."""


@dataclass(frozen=True)
class View:
    """One request's question: its filters, how the API groups, and the query string that
    names it (for the page's links)."""

    filters: Filters
    by: str
    label: str  # the window in words, UTC
    query: dict[str, str]  # the parameters given, as given (valid ones only)


def _one(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    return value.strip() if value is not None and value.strip() else None


def _when(name: str, text: str) -> datetime:
    try:
        return parse_since(text)
    except ValueError:
        raise BadFilter(f"{name}={text[:40]!r} is not valid: give {SINCE_HELP}") from None


def _day(name: str, text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise BadFilter(f"{name}={text[:40]!r} is not a UTC date (valid: YYYY-MM-DD)") from None


def _window(params: Mapping[str, str]) -> tuple[datetime | None, datetime | None, str]:
    first, last = _one(params, "from"), _one(params, "to")
    if first or last:
        start = _day("from", first or last or "")
        end = _day("to", last or first or "")
        if end < start:
            raise BadFilter(f"to={end} is before from={start} (give from <= to, UTC dates)")
        days = Filters.days(start, end)
        label = f"{start} to {end} (UTC days, both included)"
        return days.since, days.until, label
    since_text = _one(params, "since") or DEFAULT_SINCE
    since = _when("since", since_text)
    until_text = _one(params, "until")
    until = _when("until", until_text) if until_text else None
    if until is not None and until <= since:
        raise BadFilter(f"until={until_text} is not after since={since_text}")
    label = f"since {since:%Y-%m-%d %H:%M} UTC" + (
        f" until {until:%Y-%m-%d %H:%M} UTC" if until else ""
    )
    if since_text in PRESETS and until is None:
        label = f"last {since_text} ({label})"
    return since, until, label


def parse_view(params: Mapping[str, str], catalog: Catalog, app: str | None) -> View:
    """The View a query string names; BadFilter naming the valid choices for a bad value.
    `app`: the only app the viewer may see (None: any, for an admin)."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise BadFilter(f"unknown parameter {unknown[0]!r} (valid: {', '.join(PARAMS)})")
    since, until, label = _window(params)
    task_class = _one(params, "class")
    if task_class is not None and task_class not in TASK_CLASSES:
        raise BadFilter(
            f"class={task_class[:40]!r} is not a task class (valid: {', '.join(TASK_CLASSES)})"
        )
    model = _one(params, "model")
    if model is not None and model not in catalog.by_id:
        valid = ", ".join(m.id for m in catalog.models)
        raise BadFilter(f"model={model[:60]!r} is not a catalog model (valid: {valid})")
    by = _one(params, "by") or "model"
    if by not in GROUPS:
        raise BadFilter(f"by={by[:40]!r} is not a group (valid: {', '.join(GROUPS)})")
    wanted = _one(params, "app")
    if app is not None and wanted not in (None, app):
        raise PermissionError(f"this key sees only app {app!r}, not {wanted[:64]!r}")
    filters = Filters(since, until, task_class, app or wanted, model)
    query = {k: v for k in PARAMS if (v := _one(params, k)) is not None}
    return View(filters, by, label, query)


# --- the ledger's figures ----------------------------------------------------------------


def api_usage(ledger: Ledger, view: View, catalog: Catalog) -> dict[str, Any]:
    """/api/usage: `fleet usage --json`'s rows for the same filters, with their total."""
    f = view.filters
    assert f.since is not None  # every View has a start
    report = usage_report(ledger, f.since, view.by, catalog, f)
    return {
        "by": report.by,
        "since": f.since.isoformat(),
        "until": f.until.isoformat() if f.until else None,
        "filters": {"class": f.task_class, "app": f.app, "model": f.model},
        "rows": report.rows,
        "total": report.total,
    }


def ledger_figures(ledger: Ledger, view: View, catalog: Catalog) -> dict[str, Any]:
    """The query layer's page() for the view, and the daily spend chart drawn from it."""
    page = Usage(ledger, view.filters, catalog).page()
    page["groups"] = PAGE_GROUPS
    page["days"] = daily_chart(page["by_day_and_tier"], view.filters)
    for key in PAGE_GROUPS:
        rows = page[f"by_{key}"]
        top = max((r["cost_usd"] for r in rows), default=0.0)
        for row in rows:
            row["bar"] = row["cost_usd"] / top if top > 0 else 0.0
    return page


def _days_between(since: datetime, until: datetime) -> list[str]:
    first, last = since.date(), (until - timedelta(microseconds=1)).date()
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


MAX_CHART_DAYS = 92


def daily_chart(rows: Sequence[Mapping[str, Any]], filters: Filters) -> dict[str, Any]:
    """Spend per UTC day stacked by tier, as bars to draw: every day of the window (up to
    MAX_CHART_DAYS, else only the days with spend), each with its tiers' segments."""
    spend: dict[str, dict[str, float]] = {}
    for row in rows:
        spend.setdefault(row["day"], {})[row["tier"]] = row["cost_usd"]
    days = sorted(spend)
    if filters.since is not None:
        every = _days_between(filters.since, filters.until or datetime.now(UTC))
        if len(every) <= MAX_CHART_DAYS:
            days = sorted(set(every) | set(spend))
    tiers = [t for t in TIERS if any(t in s for s in spend.values())] or list(TIERS)
    totals = {d: sum(spend.get(d, {}).values()) for d in days}
    top = max(totals.values(), default=0.0)
    width, height = 720, 180
    slot = width / max(len(days), 1)
    bars = []
    for i, day in enumerate(days):
        y = float(height)
        segments = []
        for tier in TIERS:
            usd = spend.get(day, {}).get(tier, 0.0)
            if usd <= 0 or top <= 0:
                continue
            h = usd / top * height
            y -= h
            segments.append(
                {"tier": tier, "usd": usd, "y": y, "h": h, "colour": TIER_COLOURS[tier]}
            )
        bars.append(
            {
                "day": day,
                "x": i * slot + slot * 0.1,
                "w": slot * 0.8,
                "segments": segments,
                "total": totals[day],
            }
        )
    table = [{"day": d, "tiers": spend.get(d, {}), "total": totals[d]} for d in days]
    return {
        "width": width,
        "height": height,
        "top": top,
        "bars": bars,
        "tiers": tiers,
        "table": table,
        "colours": TIER_COLOURS,
    }


# --- the live state ----------------------------------------------------------------------


class WorkersCache:
    """Which workers consume each queue, from Celery's inspect broadcast (it waits its whole
    timeout for replies), asked at most once per WORKERS_CACHE_S per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = 0.0
        self._found: dict[str, list[str]] = {}

    def get(self, app: Any) -> tuple[dict[str, list[str]], float]:
        with self._lock:
            if time.monotonic() - self._at >= WORKERS_CACHE_S:
                found: dict[str, list[str]] = {q: [] for q in QUEUES}
                replies = app.control.inspect(timeout=WORKERS_TIMEOUT_S).active_queues() or {}
                for worker, queues in sorted(replies.items()):
                    for queue in queues:
                        found.setdefault(queue["name"], []).append(worker)
                self._found, self._at = found, time.monotonic()
            return self._found, time.time() - (time.monotonic() - self._at)


def live_state(
    state: FleetState, catalog: Catalog, celery: Any, workers: WorkersCache, app: str | None
) -> dict[str, Any]:
    """Models (cooldown, circuit, windows, quota against its reserve), budgets, queues and
    their workers, dead letters. For one app's viewer (`app`), only what is not another
    app's: no other app's budget and no dead letters (they hold other apps' jobs)."""
    from workers.runtime.celery_app import queue_depths

    reserve = catalog.policy.quota_reserve
    models = []
    for model in catalog.models:
        found = state.model_status(model.id)
        windows = [
            {
                "window": name,
                "used": w["used"],
                "limit": w["limit"],
                "share": w["used"] / w["limit"] if w["limit"] else 0.0,
                "reserve_from": w["limit"] * (1 - reserve),
            }
            for name, w in sorted(found["windows"].items())
        ]
        models.append({**found, "tier": model.tier, "windows": windows})
    budgets = [
        {**b, "share": b["spent_usd"] / b["cap_usd"] if b["cap_usd"] else 0.0}
        for b in state.budget_status()
        if app is None or b["scope"] != "app" or b["name"] == app
    ]
    depths = queue_depths(celery)
    consumers, asked_at = workers.get(celery)
    queues = [{"queue": q, "waiting": depths[q], "workers": consumers.get(q, [])} for q in QUEUES]
    dead = None if app is not None else deadletter.summary(state.redis, catalog.policy.dead_letters)
    return {
        "models": models,
        "reserve": reserve,
        "reserve_for": sorted(catalog.policy.quota_reserve_for),
        "budgets": budgets,
        "queues": queues,
        "workers_asked_at": datetime.fromtimestamp(asked_at, UTC).strftime("%H:%M:%S"),
        "dead_letters": dead,
    }
