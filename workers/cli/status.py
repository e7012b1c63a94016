"""`fleet status`: queues and their workers, each model's limits, cooldowns and spend today,
beat's entries and the dead letters held, now."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from router.catalog import load_catalog
from router.errors import ConfigError
from workers.cli.connection import broker_env, state_client
from workers.cli.options import Subcommands, add_json_option
from workers.cli.output import console, print_json

if TYPE_CHECKING:
    from rich.console import Console


def add_status(commands: Subcommands) -> None:
    p = commands.add_parser("status", help="queues, workers, cooldowns, limits and spend, now")
    add_json_option(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from workers.ops.status import fleet_status
    from workers.runtime.celery_app import get_app
    from workers.state.limits import FleetState

    catalog = load_catalog()
    client = state_client()
    if client is None:
        raise ConfigError(
            "the fleet's Redis is not reachable: start it with `fleet up`, or set"
            " FLEET_BROKER_URL (and FLEET_STATE_URL)"
        )
    with client:
        app = get_app({**os.environ, **broker_env()})
        status = fleet_status(app, FleetState(client, catalog), catalog)
    if args.json:
        print_json(status)
        return 0
    _print_status(status)
    return 0


def _print_status(status: dict[str, Any]) -> None:
    from rich.table import Table

    out = console()
    queues = Table(title="queues", title_justify="left")
    for col in ("queue", "waiting", "workers"):
        queues.add_column(col)
    for q in status["queues"]:
        queues.add_row(q["queue"], str(q["waiting"]), ", ".join(q["workers"]) or "none")
    out.print(queues)
    models = Table(title="models (limits, cooldowns, spend today)", title_justify="left")
    for col in ("model", "state", "windows", "spend today"):
        models.add_column(col)
    for m in status["models"]:
        state = m["cooldown"] or ("circuit open" if m["circuit_open"] else "ok")
        if m.get("unservable"):  # no live worker of its queue can serve it: the fix
            state = m["unservable"]["reason"]
        elif state == "ok" and m.get("no_key"):
            state = f"no key on {m['no_key']}"
        if m.get("refused"):  # resting for these capabilities only
            state += f"; refused {', '.join(m['refused'])}"
        windows = ", ".join(f"{k} {v['used']}/{v['limit']}" for k, v in m["windows"].items())
        models.add_row(m["model"], state, windows or "-", f"${m['spend_usd']['day']:.4f}")
    out.print(models)
    _print_beat(out, status["beat"])
    _print_dead_letters(out, status["dead_letters"])


def _print_beat(out: Console, entries: list[dict[str, Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    from workers.state.beathealth import describe

    if not entries:
        return
    beat = Table(title="beat entries", title_justify="left")
    for col in ("entry", "health"):
        beat.add_column(col)
    for health in entries:
        # as Text: a reason is not markup ('[...]'), nor ':free:' an emoji
        beat.add_row(health["entry"], Text(describe(health)))
    out.print(beat)


def _print_dead_letters(out: Console, classes: list[dict[str, Any]]) -> None:
    from rich.table import Table

    if not classes:
        return
    dead = Table(title="dead letters (`fleet dead-letter list`)", title_justify="left")
    for col in ("class", "held", "trimmed by retention", "keeps"):
        dead.add_column(col)
    for c in classes:
        keeps = f"{c['max_count']} for {c['max_age_days']:g} days"
        dead.add_row(c["task_class"], str(c["held"]), str(c["trimmed"]), keeps)
    out.print(dead)
