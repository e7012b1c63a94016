"""`fleet catalog` and `fleet check-config`: the models of the catalog in force, and a check
of a catalog/policy file before it is put in force."""

from __future__ import annotations

import argparse
from typing import Any

from router.catalog import Catalog, load_catalog
from workers.cli.options import Subcommands, add_json_option
from workers.cli.output import console, print_json


def add_catalog(commands: Subcommands) -> None:
    p = commands.add_parser("catalog", help="list every model with its queue, tier and prices")
    add_json_option(p)
    p.set_defaults(handler=run_catalog)


def add_check_config(commands: Subcommands) -> None:
    p = commands.add_parser("check-config", help="validate a catalog/policy YAML file")
    p.add_argument("path")
    p.set_defaults(handler=run_check_config)


def catalog_rows(catalog: Catalog) -> list[dict[str, Any]]:
    return [m.listing() for m in catalog.models]


def run_catalog(args: argparse.Namespace) -> int:
    rows = catalog_rows(load_catalog())
    if args.json:
        print_json(rows)
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
    console().print(table)
    return 0


def run_check_config(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.path)
    print(
        f"{args.path}: ok ({len(catalog.providers)} providers, {len(catalog.models)} models,"
        f" {len(catalog.policy.chains)} chains)"
    )
    return 0
