"""`python -m bench [--quick] [--only router,enqueue,...]`: run the benchmarks, print one
table of side-by-side figures, and write them to bench/results/latest.json (and a copy
named by date). See bench/README.md."""

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


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit == "/s" or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: list[Row]) -> str:
    head = ("measure", "fleet", "raw", "ratio/overhead", "target", "met?")
    lines = []
    for row in rows:
        compare = ""
        if row.compare == "ratio" and row.value is not None:
            compare = f"{row.value:.2f}×"
        elif row.compare == "overhead" and row.value is not None:
            compare = f"{row.value:+.2f} {row.unit}"
        met = {True: "yes", False: "NO", None: ""}[row.met]
        unit = f" {row.unit}" if row.unit not in ("", "/s", "×") else ""
        measure = f"[{row.bench}] {row.measure}"
        fleet = _fmt(row.fleet, row.unit) + (unit if row.fleet is not None else "")
        raw = _fmt(row.raw, row.unit) + (unit if row.raw is not None else "")
        lines.append((measure, fleet, raw, compare, row.target, met))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    out = []
    for i, line in enumerate([head, *lines]):
        out.append(
            "  ".join(
                cell.ljust(w) if j == 0 or j >= 4 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (about 2 minutes)")
    parser.add_argument(
        "--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where JSON goes")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown} (valid: {', '.join(BENCHES)})")

    info = machine()
    print(
        f"modelfleet bench — {info['date']} — {info['nproc']} × {info['cpu']} — "
        f"Python {info['python']}, celery {info['celery']}, kombu {info['kombu']} — "
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
    print()
    print(table(rows))
    print(f"\n(total {info['wall_s']:.0f} s; medians of alternating fleet/raw rounds)")

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
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
        suffix = "-quick" if args.quick else ""
        (args.results_dir / f"{stamp}{suffix}.json").write_text(text)
        (args.results_dir / f"latest{suffix}.json").write_text(text)
        print(f"figures written to {args.results_dir / f'latest{suffix}.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
