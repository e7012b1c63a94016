"""`fleet demo`: the whole fleet end to end on simulated providers (workers/sim/demo.py)."""

from __future__ import annotations

import argparse

from workers.cli.options import Subcommands, add_json_option


def add_demo(commands: Subcommands) -> None:
    p = commands.add_parser("demo", help="run the whole fleet end to end on simulated providers")
    add_json_option(p, "one JSON object per job, per line")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from workers.sim.demo import run_demo

    return run_demo(as_json=args.json)
