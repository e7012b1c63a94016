"""The ledger's rollups and the query layer on real databases (a SQLite file and
PostgreSQL): the rollups equal the sums of the raw rows however the rows come (in pieces,
twice, out of order, from writers at once), after a rebuild and after the migration that
creates them; the query layer's figures equal the raw rows' for any window and filters;
UTC days end at midnight UTC.

The expected figures are computed here from the generated rows by plain code of the test's
own (`Expected`), not by the code under test."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url

from router.catalog import load_catalog
from tests.ledger_db import (
    DATABASES,
    PAID_EMBEDDER,
    attempt,
    catalog,
    database,
    embedding_attempt,
    rows,
)
from workers.ledger.filters import Filters
from workers.ledger.query import Usage, percentile_ms, segments
from workers.ledger.rollup import latency_bucket, rebuild
from workers.ledger.rows import attempt_row
from workers.ledger.schema import (
    EMBEDDING_COUNTS,
    LATENCY_COLUMNS,
    ROLLUP_KEYS,
    SCHEMA_VERSION,
    attempts,
    escalations_daily,
    escalations_hourly,
    ledger_meta,
    usage_daily,
    usage_hourly,
)
from workers.ledger.store import Ledger, insert_rows
from workers.runtime.orphans import orphaned_attempt
from workers.state.inflight import Orphan

MODELS = (
    "zai/glm-4.7",
    "minimax/MiniMax-M2.1",
    "litellm/kimi",
    "openrouter/deepseek/deepseek-chat",
    "local/qwen3-mlx",
)
CLASSES = ("user_facing", "fast_general", "cost_free")
EMBEDDERS = ("local/qwen3-embedding", "ollama/nomic-embed-text", PAID_EMBEDDER)
APPS = (None, "billing", "newsroom")
ERRORS = ("timeout", "server_error", "rate_limited")
# Three days and a bit, starting an hour before a UTC midnight.
START = datetime(2026, 11, 2, 23, 0, tzinfo=UTC).timestamp()
SPAN_S = 3 * 86_400 + 7_200


@pytest.fixture(params=DATABASES)
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    with database(request.param, tmp_path) as url:
        opened = Ledger(url, redis_url=None, spool_dir=tmp_path / "spool")
        yield opened
        opened.close()


# --- generated ledgers ------------------------------------------------------------------


def random_job(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """One job's rows: 1 to 4 attempts (errors or skips, then an answer or a last error),
    sometimes orphaned calls; minutes apart, so some jobs straddle an hour or a day. A
    fifth are embedding jobs."""
    if rng.random() < 0.2:
        return random_embedding_job(rng, n)
    job_id = f"job-{n}"
    started = START + rng.random() * SPAN_S
    tries = []
    count = rng.choice((1, 1, 1, 2, 2, 3, 4))
    model = rng.choice(MODELS)
    for number in range(1, count + 1):
        if number > 1 and rng.random() < 0.7:
            model = rng.choice(MODELS)  # else: the same model again (a retry)
        last = number == count
        outcome = (
            ("ok" if rng.random() < 0.85 else "error")
            if last
            else rng.choice(("error", "error", "skipped"))
        )
        fields: dict[str, Any] = {
            "outcome": outcome,
            "started_at": started,
            "latency_ms": rng.lognormvariate(6, 1.5) if outcome != "skipped" else 0.0,
        }
        if outcome == "ok":
            fields |= {
                "prompt_tokens": rng.randint(1, 50_000),
                "completion_tokens": rng.randint(1, 4_000),
            }
            if rng.random() < 0.1:
                fields["tokens_estimated"] = True
            if rng.random() < 0.1:
                fields["provider_cost_usd"] = rng.random() / 100
        elif outcome == "error":
            fields["error_kind"] = rng.choice(ERRORS)
        else:
            fields["error_kind"] = "no_key"
        tries.append(attempt(number, model, **fields))
        started += rng.choice((0.5, 3.0, 40.0, 1_900.0))  # sometimes half an hour on
    job = {
        "id": job_id,
        "app": rng.choice(APPS),
        "focus": rng.choice((None, None, "data")),
        "profile": rng.choice((None, "routing")),
        "task_class": rng.choice(CLASSES),
        "source": rng.choice(("app", "app", "cron")),
    }
    built = rows(job_id, tries, job, task_class=job["task_class"], source=job["source"])
    for delivery in range(1, 3 if rng.random() < 0.1 else 1):
        lost = Orphan(
            f"0:{delivery}",
            0,
            delivery,
            1,
            rng.choice(MODELS),
            "subscription",
            "paid",
            rng.randint(100, 5_000),
            "w@h",
            START + rng.random() * SPAN_S,
        )
        built.append(attempt_row(orphaned_attempt(lost, None), job, catalog()))
    return built


def random_embedding_job(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """An embedding job's rows: perhaps a failed call (after the cache answered some of its
    inputs), then an answer wholly from the cache, in part, or not at all."""
    job_id = f"emb-{n}"
    started = START + rng.random() * SPAN_S
    inputs = rng.randint(1, 64)
    per_item = rng.randint(3, 400)
    tries = []
    for number in range(1, rng.choice((1, 1, 2)) + 1):
        model = rng.choice(EMBEDDERS)
        cached = rng.choice((0, inputs, rng.randint(0, inputs)))  # a miss, a hit, part
        fields: dict[str, Any] = {"started_at": started, "latency_ms": rng.uniform(1, 900)}
        if number == 1 and rng.random() < 0.3:  # the call failed: nothing embedded
            fields |= {"outcome": "error", "error_kind": "server_error"}
            tries.append(embedding_attempt(number, model, 0, cached, per_item, **fields))
        else:
            if cached < inputs and model == PAID_EMBEDDER and rng.random() < 0.3:
                fields["provider_cost_usd"] = rng.random() / 1000
            embedded = inputs - cached
            tries.append(embedding_attempt(number, model, embedded, cached, per_item, **fields))
            break
        started += rng.choice((0.5, 40.0, 1_900.0))
    job = {"id": job_id, "app": rng.choice(APPS), "task_class": "embedding", "source": "app"}
    return rows(job_id, tries, job, task_class="embedding", source="app")


def deliveries(rng: random.Random, jobs: list[list[dict[str, Any]]]) -> list[list[dict]]:
    """The batches a writer might get: each job whole, or in pieces (its orphans first,
    its first attempts first, its last first), some pieces twice, some twice in a batch."""
    entries: list[list[dict]] = []
    for job in jobs:
        tries = [r for r in job if r["outcome"] != "orphaned"]
        orphans = [r for r in job if r["outcome"] == "orphaned"]
        mode = rng.random()
        if orphans:
            entries.append(orphans)
        if mode < 0.7 or len(tries) == 1:
            entries.append(tries)
        elif mode < 0.85:
            entries.extend([tries[:1], tries])  # a partial replay, then the whole
        else:
            entries.extend([tries[-1:], tries])  # the last attempt first
        if rng.random() < 0.15:
            entries.append(rng.choice(entries))  # a redelivery
    rng.shuffle(entries)
    batches, i = [], 0
    while i < len(entries):
        size = rng.randint(1, 25)
        batch = [row for entry in entries[i : i + size] for row in entry]
        if batch and rng.random() < 0.1:
            batch += batch[: rng.randint(1, len(batch))]  # the same rows twice in a batch
        batches.append(batch)
        i += size
    return batches


def generated(seed: int, jobs: int = 300) -> tuple[list[dict], list[list[dict]]]:
    rng = random.Random(seed)
    made = [random_job(rng, n) for n in range(jobs)]
    return [row for job in made for row in job], deliveries(rng, made)


# --- the expected figures, computed plainly ----------------------------------------------


def hour(row: dict) -> int:
    return int(row["started_at"].timestamp()) // 3600


def key(row: dict) -> tuple:
    return (hour(row), *(row[k] or "" for k in ROLLUP_KEYS))


@dataclass
class Expected:
    """The rollups' content, from the rows by the definitions in docs/architecture.md."""

    usage: dict[tuple, dict[str, float]] = field(default_factory=dict)
    escalations: dict[tuple, int] = field(default_factory=lambda: defaultdict(int))

    @classmethod
    def of(cls, all_rows: list[dict]) -> Expected:
        unique = {(r["job_id"], r["attempt"]): r for r in reversed(all_rows)}  # first wins
        expected = cls()
        by_job: dict[str, list[dict]] = defaultdict(list)
        for row in unique.values():
            sums = expected.at(key(row))
            sums["attempts"] += 1
            sums["prompt_tokens"] += row["prompt_tokens"]
            sums["completion_tokens"] += row["completion_tokens"]
            sums["tokens_estimated"] += row["tokens_estimated"]
            sums["cost_usd"] += row["cost_usd"]
            for name in ("items", "cached_items", "cached_tokens"):
                sums[name] += row[name]
            sums["cache_saved_usd"] += cache_saved(row)
            if row["outcome"] in ("ok", "error"):
                sums["latency_ms_sum"] += row["latency_ms"]
                sums[LATENCY_COLUMNS[latency_bucket(row["latency_ms"])]] += 1
            if row["outcome"] != "orphaned":
                by_job[row["job_id"]].append(row)
        for tries in by_job.values():
            tries.sort(key=lambda r: r["attempt"])
            final = expected.at(key(tries[-1]))
            final["jobs"] += 1
            final["escalated_jobs"] += tries[-1]["model"] != tries[0]["model"]
            for a, b in pairwise(tries):
                if a["model"] != b["model"]:
                    reason = a["error_kind"] or a["outcome"]
                    to = (hour(b), b["task_class"], b["app"] or "", a["model"], b["model"], reason)
                    expected.escalations[to] += 1
        return expected

    def at(self, k: tuple) -> dict[str, float]:
        return self.usage.setdefault(k, defaultdict(float))


