"""`fleet route`: the queue and model chain a job would take, and why models are skipped.

It reads the fleet's live state from Redis when it can reach it, and loads no Celery, HTTP
client or database driver (tests/test_layering.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from router.catalog import SOURCES, TASK_CLASSES, Catalog, load_catalog
from router.errors import CapabilityUnavailable, NoRouteAvailable
from router.policy import Route, RouteQuery, route
from workers.cli.connection import state_client
from workers.cli.options import Subcommands, add_json_option, non_negative_int
from workers.cli.output import console, print_json


def add_route(commands: Subcommands) -> None:
    p = commands.add_parser("route", help="show the queue and model chain a job would take")
    p.add_argument("--class", dest="task_class", required=True, choices=TASK_CLASSES)
    p.add_argument("--focus")
    p.add_argument("--profile")
    p.add_argument("--model", help="an explicit model id (preferred over all else)")
    p.add_argument("--image", action="store_true", help="the job has an image part")
    p.add_argument(
        "--tools", action="store_true", help="the job gives tools (models without tools skipped)"
    )
    p.add_argument(
        "--json-schema",
        action="store_true",
        help="the job asks for a JSON schema response_format (models without it skipped)",
    )
    p.add_argument("--prompt-tokens", type=non_negative_int, default=0, metavar="N")
    p.add_argument("--source", choices=SOURCES, default="app")
    add_json_option(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog()
    query = RouteQuery(
        task_class=args.task_class,
        focus=args.focus,
        profile=args.profile,
        model=args.model,
        has_image=args.image,
        prompt_tokens=args.prompt_tokens,
        source=args.source,
        needs=frozenset(
            need
            for need, wanted in (("tools", args.tools), ("json_schema", args.json_schema))
            if wanted
        ),
    )
    try:
        decision = route(catalog, query, live_skips(catalog, query))
    except (NoRouteAvailable, CapabilityUnavailable) as exc:
        # Not a usage error: the request is well formed, no model of its chain can take it
        # (now, or ever for what it needs: dispatch() raises the latter as an InvalidJob).
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(decision.as_dict())
        return 0
    _print_table(catalog, decision)
    return 0


def live_skips(catalog: Catalog, query: RouteQuery) -> dict[str, str]:
    """Why models of the job's chain would be skipped now (empty without a reachable fleet)."""
    from workers.state.limits import FleetState

    try:
        decision = route(catalog, query)
    except (NoRouteAvailable, CapabilityUnavailable):
        return {}
    client = state_client()
    if client is None:
        return {}
    models = [hop.model for hop in decision.chain]
    with client:
        state = FleetState(client, catalog)
        blocks = state.blocks(query.task_class, models, query.prompt_tokens, decision.needs)
    return {model: block.reason for model, block in blocks.items()}


def _print_table(catalog: Catalog, decision: Route) -> None:
    from rich.table import Table

    table = Table(title=f"route for a {decision.task_class} job", title_justify="left")
    for col in ("#", "model", "queue", "tier", "context"):
        table.add_column(col)
    for i, hop in enumerate(decision.chain, 1):
        window = catalog.model(hop.model).context_window
        table.add_row(str(i), hop.model, hop.queue, hop.tier, f"{window:,}")
    out = console()
    out.print(table)
    params = f"temperature={decision.temperature}  max_tokens={decision.max_tokens}"
    out.print(f"queue: {decision.queue}   {params}")
    if decision.needs:
        out.print(f"needs: {', '.join(sorted(decision.needs))}")
    for model_id, reason in decision.dropped:
        # As written: a ':free:' in a model id followed by ': ' is no emoji code.
        out.print(f"skipped {model_id}: {reason}", emoji=False, markup=False)
    for hop in decision.chain:
        provider = catalog.providers[catalog.model(hop.model).provider]
        if provider.api_key_env and not os.environ.get(provider.api_key_env):
            out.print(
                f"note: {hop.model} needs {provider.api_key_env}, unset here"
                " (a worker without it skips the model)",
                emoji=False,
                markup=False,
            )
