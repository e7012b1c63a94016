"""`fleet usage`: what the ledger says was spent, per group, and what was saved.

Its figures are the query layer's (workers/ledger/query.py), the dashboard's too: a job
counts once, in the group of its final attempt; the saving of a group is what its tokens
would have cost on the paid primary (`litellm/kimi`, at the catalog's prices; embedding
tokens on `openai/text-embedding-3-small`) minus what they did cost; days are UTC.

Orphaned calls (in flight when their worker died: workers/runtime/orphans.py) count in
every figure like any call, on their estimated tokens and cost, and are also shown apart:
how many, and their estimated cost.

Embedding jobs add the cache's figures (query.py): the inputs answered from the cache and
embedded, the hit rate and the prompt tokens saved, as columns when the window holds any,
with a line saying what those tokens would have cost (on their models, and on the paid
embedding model). --json carries them always.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from router.catalog import Catalog
from router.errors import ConfigError
from workers.ledger.filters import (
    EMBEDDING_REFERENCE_MODEL,
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
    "embedded_items",
    "cached_items",
    "cache_hit_rate",  # None in a group without either
    "cached_tokens",
    "cache_saved_usd",
    "cache_saved_vs_reference_usd",
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
    embeds = _embeds(report.total)
    if embeds:  # two references: the line below the table names them
        heads[-1] = "saving $"
    if embeds:
        heads += ["cache hits", "embedded", "hit rate", "tokens saved"]
    table.add_column(report.by, footer="total")
    for head, foot in zip(heads, _cells(report.total, embeds), strict=True):
        table.add_column(head, footer=foot, justify="right")
    for row in report.rows:
        table.add_row(str(row[report.by]), *_cells(row, embeds))
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)
    if report.total["orphaned"]:
        print(orphaned_line(report.total))
    if embeds:
        print(cache_line(report.total))
        print(
            f"saving: against {REFERENCE_MODEL}'s prices, embedding tokens against"
            f" {EMBEDDING_REFERENCE_MODEL}'s"
        )


def orphaned_line(total: dict[str, Any]) -> str:
    """The orphaned calls among the attempts above, with their cost, labelled estimated."""
    return (
        f"orphaned calls (in flight when their worker died; included above): {total['orphaned']:,},"
        f" estimated cost ${total['orphaned_cost_usd']:.6f} (tokens and cost estimated)"
    )


def cache_line(total: dict[str, Any]) -> str:
    """What the prompt tokens the embedding cache saved would have cost: on their own
    models (nothing on a local, free or subscription one), and on the paid embedding
    model the saving is measured against."""
    return (
        f"embedding cache: {total['cached_tokens']:,} prompt tokens saved:"
        f" ${total['cache_saved_usd']:.6f} at their models' prices (nothing on local, free and"
        f" subscription models), ${total['cache_saved_vs_reference_usd']:.6f} at"
        f" {EMBEDDING_REFERENCE_MODEL}'s price"
    )


def _embeds(row: dict[str, Any]) -> bool:
    return bool(row["embedded_items"] or row["cached_items"])


def _cells(row: dict[str, Any], embeds: bool = False) -> list[str]:
    cells = [
        f"{row['attempts']:,}",
        f"{row['jobs']:,}",
        f"{row['prompt_tokens']:,}",
        f"{row['completion_tokens']:,}",
        f"{row['cost_usd']:.6f}",
        f"{row['saving_usd']:.6f}",
    ]
    if embeds:
        if _embeds(row):
            rate = f"{row['cache_hit_rate'] * 100:.1f}%"
            counts = (row["cached_items"], row["embedded_items"])
            cells += [*(f"{n:,}" for n in counts), rate, f"{row['cached_tokens']:,}"]
        else:
            cells += ["–"] * 4  # a group without embeddings (a chat model's)
    return cells
