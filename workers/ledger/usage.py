"""`fleet usage`: what the ledger says was spent, per group, and what was saved.

Its figures are the query layer's (workers/ledger/query.py), the dashboard's too: a job
counts once, in the group of its final attempt; the saving of a group is what its tokens
would have cost on the paid primary (`litellm/kimi`, at the catalog's prices) minus what
they did cost; days are UTC.

Orphaned calls (in flight when their worker died: workers/runtime/orphans.py) count in
every figure like any call, on their estimated tokens and cost, and are also shown apart:
how many, and their estimated cost.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from router.catalog import Catalog
from router.errors import ConfigError
from workers.ledger.filters import (
    REFERENCE_MODEL,
    REFERENCE_PRICES,
    SINCE_HELP,
    Filters,
    parse_since,
    reference_prices,
)

if TYPE_CHECKING:
    from workers.ledger.store import Ledger

__all__ = [
    "GROUPS",
    "REFERENCE_MODEL",
    "REFERENCE_PRICES",
    "SINCE_HELP",
    "Report",
    "parse_since",
    "print_report",
    "reference_prices",
    "usage_report",
]

GROUPS: tuple[str, ...] = (
    "model",
    "provider",
    "tier",
    "queue",
    "task_class",
    "source",
    "app",
    "focus",
    "profile",
    "outcome",
    "error_kind",
    "day",
    "hour",
)
# The figures of a group that `fleet usage` shows (--json: these keys and the group's).
REPORTED = (
    "attempts",
    "jobs",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "saving_usd",
    "orphaned",
    "orphaned_cost_usd",
)


@dataclass(frozen=True)
class Report:
    by: str
    since: datetime
    rows: list[dict[str, Any]]  # one per group
    total: dict[str, Any]  # the same keys, `by` = "total"; the sum of the groups
    until: datetime | None = None


def usage_report(
    ledger: Ledger,
    since: datetime,
    by: str = "model",
    catalog: Catalog | None = None,
    filters: Filters | None = None,
) -> Report:
    """Per-group attempts, jobs, tokens, cost and saving of the attempts started since
    (and matching `filters`' until, class, app and model, when given)."""
    from workers.ledger.query import Usage

    if by not in GROUPS:
        raise ConfigError(f"unknown --by {by!r} (valid: {', '.join(GROUPS)})")
    base = filters or Filters()
    window = Filters(since, base.until, base.task_class, base.app, base.model)
    usage = Usage(ledger, window, catalog)
    rows = [{by: row[by], **{k: row[k] for k in REPORTED}} for row in usage.by(by)]
    totals = usage.totals()
    total = {by: "total", **{k: totals[k] for k in REPORTED}}
    return Report(by, window.since or since, rows, total, window.until)


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    until = f" until {report.until:%Y-%m-%d %H:%M}" if report.until else ""
    title = f"usage since {report.since:%Y-%m-%d %H:%M}{until} UTC by {report.by}"
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
