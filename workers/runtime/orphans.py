"""Billing the calls a job's earlier deliveries left in flight when their workers died.

A delivery's first round trip (begin.lua) returns the marks that earlier deliveries of
its message left (workers/state/inflight.py): each is a call that may have reached the
provider, and been billed by it, whose outcome nobody recorded. Each becomes one ledger
row with outcome `orphaned`:

- its tokens estimated (tokens_estimated): the prompt as the router estimated it (biased
  high, router/tokens.py) and, for the completion, the request's max_tokens, or
  ORPHAN_COMPLETION_TOKENS when it set none: the most the provider may have produced;
- its cost priced like any attempt's, on those tokens (router/costs.py), with
  cost_source `estimated`; it is also added to the model's live spend and token windows,
  so budgets count it;
- numbered ORPHAN_ATTEMPTS_FROM + 10 x message + delivery (the job's message, `sends`,
  and which delivery of it made the call: 1 to MAX_DELIVERIES = 10, the next is always
  poisoned and calls nothing, so message m's numbers end below message m + 1's).
  A job's own attempts are numbered 1, 2, ... in the order tried, far below 1000, so the
  ledger's key (job_id, attempt) keeps the orphan beside the redelivered run's rows, and
  no two orphans of a job share a number.

An orphaned call is in no Result: the job's Result lists the attempts its messages
recorded; the ledger holds those and its orphans.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from router.catalog import Catalog
from router.costs import attempt_cost
from router.travel import Attempt, TravellingState
from workers.ledger.rows import attempt_row, encode_rows
from workers.runtime.step import Gate
from workers.state import inflight
from workers.state.inflight import Orphan

log = logging.getLogger(__name__)

ORPHAN_ATTEMPTS_FROM = 1000
# The completion an orphaned call is billed for when its request named no max_tokens (the
# gateway holds such a request to the same bound).
ORPHAN_COMPLETION_TOKENS = 4096


def number(orphan: Orphan) -> int:
    """An orphaned call's attempt number (see the module's docstring)."""
    return ORPHAN_ATTEMPTS_FROM + 10 * orphan.sends + orphan.delivery


def delivery_of(attempt: int) -> tuple[int, int]:
    """The (message, delivery) an orphaned call's attempt number names: `number`'s
    inverse (deliveries count from 1 to MAX_DELIVERIES = 10)."""
    message, delivery = divmod(attempt - ORPHAN_ATTEMPTS_FROM - 1, 10)
    return message, delivery + 1


def orphaned_attempt(orphan: Orphan, max_tokens: int | None) -> Attempt:
    return Attempt(
        number=number(orphan),
        model=orphan.model,
        queue=orphan.queue,
        tier=orphan.tier,
        outcome="orphaned",
        error_kind="worker_lost",
        error="its worker died during the call: tokens and cost estimated",
        prompt_tokens=orphan.prompt_tokens,
        completion_tokens=max_tokens or ORPHAN_COMPLETION_TOKENS,
        tokens_estimated=True,
        worker=orphan.worker,
        started_at=orphan.marked_at,
    )


def bill(
    redis: Any,
    gate: Gate,
    catalog: Catalog,
    job: Mapping[str, Any],
    state: TravellingState | None,
    found: Sequence[Orphan],
) -> list[Attempt]:
    """Write `found` to the ledger (through its spool) and clear their marks, atomically;
    then count their estimated spend. The attempts billed here."""
    max_tokens = (state.max_tokens if state is not None else None) or job.get("max_tokens")
    attempts = {o.field: orphaned_attempt(o, max_tokens) for o in found}
    entries = [(o, encode_rows([attempt_row(attempts[o.field], job, catalog)])) for o in found]
    try:
        billed = inflight.bill_orphans(redis, str(job["id"]), entries)
    except Exception as exc:  # Redis away: the marks stay for the next delivery to bill
        log.warning("job %s: orphaned calls not billed yet (%r)", job["id"], exc)
        return []
    for orphan in billed:
        attempt = attempts[orphan.field]
        cost = attempt_cost(catalog.by_id.get(attempt.model), attempt)
        gate.settle(attempt.model, attempt, cost.usd, False)
        log.warning(
            "job %s: a call to %s (delivery %d of message %d) was in flight when its worker"
            " died: billed as orphaned, estimated $%.6f",
            job["id"],
            attempt.model,
            orphan.delivery,
            orphan.sends,
            cost.usd,
        )
    return [attempts[o.field] for o in billed]
