"""`fleet keys create|list|revoke`: the gateway's keys per app, held in the ledger (only
their hashes)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from workers.cli.options import (
    Subcommands,
    add_json_option,
    non_negative_float,
    positive_int,
    subcommands,
)
from workers.cli.output import print_json

if TYPE_CHECKING:
    from gateway.keys import KeyStore


def add_keys(commands: Subcommands) -> None:
    p = commands.add_parser("keys", help="the gateway's keys per app: create, list, revoke")
    actions = subcommands(p, "action")

    q = actions.add_parser("create", help="a new key for APP (printed once)")
    q.add_argument("app")
    q.add_argument("--usd-per-day", type=non_negative_float, metavar="X")
    q.add_argument("--usd-per-month", type=non_negative_float, metavar="Y")
    q.add_argument("--requests-per-min", type=positive_int, metavar="N")
    q.add_argument("--classes", metavar="C,...", help="task classes the key may use (all)")
    q.add_argument(
        "--admin", action="store_true", help="also sees the whole fleet: dashboard, /metrics"
    )
    add_json_option(q)
    q.set_defaults(handler=create)

    q = actions.add_parser("list", help="every key, its app and limits (never the key)")
    add_json_option(q)
    q.set_defaults(handler=list_keys)

    q = actions.add_parser("revoke", help="revoke a key for good")
    q.add_argument("key_id")
    add_json_option(q)
    q.set_defaults(handler=revoke)


@contextmanager
def _key_store() -> Iterator[KeyStore]:
    from gateway.keys import KeyStore
    from workers.ledger.store import Ledger

    ledger = Ledger(redis_url=None)
    try:
        yield KeyStore(ledger)
    finally:
        ledger.close()


def create(args: argparse.Namespace) -> int:
    from workers.state.apps import AppLimits

    with _key_store() as store:
        limits = AppLimits(args.usd_per_day, args.usd_per_month, args.requests_per_min)
        classes = args.classes.split(",") if args.classes else None
        key, row = store.create(args.app, limits, classes, admin=args.admin)
        if args.json:
            print_json({**row.as_dict(), "key": key})
            return 0
        print(key)
        print(
            f"fleet: key {row.key_id} for app {row.app!r}: shown once, keep it"
            " (the ledger holds only its hash)",
            file=sys.stderr,
        )
        return 0


def revoke(args: argparse.Namespace) -> int:
    with _key_store() as store:
        row = store.revoke(args.key_id)
        print_json(row.as_dict()) if args.json else print(f"revoked {row.key_id} ({row.app})")
        return 0


def list_keys(args: argparse.Namespace) -> int:
    with _key_store() as store:
        rows = [k.as_dict() for k in store.list()]
        if args.json:
            print_json(rows)
            return 0
        for r in rows:
            admin = "; admin" if r["admin"] else ""
            print(f"{r['key_id']}  {r['app']:<20} {_state(r)} {_limits(r)}; {_classes(r)}{admin}")
        return 0


def _state(row: dict[str, Any]) -> str:
    return f"{'revoked' if row['revoked_at'] else 'active':<8}"


def _limits(row: dict[str, Any]) -> str:
    shown = (
        (f"day ${row['usd_per_day']}", row["usd_per_day"]),
        (f"month ${row['usd_per_month']}", row["usd_per_month"]),
        (f"{row['requests_per_min']}/min", row["requests_per_min"]),
    )
    return " ".join(part for part, value in shown if value is not None) or "no limits"


def _classes(row: dict[str, Any]) -> str:
    allowed = row["classes"]
    return ",".join(allowed) if allowed else "all classes"