def cache_saved(row: dict) -> float:
    """The cached tokens at the row's prompt price, or at what its call paid a prompt token
    when the provider gave the cost."""
    if row["usd_per_mtok_in"] is not None:
        return row["cached_tokens"] * row["usd_per_mtok_in"] / 1e6
    return (
        row["cost_usd"] / row["prompt_tokens"] * row["cached_tokens"] if row["prompt_tokens"] else 0
    )


def stored_rollups(ledger: Ledger) -> tuple[dict, dict, dict, dict]:
    """The rollup tables' rows that are not all zero: usage hourly and daily, escalations
    hourly and daily."""

    def read(table, grain: str) -> dict:
        keys = (grain, *ROLLUP_KEYS)
        with ledger.engine.connect() as conn:
            found = conn.execute(select(table)).mappings().all()
        measures = [c.name for c in table.columns if c.name not in keys]
        return {
            tuple(r[k] for k in keys): {m: r[m] for m in measures if r[m]}
            for r in found
            if any(r[m] for m in measures)
        }

    def counts(table) -> dict:
        with ledger.engine.connect() as conn:
            return {tuple(r[:-1]): r[-1] for r in conn.execute(select(table)) if r[-1]}

    return (
        read(usage_hourly, "hour"),
        read(usage_daily, "day"),
        counts(escalations_hourly),
        counts(escalations_daily),
    )


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == {k for k, v in want.items() if any(v.values())}
    for k, sums in got.items():  # no measure the rows do not have
        assert {name for name, value in sums.items() if value} <= set(want[k]), k
    for k, sums in want.items():
        for name, value in sums.items():
            assert got[k].get(name, 0) == pytest.approx(value, rel=1e-9, abs=1e-9), (k, name)


