"""`fleet models list|pull`: the catalog's local (MLX) models on this machine, and fetching
them into the hub cache (workers/ops/models.py).

`pull` exits 1 when a model could not be fetched, with one line on stderr for each naming
it and what could not be reached; its progress bars (huggingface_hub's) go to stderr too.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from router.catalog import load_catalog
from workers.cli.options import Subcommands, add_json_option, subcommands
from workers.cli.output import console, print_json


def add_models(commands: Subcommands) -> None:
    p = commands.add_parser("models", help="the catalog's local models: list, pull")
    actions = subcommands(p, "action")

    q = actions.add_parser(
        "list", help="each local model: hub id or path, present, size on disk, loads"
    )
    add_json_option(q)
    q.set_defaults(handler=list_models)

    q = actions.add_parser(
        "pull", help="fetch local models into the hub cache (all the catalog's when no ID)"
    )
    q.add_argument("ids", nargs="*", metavar="ID", help="a local model's catalog id or hub id")
    add_json_option(q)
    q.set_defaults(handler=pull)


def list_models(args: argparse.Namespace) -> int:
    from workers.ops.models import list_models, local_models

    found = [m.as_dict() for m in list_models(local_models(load_catalog()))]
    if args.json:
        print_json(found)
        return 0
    from rich.table import Table
    from rich.text import Text

    table = Table(title="local models", title_justify="left")
    table.add_column("model", no_wrap=True)
    for col in ("hub id or path", "present", "size", "loads", "fix"):
        table.add_column(col, overflow="fold")
    for m in found:
        table.add_row(
            m["model"],
            Text(m["upstream"]),
            "yes" if m["present"] else "no",
            _size(m["size_bytes"]),
            {True: "yes", False: "no", None: "-"}[m["loadable"]],
            Text(m["fix"] or ""),
        )
    console().print(table)
    return 0


def pull(args: argparse.Namespace) -> int:
    from workers.ops.models import pull, select

    outcomes = [pull(m) for m in select(load_catalog(), args.ids)]
    if args.json:
        print_json([o.as_dict() for o in outcomes])
    else:
        for o in outcomes:
            if o.ok:
                print(f"{o.model}: {o.path}")
    for o in outcomes:
        if not o.ok:
            print(f"fleet: {o.problem}", file=sys.stderr)
    return 0 if all(o.ok for o in outcomes) else 1


def _size(size: Any) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # unreachable; keeps mypy sure of a return
