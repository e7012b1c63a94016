"""Run every chaos scenario and print the table.

    .venv/bin/python -m tests.chaos.report [--long] [--keep DIR] [SCENARIO ...]

The kill and partition scenarios (kills.py, partition.py) run twice: on the fleet's broker
transport, and on kombu's stock Redis channel as the baseline beside it, whose losses are
the measure (rows marked "(kombu)", never a failure). The recovery scenario (recovery.py)
runs on three brokers: the fleet's transport, kombu's stock channel and RabbitMQ
(`recovery` names the three; `recovery-fleet` one), and its figures get a table of their
own. `--long`: 150 kills each, a 30 s partition and 20 recovery kills per broker (about
25 minutes), instead of 12 kills, 12 s and 3.

Exit status 1 if any scenario lost, duplicated, called twice or mis-billed a job (a
provider call the ledger lacks, excused ones included, or a row for a call never made),
missed its fault, or broke another of its checks (the fleet's recovery bound among them);
the problems are listed under the tables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .harness import Tally
from .kills import LONG_KILLS, SHORT_KILLS, random_kills
from .partition import partition
from .recovery import BROKERS, recovery_long, recovery_short
from .scenarios import SCENARIOS

Scenario = Callable[[Path], Tally]


def transport_scenarios(long: bool) -> dict[str, Scenario]:
    """The scenarios that can see the broker's pop-to-record moment, on both transports."""
    kills, cut_s = (LONG_KILLS, 30.0) if long else (SHORT_KILLS, 12.0)
    found: dict[str, Scenario] = {}
    for transport in ("fleet", "kombu"):
        suffix = "" if transport == "fleet" else "-kombu"
        found[f"kills{suffix}"] = partial(random_kills, transport=transport, kills=kills)
        found[f"partition{suffix}"] = partial(partition, cut_s=cut_s, transport=transport)
    for broker in BROKERS:
        found[f"recovery-{broker}"] = partial(
            recovery_long if long else recovery_short, broker_name=broker
        )
    return found


# A name that stands for several scenarios on the command line.
GROUPS = {"recovery": [f"recovery-{broker}" for broker in BROKERS]}


# The billing columns count provider calls from the simulator's own request log, held
# job by job and model by model against the ledger's rows (harness.audit).
COLUMNS = (
    "scenario",
    "jobs",
    "answered",
    "dead-lettered",
    "lost",
    "duplicated",
    "called twice",
    "provider calls",
    "calls not in ledger",
    "(excused)",
    "ledger rows never called",
    "(orphans)",
    "seconds",
)


def row(t: Tally) -> tuple[str, ...]:
    return (
        t.scenario,
        str(t.jobs),
        str(t.answered),
        str(t.dead_lettered),
        str(t.lost),
        str(t.duplicated),
        str(t.called_twice),
        str(t.provider_calls),
        str(t.unbilled_calls),
        str(t.excused_unbilled),
        str(t.uncalled_rows),
        str(t.uncalled_orphans),
        f"{t.seconds:.1f}",
    )


def known_gaps(t: Tally) -> list[str]:
    """What the audit counted but explained: still wrong, and said so."""
    gaps = []
    if t.excused_unbilled:
        gaps.append(
            f"{t.excused_unbilled} provider calls not in the ledger were made by deliveries"
            f" whose worker process was killed or cut off ({t.excuses()})"
        )
    if t.uncalled_orphans:
        gaps.append(
            f"{t.uncalled_orphans} orphaned ledger rows bill calls the provider never received"
            " (the worker died after marking the call, in the instant before it left)"
        )
    if t.unwatched_at_outage:
        gaps.append(
            f"{t.unwatched_at_outage} jobs' final state was published as Redis went down:"
            " no listener saw it, so nothing vouches they ended once"
        )
    return gaps


# The recovery table (recovery.py): per broker, the kills -9 of a worker holding jobs
# mid-call, and the time from each kill to the last of its jobs' final state stored.
RECOVERY_COLUMNS = (
    "broker",
    "kills",
    "jobs held",
    "median s",
    "p99 s",
    "worst s",
    "not back",
    "cap s",
)


def grid(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    every = [columns, *rows]
    widths = [max(len(r[i]) for r in every) for i in range(len(columns))]

    def line(cells: tuple[str, ...]) -> str:
        first, *rest = cells
        out = [first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)]
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [line(columns), rule, *(line(r) for r in rows)]


def table(tallies: list[Tally]) -> str:
    total = sum(t.seconds for t in tallies)
    return "\n".join([*grid(COLUMNS, [row(t) for t in tallies]), f"total {total:.0f} s"])


def recovery_table(tallies: list[Tally]) -> str:
    """The recovery figures of the tallies that have them ('' when none does)."""
    rows = [
        (*t.recovery.cells(), f"{t.recovery.cap_s:g}") for t in tallies if t.recovery is not None
    ]
    return "\n".join(grid(RECOVERY_COLUMNS, rows)) if rows else ""


def details(tallies: list[Tally]) -> str:
    """Each scenario's notes, what its fault struck, its known gaps, and a baseline's
    problems (reported, not failures)."""
    lines = []
    for t in tallies:
        lines += [f"  {t.scenario}: {note}" for note in t.notes]
        if t.hits:
            lines.append(
                f"  {t.scenario}: struck: {', '.join(f'{k} {v}' for k, v in t.hits.items())}"
            )
        lines += [f"  {t.scenario}: known gap: {gap}" for gap in known_gaps(t)]
        if t.reference:
            lines += [f"  {t.scenario} (baseline, not a failure): {p}" for p in t.problems[:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.report")
    names_all = [*SCENARIOS, *transport_scenarios(False), *GROUPS]
    parser.add_argument("scenarios", nargs="*", choices=[[], *names_all], default=[])
    parser.add_argument(
        "--long",
        action="store_true",
        help="150 kills per transport, a 30 s partition, 20 recovery kills per broker",
    )
    parser.add_argument("--keep", help="keep each fleet's files (logs, ledger) under DIR")
    args = parser.parse_args(argv)
    every: dict[str, Scenario] = {**SCENARIOS, **transport_scenarios(args.long)}
    names = [n for name in args.scenarios for n in GROUPS.get(name, [name])] or list(every)
    root = Path(args.keep or tempfile.mkdtemp(prefix="chaos-"))
    tallies = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        tallies.append(every[name](root / name))
    print(table(tallies))
    recoveries = recovery_table(tallies)
    if recoveries:
        print(recoveries)
    print(details(tallies))
    problems = [f"{t.scenario}: {p}" for t in tallies if not t.reference for p in t.problems]
    for problem in problems[:50]:
        print(f"PROBLEM {problem}")
    if args.keep is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 1 if problems or not all(t.clean for t in tallies if not t.reference) else 0


if __name__ == "__main__":
    sys.exit(main())
