"""The `fleet` command line.

Its flags and `--json` shapes are a contract users' scripts rely on: keep them stable.
Bad input exits with status 2 and one line on stderr naming the problem and the valid
choices, never a traceback. Commands that need the fleet's machinery import it lazily,
so `fleet route` and `fleet catalog` start without Celery.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from router.catalog import SOURCES, TASK_CLASSES, Catalog, load_catalog
from router.errors import FleetError, NoRouteAvailable

EXIT_USAGE = 2
Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")


def _console() -> Any:
    from rich.console import Console

    # Piped output has no terminal width: do not squeeze long model ids into 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


# --- fleet route -----------------------------------------------------------------


def cmd_route(args: argparse.Namespace) -> int:
    from router.policy import RouteQuery, route

    catalog = load_catalog()
    query = RouteQuery(
        task_class=args.task_class,
        focus=args.focus,
        profile=args.profile,
        model=args.model,
        has_image=args.image,
        prompt_tokens=args.prompt_tokens,
        source=args.source,
    )
    try:
        decision = route(catalog, query)
    except NoRouteAvailable as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1  # not a usage error: the job is valid, no model can take it
    if args.json:
        _print_json(decision.as_dict())
        return 0
    _print_route_table(catalog, decision)
    return 0


def _print_route_table(catalog: Catalog, decision: Any) -> None:
    from rich.table import Table

    table = Table(title=f"route for a {decision.task_class} job", title_justify="left")
    for col in ("#", "model", "queue", "tier", "context"):
        table.add_column(col)
    for i, hop in enumerate(decision.chain, 1):
        window = catalog.model(hop.model).context_window
        table.add_row(str(i), hop.model, hop.queue, hop.tier, f"{window:,}")
    console = _console()
    console.print(table)
    params = f"temperature={decision.temperature}  max_tokens={decision.max_tokens}"
    console.print(f"queue: {decision.queue}   {params}")
    for model_id, reason in decision.dropped:
        console.print(f"skipped {model_id}: {reason}")


# --- fleet catalog / check-config ---------------------------------------------------


def catalog_rows(catalog: Catalog) -> list[dict[str, Any]]:
    return [
        {
            "id": m.id,
            "provider": m.provider,
            "queue": m.queue,
            "tier": m.tier,
            "context_window": m.context_window,
            "capabilities": sorted(m.capabilities),
            "usd_per_mtok_in": m.usd_per_mtok_in,
            "usd_per_mtok_out": m.usd_per_mtok_out,
        }
        for m in catalog.models
    ]


def cmd_catalog(args: argparse.Namespace) -> int:
    rows = catalog_rows(load_catalog())
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    table = Table()
    for col in ("id", "provider", "queue", "tier", "context", "capabilities", "$/Mtok in", "out"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["id"],
            r["provider"],
            r["queue"],
            r["tier"],
            f"{r['context_window']:,}",
            ", ".join(r["capabilities"]),
            f"{r['usd_per_mtok_in']:.2f}",
            f"{r['usd_per_mtok_out']:.2f}",
        )
    _console().print(table)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.path)
    print(
        f"{args.path}: ok ({len(catalog.providers)} providers, {len(catalog.models)} models,"
        f" {len(catalog.policy.chains)} chains)"
    )
    return 0


# --- fleet demo ------------------------------------------------------------------------

DEMO_QUERIES: list[dict[str, Any]] = [
    {"task_class": c}
    for c in (
        "complex_reasoning",
        "creative",
        "user_facing",
        "vision",
        "long_context",
        "fast_general",
        "cost_free",
        "reasoning_free",
        "heartbeat",
    )
] + [
    {"task_class": "creative", "has_image": True},
    {"task_class": "user_facing", "prompt_tokens": 250_000},
    {"task_class": "complex_reasoning", "source": "cron"},
    {"task_class": "fast_general", "profile": "code"},
    {"task_class": "fast_general", "focus": "trader"},
]


def cmd_demo(args: argparse.Namespace) -> int:
    """Routes for a sample of jobs (the fleet run arrives with the workers)."""
    from rich.table import Table

    from router.policy import RouteQuery, route

    catalog = load_catalog()
    table = Table(title="routes for a sample of jobs", title_justify="left")
    for col in ("job", "queue", "chain"):
        table.add_column(col)
    for fields in DEMO_QUERIES:
        decision = route(catalog, RouteQuery(**fields))
        label = " ".join(f"{k}={v}" for k, v in fields.items())
        table.add_row(label, decision.queue, " → ".join(h.model for h in decision.chain))
    _console().print(table)
    return 0


# --- the parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fleet", description="modelfleet: route and run LLM jobs as a fleet")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("route", help="show the queue and model chain a job would take")
    p.add_argument("--class", dest="task_class", required=True, choices=TASK_CLASSES)
    p.add_argument("--focus")
    p.add_argument("--profile")
    p.add_argument("--model", help="an explicit model id (preferred over all else)")
    p.add_argument("--image", action="store_true", help="the job has an image part")
    p.add_argument("--prompt-tokens", type=_non_negative_int, default=0, metavar="N")
    p.add_argument("--source", choices=SOURCES, default="app")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_route)

    p = sub.add_parser("catalog", help="list every model with its queue, tier and prices")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_catalog)

    p = sub.add_parser("demo", help="run the fleet's demo")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("check-config", help="validate a catalog/policy YAML file")
    p.add_argument("path")
    p.set_defaults(handler=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except FleetError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
