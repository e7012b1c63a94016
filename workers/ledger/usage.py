"""`fleet usage`: what the ledger says was spent, per group, and what was saved.

The saving of a group is what its tokens would have cost on the paid primary
(`litellm/kimi`, at the catalog's prices) minus what they did cost.

Orphaned calls (in flight when their worker died: workers/runtime/orphans.py) count in
every figure like any call, on their estimated tokens and cost, and are also shown apart:
how many, and their estimated cost.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from router.catalog import Catalog
from router.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

    from workers.ledger.store import Ledger

GROUPS: tuple[str, ...] = (
    "model",
    "provider",
    "tier",
    "queue",
    "task_class",
    "source",
    "app",
    "day",
)
REFERENCE_MODEL = "litellm/kimi"
REFERENCE_PRICES: tuple[float, float] = (
    0.56,
    2.94,
)  # $/1M tokens in, out: when the catalog has no litellm/kimi
DIGITS = 9  # USD figures are rounded to a billionth of a dollar

_AGE = re.compile(r"^(\d+)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
SINCE_HELP = "an age like 30m, 24h, 7d (units s, m, h, d, w) or a UTC date like 2025-01-31"


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """The UTC instant `text` names: an age back from now, or a date/time (UTC if naive)."""
    now = now or datetime.now(UTC)
    value = text.strip()
    age = _AGE.match(value)
    if age:
        return now - timedelta(seconds=int(age.group(1)) * _UNIT_S[age.group(2)])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is neither an age nor a date: give {SINCE_HELP}") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


Prices = tuple[float, float]


def reference_prices(catalog: Catalog | None) -> Prices:
    model = catalog.by_id.get(REFERENCE_MODEL) if catalog else None
    return (model.usd_per_mtok_in, model.usd_per_mtok_out) if model else REFERENCE_PRICES


@dataclass(frozen=True)
class Report:
    by: str
    since: datetime
    rows: list[dict[str, Any]]  # one per group
    total: dict[str, Any]  # the same keys, `by` = "total"; jobs counted once across groups


def _group_key(ledger: Ledger, by: str) -> ColumnElement[Any]:
    from sqlalchemy import func

    from workers.ledger.schema import attempts

    if by != "day":
        return attempts.c[by]
    if ledger.dialect == "postgresql":
        return func.to_char(func.timezone("UTC", attempts.c.started_at), "YYYY-MM-DD")
    return func.date(attempts.c.started_at)


def _figures(
    attempts_: Any,
    jobs: Any,
    tokens_in: Any,
    tokens_out: Any,
    cost: Any,
    orphaned: Any,
    orphaned_cost: Any,
    *,
    prices: Prices,
) -> dict[str, Any]:
    tokens_in, tokens_out, cost = int(tokens_in or 0), int(tokens_out or 0), float(cost or 0)
    reference = (tokens_in * prices[0] + tokens_out * prices[1]) / 1e6
    return {
        "attempts": int(attempts_ or 0),
        "jobs": int(jobs or 0),
        "prompt_tokens": tokens_in,
        "completion_tokens": tokens_out,
        "cost_usd": round(cost, DIGITS),
        "saving_usd": round(reference - cost, DIGITS),
        "orphaned": int(orphaned or 0),
        "orphaned_cost_usd": round(float(orphaned_cost or 0), DIGITS),  # estimated
    }


def usage_report(
    ledger: Ledger, since: datetime, by: str = "model", catalog: Catalog | None = None
) -> Report:
    """Per-group attempts, jobs, tokens, cost and saving of the attempts started since."""
    from sqlalchemy import case, distinct, func, select

    from workers.ledger.schema import attempts

    if by not in GROUPS:
        raise ConfigError(f"unknown --by {by!r} (valid: {', '.join(GROUPS)})")
    prices = reference_prices(catalog)
    orphaned = attempts.c.outcome == "orphaned"
    measures = (
        func.count(),
        func.count(distinct(attempts.c.job_id)),
        func.sum(attempts.c.prompt_tokens),
        func.sum(attempts.c.completion_tokens),
        func.sum(attempts.c.cost_usd),
        func.sum(case((orphaned, 1), else_=0)),
        func.sum(case((orphaned, attempts.c.cost_usd), else_=0.0)),
    )
    recent = attempts.c.started_at >= since
    key = _group_key(ledger, by).label("key")
    ledger.ensure_schema()
    with ledger.engine.connect() as conn:
        grouped = conn.execute(select(key, *measures).where(recent).group_by(key)).all()
        overall = conn.execute(select(*measures).where(recent)).one()
    rows = [{by: row[0], **_figures(*row[1:], prices=prices)} for row in grouped]
    if by == "day":
        rows.sort(key=lambda r: str(r[by]))
    else:
        rows.sort(key=lambda r: (-r["cost_usd"], -r["attempts"], str(r[by])))
    return Report(by, since, rows, {by: "total", **_figures(*overall, prices=prices)})


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"usage since {report.since:%Y-%m-%d %H:%M} UTC by {report.by}"
    if not report.rows:
        print(f"{title}: no attempts in the ledger")
        return
    table = Table(title=title, title_justify="left", show_footer=True)
    heads = [
        "attempts",
        "jobs",
        "tokens in",
        "tokens out",
        "cost $",
        f"saving $ vs {REFERENCE_MODEL}",
    ]
    table.add_column(report.by, footer="total")
    for head, foot in zip(heads, _cells(report.total), strict=True):
        table.add_column(head, footer=foot, justify="right")
    for row in report.rows:
        table.add_row(str(row[report.by]), *_cells(row))
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)
    if report.total["orphaned"]:
        print(orphaned_line(report.total))


def orphaned_line(total: dict[str, Any]) -> str:
    """The orphaned calls among the attempts above, with their cost, labelled estimated."""
    return (
        f"orphaned calls (in flight when their worker died; included above): {total['orphaned']:,},"
        f" estimated cost ${total['orphaned_cost_usd']:.6f} (tokens and cost estimated)"
    )


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        f"{row['attempts']:,}",
        f"{row['jobs']:,}",
        f"{row['prompt_tokens']:,}",
        f"{row['completion_tokens']:,}",
        f"{row['cost_usd']:.6f}",
        f"{row['saving_usd']:.6f}",
    ]
