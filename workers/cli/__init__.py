"""The `fleet` command line.

Its flags and `--json` shapes are a contract users' scripts rely on: keep them stable.
Bad input exits with status 2 and one line on stderr naming the problem and the valid
choices, never a traceback. Each command's parser sits beside its handler, in the module
named for it; the options they share are declared once, in options.py. Commands that need
the fleet's machinery import it lazily, so `fleet route` and `fleet catalog` start without
Celery.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from router.errors import FleetError
from workers.cli import (
    catalog,
    dead_letter,
    demo,
    doctor,
    keys,
    models,
    processes,
    route,
    status,
    submit,
    usage,
)
from workers.cli.options import EXIT_USAGE, Handler, Parser, Subcommands, subcommands

# In the order `fleet --help` lists them.
COMMANDS: tuple[Callable[[Subcommands], None], ...] = (
    route.add_route,
    catalog.add_catalog,
    demo.add_demo,
    processes.add_up,
    processes.add_ledger_writer,
    processes.add_serve,
    processes.add_dashboard,
    keys.add_keys,
    dead_letter.add_dead_letter,
    status.add_status,
    doctor.add_doctor,
    models.add_models,
    processes.add_worker,
    submit.add_submit,
    catalog.add_check_config,
    usage.add_usage,
)


def build_parser() -> Parser:
    parser = Parser(prog="fleet", description="modelfleet: route and run LLM jobs as a fleet")
    commands = subcommands(parser, "command")
    for add in COMMANDS:
        add(commands)
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
