"""`fleet doctor [--probe] [--json]`: whether each catalog model can serve from here, the
fleet's services and workers, and per task class whether a usable model is left; the fix
for each problem. Exit 1 when a task class has none, 0 otherwise (workers/ops/doctor.py)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from router.catalog import load_catalog
from workers.cli.options import Subcommands, add_json_option
from workers.cli.output import console, print_json

if TYPE_CHECKING:
    from rich.table import Table


def add_doctor(commands: Subcommands) -> None:
    p = commands.add_parser(
        "doctor", help="which models can serve from here, and how to fix those that cannot"
    )
    p.add_argument(
        "--probe",
        action="store_true",
        help="make one tiny real call per model (recorded in the ledger) instead of a TCP connect",
    )
    add_json_option(p, help="the report as one JSON document: models, services, queues, classes")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from workers.ops.doctor import diagnose

    catalog = load_catalog()
    ledger = None
    if args.probe:
        from workers.ledger.store import Ledger

        ledger = Ledger()
    try:
        report = diagnose(catalog, probe=args.probe, ledger=ledger)
    finally:
        if ledger is not None:
            ledger.close()
    if args.json:
        print_json(report)
    else:
        _print_report(report)
    return 0 if report["ok"] else 1


def _print_report(report: dict[str, Any]) -> None:
    out = console()
    out.print(_models_table(report))
    for table in _fleet_tables(report):
        out.print(table)
    usable = sum(c["usable"] for c in report["classes"])
    out.print(f"{usable} of {len(report['classes'])} task classes have a usable model.")


def _reach(model: dict[str, Any], probed: bool) -> str:
    if probed and model["probe"]:
        return str(model["probe"]["outcome"])
    if model["kind"] == "mlx":
        return "local" if model["local"] else "-"
    return {True: "ok", False: "unreachable", None: "-"}[model["reachable"]]


def _models_table(report: dict[str, Any]) -> Table:
    from rich.table import Table
    from rich.text import Text

    models = Table(title="models", title_justify="left")
    models.add_column("model", no_wrap=True)  # whole, never cut: a user copies it
    for col in ("key", "probe" if report["probe"] else "reach"):
        models.add_column(col)
    for col in ("state", "fix"):  # a long repo id folds onto the next line, never cut
        models.add_column(col, overflow="fold")
    for m in report["models"]:
        key = "-" if not m["key"] else ("set" if m["key_set"] else "unset")
        state = "ok" if m["usable"] else "; ".join(p["problem"] for p in m["problems"])
        fix = "; ".join(p["fix"] for p in m["problems"])
        # as Text: a problem or fix is not markup ('[...]'), nor ':free:' an emoji
        models.add_row(m["model"], key, _reach(m, report["probe"]), Text(state), Text(fix))
    return models


def _fleet_tables(report: dict[str, Any]) -> list[Table]:
    from rich.table import Table
    from rich.text import Text

    services = Table(title="services", title_justify="left")
    for col in ("service", "url", "state", "fix"):
        services.add_column(col)
    for s in report["services"]:
        state = "ok" if s["ok"] else s["problem"]
        services.add_row(s["service"], Text(s["url"]), Text(state), Text(s["fix"] or ""))
    queues = Table(title="queues", title_justify="left")
    for col in ("queue", "workers", "fix"):
        queues.add_column(col)
    for q in report["queues"]:
        queues.add_row(q["queue"], ", ".join(q["workers"]) or "none", q["fix"] or "")
    classes = Table(title="task classes", title_justify="left")
    for col in ("class", "usable models", "fix"):
        classes.add_column(col)
    for c in report["classes"]:
        kept = ", ".join(c["models"]) or "none"
        classes.add_row(c["task_class"], Text(kept), Text("; ".join(c["fixes"])))
    return [services, queues, classes]
