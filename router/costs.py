"""What an attempt cost, and where the figure came from. Pure arithmetic on the catalog,
and the one place that rule lives: live-state budgets and the ledger both use it.

A provider-returned cost (OpenRouter's usage.cost) wins over the catalog; a paid model is
billed its catalog price per million tokens (the catalog refuses a paid model without
one, so spend is never silently $0); subscription models are paid by quota, free and
local ones cost nothing. An orphaned call (its worker died mid-call: workers/runtime/
orphans.py) is priced the same way on its estimated tokens, and its source says
`estimated`.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.catalog import Model
from router.results import Attempt

PER_MTOK = 1_000_000


@dataclass(frozen=True)
class Cost:
    usd: float
    source: str  # provider, catalog, subscription, free, or estimated (an orphaned call)
    usd_per_mtok_in: float | None  # the prices used (None when the provider gave the cost)
    usd_per_mtok_out: float | None


def attempt_cost(model: Model | None, attempt: Attempt) -> Cost:
    """The cost of `attempt` on `model` (None: a model the catalog no longer has, billed
    by the tier the attempt recorded, at no catalog price)."""
    if attempt.provider_cost_usd is not None:
        return Cost(float(attempt.provider_cost_usd), "provider", None, None)
    tier = model.tier if model else attempt.tier
    price_in = model.usd_per_mtok_in if model else 0.0
    price_out = model.usd_per_mtok_out if model else 0.0
    estimated = attempt.outcome == "orphaned"
    if tier == "paid":
        usd = (attempt.prompt_tokens * price_in + attempt.completion_tokens * price_out) / PER_MTOK
        return Cost(usd, "estimated" if estimated else "catalog", price_in, price_out)
    source = "subscription" if tier == "subscription" else "free"
    return Cost(0.0, "estimated" if estimated else source, 0.0, 0.0)
