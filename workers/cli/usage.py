"""`fleet usage`: tokens, cost and saving per model (or other group), read from the ledger
through its query layer (workers/ledger/query.py), the one the dashboard reads."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime

from router.catalog import load_catalog
from workers.cli.connection import broker_env
from workers.cli.options import Subcommands, add_json_option
from workers.cli.output import print_json

JSON_HELP = (
    "a JSON list, one object per group with keys <by>, attempts, jobs, prompt_tokens,"
    " completion_tokens, cost_usd, saving_usd, orphaned (calls in flight when their worker"
    " died, counted in the others), orphaned_cost_usd (their estimated cost), and of the"
    " embedding cache, over the answers: embedded_items, cached_items, cache_hit_rate"
    " (null without either), cached_tokens (prompt tokens saved), cache_saved_usd (their"
    " price on their models), cache_saved_vs_reference_usd; no total row (sum the groups:"
    " a job counts once, in the group of its final attempt)"
)


def add_usage(commands: Subcommands) -> None:
    from workers.ledger.usage import GROUPS, REFERENCE_MODEL, SINCE_HELP, parse_since

    def since(text: str) -> datetime:
        try:
            return parse_since(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    p = commands.add_parser(
        "usage",
        help="tokens, cost and saving per model (or other group), from the ledger",
        description=f"Reads the ledger (FLEET_LEDGER_URL, or ledger.db in the data dir). The"
        f" saving is what the same tokens would cost on {REFERENCE_MODEL} minus what they cost."
        " Embedding jobs add the cache's hits, hit rate and prompt tokens saved.",
    )
    p.add_argument("--since", type=since, default="24h", help=f"{SINCE_HELP} (default 24h)")
    p.add_argument("--until", type=since, help=f"up to (excluded): {SINCE_HELP} (default: now)")
    p.add_argument("--by", choices=GROUPS, default="model", help="group by (default model)")
    p.add_argument("--class", dest="task_class", metavar="CLASS", help="only this task class")
    p.add_argument("--app", help="only the jobs of this app")
    p.add_argument("--model", help="only the attempts of this model")
    add_json_option(p, JSON_HELP)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from workers.ledger.filters import Filters
    from workers.ledger.store import Ledger, redacted
    from workers.ledger.usage import print_report, usage_report

    # The rows of jobs that finished in the last second may still wait on the spool of the
    # fleet's Redis: write them first, when this command knows which Redis that is.
    environ = {**os.environ, **broker_env()}
    known = environ.get("FLEET_BROKER_URL") or environ.get("FLEET_STATE_URL")
    ledger = Ledger(redis_url="" if known else None, environ=environ)
    try:
        if known:
            ledger.drain()
        only = Filters(until=args.until, task_class=args.task_class, app=args.app, model=args.model)
        report = usage_report(ledger, args.since, args.by, load_catalog(), only)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"fleet: cannot read the ledger at {redacted(ledger.url)}: {reason}", file=sys.stderr)
        return 1
    finally:
        ledger.close()
    print_json(report.rows) if args.json else print_report(report)
    return 0
