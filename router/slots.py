"""Why a model cannot take a job now, and when a blocked chain may go on.

One rule, used by the dispatcher (which queue a job starts in) and by a delivery (how
long a job whose every model is blocked waits): wait for the model that frees up first,
if that happens before the job's deadline and within the policy's `max_wait_s`;
otherwise the job fails now, with every model's reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Block:
    """Why a model cannot take a job now, and when it may (None: not before a human acts)."""

    reason: str
    until: float | None = None  # unix seconds


def horizon(now: float, max_wait_s: float, deadline: datetime | None) -> float:
    """The latest moment a blocked job may still wait for (unix seconds)."""
    limit = now + max_wait_s
    return limit if deadline is None else min(limit, deadline.timestamp())


def earliest(blocks: Mapping[str, Block], until: float) -> tuple[float, str] | None:
    """(when, model) of the blocked model that frees up first, no later than `until`;
    None when none does. Ties go to the model met first (the chain's order)."""
    soon = [(b.until, model) for model, b in blocks.items() if b.until is not None]
    soon = [pair for pair in soon if pair[0] <= until]
    return min(soon, key=lambda pair: pair[0]) if soon else None
