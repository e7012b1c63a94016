"""The benchmark harness runs: a tiny subset of `python -m bench`, in a subprocess, with
its own Redis; no timing is asserted (the figures come from full runs, see bench/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_subset_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "router,enqueue",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[router] route() decisions/s" in proc.stdout
    assert "[enqueue] enqueue rate" in proc.stdout
    report = json.loads((tmp_path / "latest-quick.json").read_text())
    assert report["benchmarks"] == ["router", "enqueue"] and not report["failed"]
    assert {row["bench"] for row in report["rows"]} == {"router", "enqueue"}
    assert report["machine"]["nproc"] >= 1
