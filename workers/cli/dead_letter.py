"""`fleet dead-letter list|replay`: the jobs that ended without an answer, and sending one
again under a new id."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from router.catalog import load_catalog
from router.errors import ConfigError, InvalidJob
from workers.cli.connection import broker_env, state_client
from workers.cli.options import Subcommands, add_json_option, subcommands
from workers.cli.output import print_json

if TYPE_CHECKING:
    from redis import Redis


def add_dead_letter(commands: Subcommands) -> None:
    p = commands.add_parser("dead-letter", help="jobs that ended without an answer: list, replay")
    actions = subcommands(p, "action")
    q = actions.add_parser("list", help="every dead letter with its reason")
    add_json_option(q)
    q.set_defaults(handler=list_letters)
    q = actions.add_parser("replay", help="dispatch a dead letter's job again, under a new id")
    q.add_argument("job_id")
    add_json_option(q)
    q.set_defaults(handler=replay)


@contextmanager
def _fleet_state() -> Iterator[Redis]:
    client = state_client()
    if client is None:
        raise ConfigError("the fleet's Redis is not reachable: start it with `fleet up`")
    with client:
        yield client


def list_letters(args: argparse.Namespace) -> int:
    from workers.state import deadletter

    with _fleet_state() as client:
        policy = load_catalog().policy.dead_letters
        deadletter.trim(client, policy)  # none past its class's age is shown
        found = deadletter.entries(client)
        if args.json:
            print_json([_row(e) for e in found])
            return 0
        for e in found:
            row = _row(e)
            print(f"{row['job_id']}  {row['task_class']:<18} {row['error']}")
        _print_trimmed(deadletter.summary(client, policy))
    return 0


def replay(args: argparse.Namespace) -> int:
    from client import dispatch
    from workers.state import deadletter

    with _fleet_state() as client:
        entry = deadletter.take(client, args.job_id)
        if entry is None:
            raise InvalidJob(f"no dead letter {args.job_id!r} (see `fleet dead-letter list`)")
    os.environ.update(broker_env())
    handle = dispatch(deadletter.replay_job(entry))
    print(json.dumps({"replayed": args.job_id, "job_id": handle.id}) if args.json else handle.id)
    return 0


def _print_trimmed(classes: list[dict[str, Any]]) -> None:
    """The line under `fleet dead-letter list`: what retention took out, per class."""
    lost = [c for c in classes if c["trimmed"]]
    if lost:
        told = ", ".join(f"{c['task_class']} {c['trimmed']}" for c in lost)
        print(f"trimmed by retention (oldest first; `fleet status` has each limit): {told}")


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    result = entry["result"]
    return {
        "job_id": entry["job"]["id"],
        "task_class": entry["job"].get("task_class"),
        "source": entry["job"].get("source", "app"),
        "error": result.get("error"),
        "attempts": len(result.get("attempts", [])),
        "failed_at": entry["failed_at"],
    }
