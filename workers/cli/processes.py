"""The commands that run a fleet's long-lived processes: `fleet up` (all of them, supervised),
`fleet worker`, `fleet ledger-writer`, `fleet serve` (the gateway) and `fleet dashboard`."""

from __future__ import annotations

import argparse
import os

from router.catalog import QUEUES
from workers.cli.connection import broker_env
from workers.cli.options import Subcommands, port, positive_float, positive_int


def add_up(commands: Subcommands) -> None:
    p = commands.add_parser(
        "up", help="start the fleet: redis, a worker per queue, beat, Flower, the gateway"
    )
    p.add_argument("--no-beat", action="store_true")
    p.add_argument("--no-flower", action="store_true")
    p.add_argument("--flower-port", type=port, default=5555)
    p.add_argument("--no-gateway", action="store_true")
    p.add_argument("--gateway-port", type=port, default=8080)
    p.set_defaults(handler=run_up)


def run_up(args: argparse.Namespace) -> int:
    from workers.config import limit_margin_ms
    from workers.ops import up
    from workers.runtime.celery_app import celery_settings

    limit_margin_ms()  # checked before any child starts
    celery_settings()  # (the lapse, the visibility timeout, the transport: one line each)
    return up.run_up(
        beat=not args.no_beat,
        flower_port=None if args.no_flower else args.flower_port,
        gateway_port=None if args.no_gateway else args.gateway_port,
    )


def add_ledger_writer(commands: Subcommands) -> None:
    p = commands.add_parser(
        "ledger-writer",
        help="drain the spool of finished jobs' rows into the ledger database (one per fleet)",
    )
    p.add_argument("--every", type=positive_float, default=1.0, metavar="SECONDS")
    p.set_defaults(handler=run_ledger_writer)


def run_ledger_writer(args: argparse.Namespace) -> int:
    import logging

    from workers.ledger import writer
    from workers.ledger.store import Ledger

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.update(broker_env())
    return writer.run(Ledger(), every_s=args.every)


def add_serve(commands: Subcommands) -> None:
    p = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP gateway")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=port, default=8080)
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from gateway.serve import serve

    os.environ.update(broker_env())
    return serve(args.host, args.port)


def add_dashboard(commands: Subcommands) -> None:
    p = commands.add_parser(
        "dashboard",
        help="serve the cost dashboard (the gateway's /dashboard) where no gateway runs",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=port, default=8081)
    p.set_defaults(handler=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    from gateway.serve import serve

    os.environ.update(broker_env())
    return serve(args.host, args.port, ready="dashboard: serving on", path="/dashboard")


def add_worker(commands: Subcommands) -> None:
    p = commands.add_parser("worker", help="run a worker for one or more queues")
    p.add_argument("queues", nargs="+", choices=QUEUES, metavar="QUEUE")
    p.add_argument("--pool", choices=("threads", "solo", "prefork", "gevent"))
    p.add_argument("--concurrency", "-c", type=positive_int)
    p.add_argument("--loglevel", "-l", default="INFO")
    p.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    """Replace this process with a Celery worker for `args.queues` (exec)."""
    from workers.config import limit_margin_ms
    from workers.ops.pools import worker_argv
    from workers.runtime.celery_app import celery_settings

    limit_margin_ms()  # a bad FLEET_LIMIT_MARGIN_MS stops here, in one line, not per job
    celery_settings()  # and a bad FLEET_WORKER_LAPSE_S (or the like) too
    argv = worker_argv(
        args.queues, pool=args.pool, concurrency=args.concurrency, loglevel=args.loglevel
    )
    env = dict(os.environ)
    env["FLEET_WORKER_CONCURRENCY"] = argv[argv.index("-c") + 1]
    env.update(broker_env())
    os.execve(argv[0], argv, env)
