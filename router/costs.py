"""What an attempt cost, and where the figure came from. Pure arithmetic on the catalog.

A provider-returned cost (OpenRouter's usage.cost) wins over the catalog; a paid model is
billed its catalog price per million tokens (the catalog refuses a paid model without
one, so spend is never silently $0); subscription models are paid by quota, free and
local ones cost nothing.
"""

from __future__ import annotations

from router.catalog import Model
from router.results import Attempt

PER_MTOK = 1_000_000


def attempt_cost(model: Model, attempt: Attempt) -> tuple[float, str]:
    """(USD, source) where source is provider, catalog, subscription or free."""
    if attempt.provider_cost_usd is not None:
        return attempt.provider_cost_usd, "provider"
    if model.tier == "paid":
        return tokens_cost(model, attempt.prompt_tokens, attempt.completion_tokens), "catalog"
    return 0.0, "subscription" if model.tier == "subscription" else "free"


def tokens_cost(model: Model, prompt_tokens: int, completion_tokens: int) -> float:
    return (
        prompt_tokens * model.usd_per_mtok_in + completion_tokens * model.usd_per_mtok_out
    ) / PER_MTOK
