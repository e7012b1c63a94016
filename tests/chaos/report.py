"""Run every chaos scenario and print the table.

    .venv/bin/python -m tests.chaos.report [--keep DIR] [SCENARIO ...]

Exit status 1 if any scenario lost, duplicated or mis-billed a job (a provider call
the ledger lacks, known gap included, or a row for a call never made), missed its fault,
or broke another of its checks; the problems are listed under the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .harness import Tally
from .scenarios import SCENARIOS

# The billing columns count provider calls from the simulator's own request log, held
# job by job and model by model against the ledger's rows (harness.audit).
COLUMNS = (
    "scenario", "jobs", "answered", "dead-lettered", "lost", "duplicated", "provider calls",
    "calls not in ledger", "(redelivered)", "ledger rows never called", "(orphans)", "seconds",
)  # fmt: skip


def row(t: Tally) -> tuple[str, ...]:
    return (
        t.scenario, str(t.jobs), str(t.answered), str(t.dead_lettered), str(t.lost),
        str(t.duplicated), str(t.provider_calls), str(t.unbilled_calls),
        str(t.redelivered_unbilled), str(t.uncalled_rows), str(t.uncalled_orphans),
        f"{t.seconds:.1f}",
    )  # fmt: skip


def known_gaps(t: Tally) -> list[str]:
    """What the audit counted but explained: still wrong, and said so."""
    gaps = []
    if t.redelivered_unbilled:
        gaps.append(
            f"{t.redelivered_unbilled} provider calls not in the ledger were made by deliveries"
            " delivered again (their ack lost with Redis, or a worker killed mid-call)"
        )
    if t.uncalled_orphans:
        gaps.append(
            f"{t.uncalled_orphans} orphaned ledger rows bill calls the provider never received"
            " (the worker died after taking the slot, before the call left)"
        )
    if t.unwatched_at_outage:
        gaps.append(
            f"{t.unwatched_at_outage} jobs' final state was published as Redis went down:"
            " no listener saw it, so nothing vouches they ended once"
        )
    return gaps


def table(tallies: list[Tally]) -> str:
    rows = [COLUMNS, *(row(t) for t in tallies)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]

    def line(cells: tuple[str, ...]) -> str:
        first, *rest = cells
        out = [first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)]
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    total = sum(t.seconds for t in tallies)
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:]), f"total {total:.0f} s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.report")
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], default=[])
    parser.add_argument("--keep", help="keep each fleet's files (logs, ledger) under DIR")
    args = parser.parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    root = Path(args.keep or tempfile.mkdtemp(prefix="chaos-"))
    tallies = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        tallies.append(SCENARIOS[name](root / name))
    print(table(tallies))
    for t in tallies:
        for note in t.notes:
            print(f"  {t.scenario}: {note}")
        if t.hits:
            print(f"  {t.scenario}: struck: {', '.join(f'{k} {v}' for k, v in t.hits.items())}")
        for gap in known_gaps(t):
            print(f"  {t.scenario}: known gap: {gap}")
    problems = [f"{t.scenario}: {p}" for t in tallies for p in t.problems]
    for problem in problems[:50]:
        print(f"PROBLEM {problem}")
    if args.keep is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 1 if problems or not all(t.clean for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
