"""`python -m bench [--quick] [--only router,enqueue,...]`: run the benchmarks, print one
table of side-by-side figures, each with the machine's load as it was measured, and
write them to bench/results/latest.json (latest-quick.json for --quick).
`python -m bench --markdown [FILE]` prints a saved run as bench/README.md's table.
See bench/README.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.runs import BENCHES, Row

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import os

    import celery
    import httpx
    import kombu
    import redis

    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis_py": redis.__version__,
        "httpx": httpx.__version__,
        "loadavg_at_start": " ".join(load),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['nproc']} × {info['cpu']}, Python {info['python']}, "
        f"Celery {info['celery']}, kombu {info['kombu']}"
    )


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit in ("/s", "count") or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


HEAD = ("measure", "fleet", "ref", "fleet vs ref", "target", "met?", "load 1m")


def cells(row: Row) -> tuple[str, ...]:
    """A row as the table's cells. The comparison is of per-round pairs unless it says
    what else it compares ("of medians", "of best tries", ...)."""
    compare = ""
    if row.compare == "ratio" and row.value is not None:
        compare = f"{row.value:.2f}×"
    elif row.compare == "overhead" and row.value is not None:
        sign = "+" if row.value >= 0 else "−"
        compare = f"{sign}{_fmt(abs(row.value))} {row.unit}"
    if compare and row.basis not in ("", "paired"):
        compare += f" ({row.basis})"
    met = {True: "yes", False: "NO", None: ""}[row.met]
    unit = f" {row.unit}" if row.unit not in ("", "/s", "×", "count") else ""
    fleet = _fmt(row.fleet, row.unit) + (unit if row.fleet is not None else "")
    ref = _fmt(row.ref, row.unit) + (unit if row.ref is not None else "")
    load = f"{row.load[0]:.1f}→{row.load[-1]:.1f}" if row.load else ""
    return (f"[{row.bench}] {row.measure}", fleet, ref, compare, row.target, met, load)


def table(rows: list[Row]) -> str:
    lines = [cells(row) for row in rows]
    widths = [max(len(x[i]) for x in [HEAD, *lines]) for i in range(len(HEAD))]
    out = []
    for i, line in enumerate([HEAD, *lines]):
        out.append(
            "  ".join(
                cell.ljust(w) if j == 0 or j in (4, 5) else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(report: dict[str, Any]) -> str:
    """A saved run as a Markdown table, with the machine it ran on (bench/README.md)."""
    info = report["machine"]
    rows = [Row(**row) for row in report["rows"]]
    out = [
        f"Run of {info['date']}{' (--quick)' if report.get('quick') else ''}, "
        f"{info['wall_s']:.0f} s, on {machine_line(info)}.",
        "",
        "| " + " | ".join(HEAD) + " |",
        "|" + " --- |" * len(HEAD),
    ]
    for row in rows:
        line = [cell.strip().replace("|", "\\|") or " " for cell in cells(row)]
        line[0] = line[0].replace("  ", " ")
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (about 4 minutes)")
    parser.add_argument(
        "--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where JSON goes")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    parser.add_argument(
        "--markdown",
        nargs="?",
        const=RESULTS / "latest.json",
        type=Path,
        metavar="FILE",
        help="print a saved run (default: results/latest.json) as a Markdown table; run nothing",
    )
    args = parser.parse_args(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown} (valid: {', '.join(BENCHES)})")

    info = machine()
    print(
        f"modelfleet bench — {info['date']} — {machine_line(info)} — "
        f"load {info['loadavg_at_start']}{' — quick' if args.quick else ''}",
        flush=True,
    )
    rows: list[Row] = []
    details: dict[str, Any] = {}
    failed = []
    started = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        print(f"  running {name} ...", end="", flush=True)
        try:
            bench_rows, bench_details = BENCHES[name](args.quick)
        except Exception:
            print(" FAILED", flush=True)
            traceback.print_exc()
            failed.append(name)
            details[name] = {"error": traceback.format_exc()}
            continue
        print(f" {time.monotonic() - t0:.0f} s", flush=True)
        rows += bench_rows
        details[name] = bench_details
    info["wall_s"] = round(time.monotonic() - started, 1)
    info["loadavg_at_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"\n{machine_line(info)}; {info['wall_s']:.0f} s{' (--quick)' if args.quick else ''}")
    print(table(rows))
    print(
        "\nfleet, ref: each side's median over rounds taken in turns (or the percentile the"
        "\nmeasure names); fleet vs ref: the median (or that percentile) of each round's"
        "\ndifference or ratio, unless it says what else it compares; load 1m: the machine's"
        "\n1-minute load average as the figure's measurement started → as it ended."
    )

    if not args.no_save:
        report = {
            "machine": info,
            "quick": args.quick,
            "benchmarks": names,
            "rows": [dataclasses.asdict(r) for r in rows],
            "details": details,
            "failed": failed,
        }
        args.results_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
        suffix = "-quick" if args.quick else ""  # the run's date is inside; git keeps the rest
        (args.results_dir / f"latest{suffix}.json").write_text(text)
        print(f"figures written to {args.results_dir / f'latest{suffix}.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