def by_day(hourly: dict) -> dict:
    days: dict[tuple, dict[str, float]] = {}
    for (h, *rest), sums in hourly.items():
        day = days.setdefault((h // 24, *rest), defaultdict(float))
        for name, value in sums.items():
            day[name] += value
    return days


def assert_rollups_are(ledger: Ledger, expected: Expected) -> None:
    hourly, daily, escalations, escalations_by_day = stored_rollups(ledger)
    assert_same(hourly, expected.usage)
    assert_same(daily, by_day(expected.usage))
    assert escalations == {k: v for k, v in expected.escalations.items() if v}
    days: dict[tuple, int] = defaultdict(int)
    for (h, *rest), n in expected.escalations.items():
        days[(h // 24, *rest)] += n
    assert escalations_by_day == {k: v for k, v in days.items() if v}


# --- the rollups equal the rows ----------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rollups_equal_the_raw_rows_however_they_came(ledger: Ledger, seed: int) -> None:
    # Given random jobs (retries, escalations, skips, orphans, several apps, hours and
    # days) delivered in pieces, twice, out of order, duplicated within a batch
    all_rows, batches = generated(seed)
    inserted = sum(ledger.insert(batch) for batch in batches)
    # Then each row was counted once, and the rollups hold the raw rows' sums
    expected = Expected.of(all_rows)
    assert inserted == ledger.count() == sum(s["attempts"] for s in expected.usage.values())
    assert_rollups_are(ledger, expected)
    # And a rebuild, whole or from a day on, gives the same rows
    assert rebuild(ledger) == ledger.count()
    assert_rollups_are(ledger, expected)
    rebuild(ledger, since=datetime.fromtimestamp(START + 86_400 + 5_000, UTC))
    assert_rollups_are(ledger, expected)


def test_a_rebuild_flushing_as_it_goes_gives_the_same_rows(ledger: Ledger) -> None:
    from workers.ledger.rollup import rebuild_in

    all_rows, batches = generated(4, jobs=120)
    for batch in batches:
        ledger.insert(batch)
    with ledger.engine.connect() as conn:
        conn.execution_options(ledger_write=True)
        with conn.begin():
            rebuild_in(conn, flush_keys=7)  # written every 7 keys, read on meanwhile
    assert_rollups_are(ledger, Expected.of(all_rows))


def test_a_rollup_that_fell_behind_is_rebuilt_to_the_rows(ledger: Ledger) -> None:
    # Given a ledger whose rollups lost rows and gained others (written around the writer)
    all_rows, batches = generated(5, jobs=80)
    for batch in batches:
        ledger.insert(batch)
    with ledger.engine.begin() as conn:
        conn.execute(usage_hourly.delete().where(usage_hourly.c.hour % 3 == 0))
        conn.execute(update(usage_daily).values(jobs=usage_daily.c.jobs + 5))
        conn.execute(escalations_hourly.delete())
        conn.execute(escalations_daily.delete().where(escalations_daily.c.day % 2 == 0))
    # When it is rebuilt, then it is the rows' sums again
    rebuild(ledger)
    assert_rollups_are(ledger, Expected.of(all_rows))


def test_writers_at_once_count_each_row_and_each_job_once(ledger: Ledger) -> None:
    # Given four writers inserting the same jobs at once, each in its own pieces and order
    all_rows, _ = generated(6, jobs=150)
    jobs: dict[str, list[dict]] = defaultdict(list)
    for row in all_rows:
        jobs[row["job_id"]].append(row)
    plans = [deliveries(random.Random(seed), list(jobs.values())) for seed in range(4)]
    url = ledger.url.render_as_string(hide_password=False)
    writers = [Ledger(url, redis_url=None) for _ in plans]
    go = threading.Barrier(len(plans))
    failures: list[BaseException] = []

    def write(writer: Ledger, batches: list[list[dict]]) -> None:
        go.wait()
        try:
            for batch in batches:
                writer.insert(batch)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [
        threading.Thread(target=write, args=(w, p)) for w, p in zip(writers, plans, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        w.close()
    assert failures == []
    # Then the rollups hold each row once and each job once
    assert_rollups_are(ledger, Expected.of(all_rows))


def test_two_writers_with_different_rows_of_one_job_count_it_once(tmp_path: Path) -> None:
    # Given a writer that has inserted the first two attempts of a job, not yet committed
    tries = [
        attempt(1, "zai/glm-4.7", outcome="error", error_kind="timeout"),
        attempt(2, "minimax/MiniMax-M2.1", outcome="error", error_kind="server_error"),
        attempt(3, "litellm/kimi", prompt_tokens=10),
    ]
    job = rows("split", tries)
    with database("postgresql", tmp_path) as url:
        name = f"rollup-test-{uuid.uuid4().hex[:8]}"
        first = Ledger(url, redis_url=None)
        second = Ledger(
            make_url(url).update_query_dict({"application_name": name}).render_as_string(False),
            redis_url=None,
        )
        first.ensure_schema()
        with first.engine.connect() as conn:
            conn.execution_options(ledger_write=True)
            with conn.begin():
                insert_rows(conn, job[:2])
                # When another writer inserts the job's third attempt meanwhile (no row in
                # common: nothing makes it wait but the rollups' lock)
                done = threading.Thread(target=second.insert, args=(job[2:],))
                done.start()
                deadline = time.monotonic() + 10
                while done.is_alive() and not waiting(first, name):
                    assert time.monotonic() < deadline, "the second writer neither waited nor ended"
                    time.sleep(0.01)
        done.join(10)
        # Then the job counts once, under its final attempt
        assert Usage(first).tiers() == [
            {
                "tier": "paid",
                "jobs": 1,
                "answered": 1,
                "failed": 0,
                "escalated_jobs": 1,
                "share": 1.0,
            }
        ]
        assert len(Usage(first).escalations()) == 2
        first.close()
        second.close()


def waiting(ledger: Ledger, application_name: str) -> bool:
    """Whether the session of that name waits on a lock (read afresh: a transaction sees
    one snapshot of pg_stat_activity)."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = :name AND wait_event_type = 'Lock'"
    )
    with ledger.engine.connect() as probe:
        return bool(probe.execute(query, {"name": application_name}).scalar())


def test_the_rollup_migration_fills_the_rollups_from_the_rows(
    ledger: Ledger, tmp_path: Path
) -> None:
    # Given a version-4 ledger (no rollup tables, no embedding columns) with rows
    all_rows, batches = generated(7, jobs=100)
    all_rows = [{**r, **dict.fromkeys(EMBEDDING_COUNTS, 0)} for r in all_rows]
    for batch in batches:
        ledger.insert([{**r, **dict.fromkeys(EMBEDDING_COUNTS, 0)} for r in batch])
    with ledger.engine.begin() as conn:
        for table in ("usage_hourly", "usage_daily", "escalations_hourly", "escalations_daily"):
            conn.execute(text(f"DROP TABLE {table}"))
        for column in EMBEDDING_COUNTS:
            conn.execute(text(f"ALTER TABLE attempts DROP COLUMN {column}"))
        conn.execute(update(ledger_meta).values(schema_version=4))
    # When this version opens it
    url = ledger.url.render_as_string(hide_password=False)
    upgraded = Ledger(url, redis_url=None, spool_dir=tmp_path)
    upgraded.ensure_schema()
    # Then its rollups hold its rows' sums, and it is the current version
    assert_rollups_are(upgraded, Expected.of(all_rows))
    with upgraded.engine.connect() as conn:
        assert conn.execute(select(ledger_meta.c.schema_version)).scalar() == SCHEMA_VERSION
    upgraded.close()


def test_the_embedding_migration_adds_the_columns_and_keeps_the_rows(
    ledger: Ledger, tmp_path: Path
) -> None:
    # Given a version-5 ledger (no embedding columns in the rows or the rollups) with rows
    all_rows, batches = generated(9, jobs=100)
    old = [r for r in all_rows if r["task_class"] != "embedding"]
    for batch in batches:
        ledger.insert([r for r in batch if r["task_class"] != "embedding"])
    with ledger.engine.begin() as conn:
        for column in EMBEDDING_COUNTS:
            conn.execute(text(f"ALTER TABLE attempts DROP COLUMN {column}"))
        for table in ("usage_hourly", "usage_daily"):
            for column in (*EMBEDDING_COUNTS, "cache_saved_usd"):
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(update(ledger_meta).values(schema_version=5))
    # When this version opens it and records embedding jobs
    url = ledger.url.render_as_string(hide_password=False)
    upgraded = Ledger(url, redis_url=None, spool_dir=tmp_path)
    new = [r for r in all_rows if r["task_class"] == "embedding"]
    assert upgraded.insert(new) == len(new)
    # Then the old rows are kept, with no embedding figures, and the rollups hold every
    # row's sums, the old and the new
    with upgraded.engine.connect() as conn:
        assert conn.execute(select(ledger_meta.c.schema_version)).scalar() == SCHEMA_VERSION
        stored = conn.execute(select(attempts).where(attempts.c.task_class != "embedding"))
        kept = {(r.job_id, r.attempt): r for r in stored}
    assert set(kept) == {(r["job_id"], r["attempt"]) for r in old}
    assert {(r.items, r.cached_items, r.cached_tokens) for r in kept.values()} == {(0, 0, 0)}
    assert_rollups_are(upgraded, Expected.of(all_rows))
    rebuild(upgraded)
    assert_rollups_are(upgraded, Expected.of(all_rows))
    assert Usage(upgraded).totals()["cached_items"] == sum(
        r["cached_items"] for r in new if r["outcome"] == "ok"
    )
    upgraded.close()


# --- the query layer equals the rows -----------------------------------------------------


def expected_by(
    all_rows: list[dict], filters: Filters, by: tuple[str, ...]
) -> dict[tuple, dict[str, float]]:
    """What Usage.by(*by) must say, from the rows alone."""
    unique = {(r["job_id"], r["attempt"]): r for r in reversed(all_rows)}

    def counts(row: dict) -> bool:
        when = row["started_at"]
        return (
            (filters.since is None or when >= filters.since)
            and (filters.until is None or when < filters.until)
            and filters.task_class in (None, row["task_class"])
            and filters.app in (None, row["app"])
            and filters.model in (None, row["model"])
        )

    def group(row: dict) -> tuple:
        labels = {
            "day": row["started_at"].strftime("%Y-%m-%d"),
            "hour": row["started_at"].strftime("%Y-%m-%dT%H:00Z"),
        }
        return tuple(labels.get(k, row.get(k)) for k in by)

    out: dict[tuple, dict[str, float]] = {}
    jobs: dict[str, list[dict]] = defaultdict(list)
    for row in unique.values():
        if row["outcome"] != "orphaned":
            jobs[row["job_id"]].append(row)
        if not counts(row):
            continue
        sums = out.setdefault(group(row), defaultdict(float))
        sums["attempts"] += 1
        sums["prompt_tokens"] += row["prompt_tokens"]
        sums["completion_tokens"] += row["completion_tokens"]
        if row["task_class"] == "embedding":
            sums["embedding_tokens"] += row["prompt_tokens"]
        sums["cost_usd"] += row["cost_usd"]
        sums["orphaned"] += row["outcome"] == "orphaned"
        sums["errors"] += row["outcome"] == "error"
        if row["outcome"] == "ok":  # the cache's figures are the answers'
            sums["embedded_items"] += row["items"]
            sums["cached_items"] += row["cached_items"]
            sums["cached_tokens"] += row["cached_tokens"]
            sums["cache_saved_usd"] += cache_saved(row)
    for tries in jobs.values():
        final = max(tries, key=lambda r: r["attempt"])
        if counts(final):
            out[group(final)]["jobs"] += 1
            out[group(final)]["answered"] += final["outcome"] == "ok"
    return out


WINDOWS = [
    Filters(),
    Filters(since=datetime.fromtimestamp(START + 4_321.5, UTC)),  # mid-hour, open-ended
    Filters(  # mid-hour to mid-hour across days
        since=datetime.fromtimestamp(START + 1_000, UTC),
        until=datetime.fromtimestamp(START + 2 * 86_400 + 2_345.25, UTC),
    ),
    Filters(  # within one hour
        since=datetime.fromtimestamp(START + 86_400 + 600, UTC),
        until=datetime.fromtimestamp(START + 86_400 + 2_400, UTC),
    ),
    Filters.days(date(2026, 11, 3), date(2026, 11, 4)),
    Filters(until=datetime.fromtimestamp(START + 30_000, UTC), app="billing"),
    Filters(since=datetime.fromtimestamp(START + 7_777, UTC), task_class="cost_free"),
    Filters(model="litellm/kimi", since=datetime.fromtimestamp(START + 100, UTC)),
    Filters(task_class="embedding", since=datetime.fromtimestamp(START + 50_000.5, UTC)),
    Filters(model=PAID_EMBEDDER, until=datetime.fromtimestamp(START + 2 * 86_400 + 60, UTC)),
]


@pytest.mark.parametrize("filters", WINDOWS, ids=range(len(WINDOWS)))
def test_the_query_layer_gives_the_raw_rows_figures(ledger: Ledger, filters: Filters) -> None:
    all_rows, batches = generated(8, jobs=250)
    for batch in batches:
        ledger.insert(batch)
    usage = Usage(ledger, filters, load_catalog())
    for by in [("model",), ("day", "tier"), ("hour",), ("app", "outcome"), ()]:
        want = expected_by(all_rows, filters, by)
        got = usage.by(*by) if by else [usage.totals()]
        assert {tuple(r[k] for k in by) for r in got} == set(want), by
        for row in got:
            sums = want[tuple(row[k] for k in by)]
            for name in ("attempts", "jobs", "answered", "prompt_tokens", "completion_tokens"):
                assert row[name] == sums[name], (by, row)
            assert row["orphaned"] == sums["orphaned"] and row["errors"] == sums["errors"]
            assert row["cost_usd"] == pytest.approx(sums["cost_usd"], abs=1e-8)
            embedded, cached = sums["embedded_items"], sums["cached_items"]
            assert (row["embedded_items"], row["cached_items"]) == (embedded, cached), row
            rate = cached / (cached + embedded) if cached + embedded else None
            assert row["cache_hit_rate"] == pytest.approx(rate), row
            assert row["cached_tokens"] == sums["cached_tokens"]
            assert row["cache_saved_usd"] == pytest.approx(sums["cache_saved_usd"], abs=1e-8)
            # the saving: chat tokens at litellm/kimi's prices, embedding tokens at
            # openai/text-embedding-3-small's
            chat_in = sums["prompt_tokens"] - sums["embedding_tokens"]
            reference = chat_in * 0.56 + sums["completion_tokens"] * 2.94
            reference += sums["embedding_tokens"] * 0.02
            saving = reference / 1e6 - sums["cost_usd"]
            assert row["saving_usd"] == pytest.approx(saving, abs=1e-8), row
            assert row["cache_saved_vs_reference_usd"] == pytest.approx(
                sums["cached_tokens"] * 0.02 / 1e6, abs=1e-8
            )
        # Jobs add up: each is counted once, in the group of its final attempt
        assert sum(r["jobs"] for r in got) == usage.totals()["jobs"]
    # And the embedding cache's rows are the groups of models whose answers embedded
    want = expected_by(all_rows, filters, ("model",))
    cache = {r["model"]: r for r in usage.embedding_cache()}
    assert set(cache) == {m for (m,), v in want.items() if v["embedded_items"] + v["cached_items"]}
    for model, row in cache.items():
        assert row["cached_tokens"] == want[(model,)]["cached_tokens"]


def test_segments_cover_the_window_once() -> None:
    def h(year: int, month: int, day: int, hour: int = 0) -> int:
        return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp()) // 3600

    at = datetime(2026, 11, 3, 22, 17, 5, 123, tzinfo=UTC)
    got = segments(at, at + timedelta(days=2, hours=3))
    assert [(s.grain, s.lo, s.hi) for s in got] == [
        ("raw", at, datetime(2026, 11, 3, 23, tzinfo=UTC)),
        ("hour", h(2026, 11, 3, 23), h(2026, 11, 4)),
        ("day", h(2026, 11, 4) // 24, h(2026, 11, 6) // 24),  # the 4th and the 5th
        ("hour", h(2026, 11, 6), h(2026, 11, 6, 1)),
        ("raw", datetime(2026, 11, 6, 1, tzinfo=UTC), at + timedelta(days=2, hours=3)),
    ]
    assert [s.grain for s in segments(None, None)] == ["day"]
    assert [s.grain for s in segments(at, None, days=False)] == ["raw", "hour"]
    assert segments(at, at) == []
    assert [s.grain for s in segments(at, at + timedelta(minutes=5))] == ["raw"]
    midnight = datetime(2026, 11, 4, tzinfo=UTC)
    assert [(s.grain, s.lo, s.hi) for s in segments(midnight, midnight + timedelta(days=1))] == [
        ("day", h(2026, 11, 4) // 24, h(2026, 11, 5) // 24)
    ]


# --- UTC days ----------------------------------------------------------------------------


def test_a_utc_day_holds_its_own_spend_and_no_other(ledger: Ledger) -> None:
    # Given a paid call a microsecond before midnight UTC and another at midnight
    midnight = datetime(2026, 11, 4, tzinfo=UTC)
    before, at = midnight - timedelta(microseconds=1), midnight

    def paid(job_id: str, when: datetime, tokens: int) -> list[dict]:
        call = attempt(1, "litellm/kimi", prompt_tokens=tokens, started_at=when.timestamp())
        return rows(job_id, [call], {"app": "billing"})

    ledger.insert([*paid("late", before, 1_000_000), *paid("early", at, 2_000_000)])
    # Then each day has its own, whether read from the day rollup or cut from the rows
    assert rows_by_day(Usage(ledger)) == {"2026-11-03": 0.56, "2026-11-04": 1.12}
    only_the_4th = Usage(ledger, Filters.days(date(2026, 11, 4)))
    assert only_the_4th.totals()["cost_usd"] == pytest.approx(1.12)
    assert rows_by_day(only_the_4th) == {"2026-11-04": 1.12}
    only_the_3rd = Usage(ledger, Filters.days(date(2026, 11, 3)))
    assert rows_by_day(only_the_3rd) == {"2026-11-03": 0.56}
    # And a local midnight elsewhere is not a UTC day: 00:00+02:00 is 22:00 UTC the day before
    local = Usage(ledger, Filters(since=datetime.fromisoformat("2026-11-04T00:00:00+02:00")))
    assert rows_by_day(local) == {"2026-11-03": 0.56, "2026-11-04": 1.12}
    hours = {r["hour"]: r["jobs"] for r in Usage(ledger).by("hour")}
    assert hours == {"2026-11-03T23:00Z": 1, "2026-11-04T00:00Z": 1}


def rows_by_day(usage: Usage) -> dict[str, float]:
    return {r["day"]: round(r["cost_usd"], 9) for r in usage.by("day")}


# --- latency, tiers, escalations --------------------------------------------------------


def test_latency_tiers_and_escalations_of_known_jobs(ledger: Ledger) -> None:
    now = datetime.now(UTC).timestamp() - 60
    jobs = []
    for n in range(100):  # kimi answers in n + 1 ms: 1 to 100 ms
        jobs += rows(f"k{n}", [attempt(1, "litellm/kimi", latency_ms=n + 1.0, started_at=now)])
    for n in range(10):  # glm times out, then the free model answers
        tries = [
            attempt(1, "zai/glm-4.7", outcome="error", error_kind="timeout", started_at=now),
            attempt(2, "openrouter/deepseek/deepseek-chat", started_at=now + 1),
        ]
        jobs += rows(f"e{n}", tries, {"app": "billing"})
    ledger.insert(jobs)
    usage = Usage(ledger, Filters(since=datetime.fromtimestamp(now - 3600, UTC)))

    latency = {r["model"]: r for r in usage.latency()}
    kimi = latency["litellm/kimi"]
    assert (kimi["calls"], kimi["errors"], kimi["error_rate"]) == (100, 0, 0.0)
    assert kimi["mean_ms"] == pytest.approx(50.5)
    for q, exact in (("p50_ms", 50), ("p95_ms", 95), ("p99_ms", 99)):
        assert kimi[q] == pytest.approx(exact, rel=0.2), q  # a sixth of a decade wide
    glm = latency["zai/glm-4.7"]
    assert (glm["calls"], glm["errors"], glm["error_rate"], glm["p50_ms"]) == (10, 10, 1.0, None)

    tiers = {r["tier"]: r for r in usage.tiers()}
    assert set(tiers) == {"free", "paid"}  # subscription ended no job
    assert (tiers["paid"]["jobs"], tiers["paid"]["share"]) == (100, pytest.approx(100 / 110))
    assert (tiers["free"]["answered"], tiers["free"]["escalated_jobs"]) == (10, 10)

    assert usage.escalations() == [
        {
            "from_model": "zai/glm-4.7",
            "to_model": "openrouter/deepseek/deepseek-chat",
            "reason": "timeout",
            "escalations": 10,
        }
    ]
    assert Usage(ledger, Filters(app="newsroom")).escalations() == []
    assert Usage(ledger, Filters(model="zai/glm-4.7")).escalations()[0]["escalations"] == 10
    page = usage.page()
    assert page["totals"]["jobs"] == 110 and page["escalations"] == usage.escalations()
    assert {r["app"] for r in page["by_app"]} == {None, "billing"}


def test_percentiles_from_a_histogram() -> None:
    buckets = [0] * len(LATENCY_COLUMNS)
    assert percentile_ms(buckets, 0.5) is None
    buckets[latency_bucket(250.0)] = 10
    median = percentile_ms(buckets, 0.5)
    assert median is not None and 215 <= median <= 316  # within 250 ms's bucket
    buckets[-1] = 1_000  # past the last bound
    assert percentile_ms(buckets, 0.99) == 1_000_000
