"""The benchmark harness runs: a tiny subset of `python -m bench`, in a subprocess, with
its own Redis; no timing is asserted (the figures come from full runs, see bench/). And
the overheads it prints are percentiles of paired differences, not differences of
percentiles."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import interleaved, paired_differences, paired_ratios, percentile

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
    assert report["machine"]["cpu"] and report["machine"]["kombu"]
    for row in report["rows"]:  # each figure carries the load around its measurement
        assert len(row["load"]) == 2 and all(x >= 0 for x in row["load"]), row
    enqueue = {row["measure"].split(",")[0]: row for row in report["rows"]}
    assert enqueue["dispatch() µs/job (validate+route+enqueue)"]["basis"] == "paired"
    assert "load 1m" in proc.stdout


def test_an_overheads_percentiles_are_those_of_paired_differences() -> None:
    # Rounds where the fleet and the reference were slow at different moments: each
    # side's p99 is 98, so the difference of the p99s says 0, while the fleet took up to
    # 97 ms longer than the reference of its own round.
    fleet = [float(i) for i in range(100)]
    reference = fleet[::-1]
    assert percentile(fleet, 99) - percentile(reference, 99) == 0
    overhead = paired_differences(fleet, reference)
    assert overhead == [2.0 * i - 99 for i in range(100)]
    assert percentile(overhead, 99) == 97
    assert percentile(overhead, 50) <= percentile(overhead, 99)
    # the symptom, a p99 below the median, from a difference of percentiles
    fleet, reference = [1.0] * 60 + [5.0] * 40, [0.0] * 60 + [5.0] * 38 + [9.0] * 2
    median_gap = percentile(fleet, 50) - percentile(reference, 50)
    assert percentile(fleet, 99) - percentile(reference, 99) < median_gap
    paired = paired_differences(fleet, reference)
    assert percentile(paired, 99) >= percentile(paired, 50)
    assert paired_ratios([2.0, 9.0], [1.0, 3.0]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="unpaired"):
        paired_differences([1.0, 2.0], [1.0])


def test_interleaved_samples_take_turns_and_pair_by_round() -> None:
    calls: list[str] = []
    runs = {side: (lambda side=side: calls.append(side)) for side in ("fleet", "ref")}
    samples = interleaved(runs, n=3, warm=1)
    assert {side: len(v) for side, v in samples.items()} == {"fleet": 3, "ref": 3}
    # the order flips every round, so neither side always goes first
    assert calls == ["fleet", "ref", "ref", "fleet", "fleet", "ref", "ref", "fleet"]


def test_bench_usage_times_the_dashboard_page_over_http_on_both_databases() -> None:
    """bench_usage on a tiny ledger of each kind: its gateway serves the admin key's page
    (a 200, or the run fails) for every window, each figure printed."""
    from tests.ledger_db import PG_URL

    argv = ["--rows", "500", "--rounds", "1", "--pg-url", PG_URL]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_usage", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for database in ("sqlite", "postgresql"):
        assert f"\n{database}, " in proc.stdout
    for window in ("30d", "7d", "24h"):
        figures = re.findall(rf"page over HTTP, {window} +[\d.]+ ms", proc.stdout)
        assert len(figures) == 2, proc.stdout
    assert proc.stdout.count("dropped for an inspect broadcast") == 2
    assert proc.stdout.count("page, 30 d under 500 ms: yes") == 2  # the query layer's


def test_bench_embeddings_counts_what_the_cache_kept_from_the_upstream() -> None:
    """bench_embeddings on a tiny corpus: the second pass sends nothing upstream and saves
    every token the first paid; the half-new pass sends only its new half."""
    argv = ["--texts", "40", "--batch", "10", "--rounds", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_embeddings", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = json.loads(proc.stdout)
    first, again, half = figures["first_pass"], figures["same_again"], figures["half_new"]
    assert first["sent_upstream"] == 40 and first["tokens_paid"] > 0
    assert again["sent_upstream"] == 0 and again["tokens_saved"] == first["tokens_paid"]
    assert half["sent_upstream"] == 20 and figures["lookups_per_s_batch_10"] > 0
