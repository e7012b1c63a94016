"""The usage ledger on real databases (a SQLite file and PostgreSQL): costs, exactly-once
recording, concurrent writers, outages spooled to Redis (or a file) and drained back, and
the rows the real fleet writes for its jobs."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, text, update

from client import dispatch
from router import load_catalog
from router.catalog import default_catalog_path
from router.errors import ConfigError
from tests.ledger_db import (
    DATABASES,
    attempt,
    database,
    embedding_attempt,
    rows,
    simple_rows,
    write_concurrently,
)
from workers.ledger.rows import encode_rows
from workers.ledger.schema import EMBEDDING_COUNTS, SCHEMA_VERSION, attempts, ledger_meta
from workers.ledger.store import CLAIM_PREFIX, CLAIMS_KEY, SPOOL_KEY, Ledger, database_url
from workers.ops.redis_server import RedisServer, free_port
from workers.state.connections import script

KIMI_IN, KIMI_OUT = 0.56, 2.94
SPOOL_DB = 7  # the tests' spool: not the test fleet's db 0, whose workers drain their own


@pytest.fixture(params=DATABASES)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as db_url:
        yield db_url


@pytest.fixture
def spool(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{SPOOL_DB}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def spool_url(spool: redis.Redis, redis_server: RedisServer) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{SPOOL_DB}"


def open_ledger(url: str, tmp_path: Path, **options) -> Ledger:
    return Ledger(url, **{"redis_url": None, "spool_dir": tmp_path / "spool", **options})


def stored(ledger: Ledger, job_id: str | None = None) -> list[dict]:
    query = select(attempts).order_by(attempts.c.job_id, attempts.c.attempt)
    if job_id is not None:
        query = query.where(attempts.c.job_id == job_id)
    ledger.ensure_schema()
    with ledger.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


# --- cost ------------------------------------------------------------------------------


def test_paid_attempt_costs_tokens_times_catalog_price(url: str, tmp_path: Path) -> None:
    ledger = open_ledger(url, tmp_path)
    tries = [attempt(1, "litellm/kimi", prompt_tokens=12_345, completion_tokens=6_789)]
    ledger.record(rows("paid", tries, {"profile": "routing", "focus": "orchestrator"}))
    (row,) = stored(ledger)
    assert row["cost_usd"] == pytest.approx((12_345 * KIMI_IN + 6_789 * KIMI_OUT) / 1e6, abs=1e-12)
    assert (row["cost_source"], row["usd_per_mtok_in"], row["usd_per_mtok_out"]) == (
        "catalog",
        KIMI_IN,
        KIMI_OUT,
    )
    assert (row["model"], row["provider"], row["tier"], row["queue"]) == (
        "litellm/kimi",
        "litellm",
        "paid",
        "subscription",
    )
    assert (row["profile"], row["focus"], row["task_class"], row["source"]) == (
        "routing",
        "orchestrator",
        "user_facing",
        "app",
    )
    assert (row["prompt_tokens"], row["completion_tokens"], row["outcome"]) == (12_345, 6_789, "ok")
    started = tries[0].started_at
    got = row["started_at"].replace(tzinfo=row["started_at"].tzinfo or UTC)
    assert got == datetime.fromtimestamp(started, UTC)
    assert (row["finished_at"] - row["started_at"]).total_seconds() == pytest.approx(0.25)
    ledger.close()


def test_provider_cost_wins_over_the_catalog() -> None:
    tries = [
        attempt(
            1, "litellm/kimi", prompt_tokens=1000, completion_tokens=1000, provider_cost_usd=0.5
        ),
        attempt(2, "openrouter/deepseek/deepseek-chat", prompt_tokens=10, provider_cost_usd=0.001),
    ]
    paid, free = rows("j", tries)
    assert (paid["cost_usd"], paid["cost_source"], paid["usd_per_mtok_in"]) == (
        0.5,
        "provider",
        None,
    )
    assert (free["cost_usd"], free["cost_source"]) == (0.001, "provider")


@pytest.mark.parametrize(
    ("model", "tier", "source"),
    [
        ("zai/glm-4.7", "subscription", "subscription"),
        ("openrouter/meta-llama/llama-3.1-405b-instruct:free", "free", "free"),
        ("litellm/qwen3-next-free", "free", "free"),
        ("local/qwen3-mlx", "local", "free"),
    ],
)
def test_subscription_free_and_local_attempts_cost_nothing(model, tier, source) -> None:
    (row,) = rows("j", [attempt(1, model, prompt_tokens=50_000, completion_tokens=9_000)])
    assert (row["tier"], row["cost_usd"], row["cost_source"]) == (tier, 0.0, source)
    assert (row["usd_per_mtok_in"], row["usd_per_mtok_out"]) == (0.0, 0.0)


def test_a_paid_model_without_a_price_cannot_exist(tmp_path: Path) -> None:
    text = default_catalog_path().read_text()
    broken = tmp_path / "catalog.yaml"
    broken.write_text(text.replace("usd_per_mtok_out: 2.94", "usd_per_mtok_out: 0"))
    with pytest.raises(ConfigError, match="a paid model needs"):
        load_catalog(broken)


# --- exactly once ------------------------------------------------------------------------


def test_a_redelivered_job_is_recorded_once(url: str, tmp_path: Path) -> None:
    ledger = open_ledger(url, tmp_path)
    job = simple_rows("redelivered", 3)
    ledger.record(job)
    ledger.record(job)  # the same task delivered again
    ledger.record(simple_rows("redelivered", 3)[:2])  # or a partial replay
    assert [(r["job_id"], r["attempt"]) for r in stored(ledger)] == [
        ("redelivered", 1),
        ("redelivered", 2),
        ("redelivered", 3),
    ]
    assert ledger.count() == 3 and ledger.pending() == 0
    ledger.close()


def test_urls_and_schema_version(url: str, tmp_path: Path) -> None:
    assert database_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert database_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    with pytest.raises(ConfigError, match="valid: sqlite, postgresql"):
        database_url("mysql://u@h/db")
    ledger = open_ledger(url, tmp_path)
    ledger.ensure_schema()
    ledger.ensure_schema()
    with ledger.engine.begin() as conn:
        assert conn.execute(select(ledger_meta.c.schema_version)).scalars().all() == [
            SCHEMA_VERSION
        ]
        conn.execute(update(ledger_meta).values(schema_version=99))
    ledger.close()
    newer = open_ledger(url, tmp_path)
    newer_than = f"schema version 99, newer than this modelfleet's {SCHEMA_VERSION}"
    with pytest.raises(ConfigError, match=newer_than):
        newer.ensure_schema()
    newer.record(simple_rows("kept"))  # refused, but neither raised nor lost
    assert newer.pending() == 1
    newer.close()


def test_a_version_1_ledger_is_upgraded_and_keeps_its_rows(url: str, tmp_path: Path) -> None:
    # Given a ledger written by the first version (no app column, no app_keys table)
    ledger = open_ledger(url, tmp_path)
    ledger.record(simple_rows("old", 2))
    with ledger.engine.begin() as conn:
        conn.execute(text("DROP TABLE app_keys"))
        for column in ("app", "tools", "json_schema"):
            conn.execute(text(f"ALTER TABLE attempts DROP COLUMN {column}"))
        conn.execute(update(ledger_meta).values(schema_version=1))
    ledger.close()
    # When this version opens it
    upgraded = open_ledger(url, tmp_path)
    upgraded.record([{**row, "app": "billing"} for row in simple_rows("new", 1)])
    # Then the old rows are there, the new ones carry their app, and the version is 4
    with upgraded.engine.connect() as conn:
        apps = conn.execute(select(attempts.c.job_id, attempts.c.app)).all()
        assert sorted(apps) == [("new", "billing"), ("old", None), ("old", None)]
        assert conn.execute(select(ledger_meta.c.schema_version)).scalar() == SCHEMA_VERSION
    upgraded.close()


def test_a_version_2_ledger_gains_the_tools_and_json_schema_columns(
    url: str, tmp_path: Path
) -> None:
    # Given a ledger of version 2 (no tools or json_schema column) with rows
    ledger = open_ledger(url, tmp_path)
    ledger.record(simple_rows("old", 1))
    with ledger.engine.begin() as conn:
        conn.execute(text("ALTER TABLE attempts DROP COLUMN tools"))
        conn.execute(text("ALTER TABLE attempts DROP COLUMN json_schema"))
        conn.execute(text("ALTER TABLE app_keys DROP COLUMN admin"))
        conn.execute(update(ledger_meta).values(schema_version=2))
    ledger.close()
    # When this version opens it and records an attempt that used tools
    upgraded = open_ledger(url, tmp_path)
    upgraded.record([{**row, "tools": True, "json_schema": False} for row in simple_rows("new", 1)])
    # Then the old row says nothing of tools (NULL), the new one what it used
    with upgraded.engine.connect() as conn:
        used = conn.execute(
            select(attempts.c.job_id, attempts.c.tools, attempts.c.json_schema)
        ).all()
        assert sorted(used) == [("new", True, False), ("old", None, None)]
        assert conn.execute(select(ledger_meta.c.schema_version)).scalar() == SCHEMA_VERSION
    upgraded.close()


# --- concurrency -------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_writer_processes_and_threads_lose_nothing(url: str, tmp_path: Path) -> None:
    procs, threads, batches = 4, 4, 25
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded pytest
    out = ctx.Queue()
    start_at = time.time() + 3  # after every process has imported and prepared its rows
    workers = [
        ctx.Process(
            target=write_concurrently,
            args=(url, str(tmp_path / f"spool-{p}"), p, threads, batches, start_at, out),
        )
        for p in range(procs)
    ]
    for w in workers:
        w.start()
    reports = [out.get(timeout=90) for _ in workers]
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    for proc, written, pending, warnings in reports:
        assert (pending, warnings) == (0, []), f"writer {proc}"
        assert written == threads * batches * 3
    ledger = open_ledger(url, tmp_path)
    keys = {(r["job_id"], r["attempt"]) for r in stored(ledger)}
    expected = {
        (f"p{p}-t{t}-b{b}", n)
        for p in range(procs)
        for t in range(threads)
        for b in range(batches)
        for n in (1, 2, 3)
    }
    assert keys == expected
    assert ledger.count() == len(expected) == 1200
    ledger.close()


# --- outages -----------------------------------------------------------------------------


def test_sqlite_outage_spools_to_redis_and_a_later_record_drains_once(
    tmp_path: Path, spool: redis.Redis, spool_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "db" / "ledger.db"
    path.mkdir(parents=True)  # a directory where the database file should be: unavailable
    ledger = open_ledger(f"sqlite:///{path}", tmp_path, redis_url=spool_url, retry_db_after_s=0)
    with caplog.at_level(logging.WARNING, logger="workers.ledger.store"):
        ledger.record(simple_rows("a"))
        ledger.record(simple_rows("b", 2))
    assert spool.llen(SPOOL_KEY) == 2 and ledger.pending() == 2
    assert "unavailable" in caplog.text
    path.rmdir()  # the database is back
    ledger.record(simple_rows("c", 1))
    assert spool.llen(SPOOL_KEY) == 0 and ledger.pending() == 0
    got = [(r["job_id"], r["attempt"]) for r in stored(ledger)]
    assert got == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("c", 1)]
    ledger.record(simple_rows("a"))
    assert ledger.drain() == 0 and ledger.count() == 6
    ledger.close()


def test_postgres_outage_spools_and_another_worker_drains(
    tmp_path: Path, spool: redis.Redis, spool_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with database("postgresql", tmp_path) as good_url:
        closed = f"postgresql://fleet:s3cret@127.0.0.1:{free_port()}/test"
        down = open_ledger(closed, tmp_path, redis_url=spool_url)
        with caplog.at_level(logging.WARNING, logger="workers.ledger.store"):
            started = time.monotonic()
            down.record(simple_rows("pg-a"))
            down.record(simple_rows("pg-b"))  # within the retry delay: straight to the spool
        assert time.monotonic() - started < 5
        assert "unavailable" in caplog.text and "s3cret" not in caplog.text
        assert spool.llen(SPOOL_KEY) == 2
        up = open_ledger(good_url, tmp_path, redis_url=spool_url)
        assert up.drain() == 6
        assert up.drain() == 0
        assert [r["job_id"] for r in stored(up)] == ["pg-a"] * 3 + ["pg-b"] * 3
        down.close()
        up.close()


def test_with_redis_down_too_rows_go_to_a_local_file(url: str, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked.db"
    blocked.mkdir()
    no_redis = f"redis://127.0.0.1:{free_port()}/0"
    down = open_ledger(f"sqlite:///{blocked}", tmp_path, redis_url=no_redis)
    down.record(simple_rows("f1"))
    down.record(simple_rows("f2", 1))
    spool_file = tmp_path / "spool" / "ledger-spool.jsonl"
    assert len(spool_file.read_text().splitlines()) == 2
    up = open_ledger(url, tmp_path, redis_url=no_redis)
    assert up.drain() == 4
    assert spool_file.read_text() == "" and up.drain() == 0
    assert [(r["job_id"], r["attempt"]) for r in stored(up)][-1] == ("f2", 1)
    assert up.count() == 4
    down.close()
    up.close()


def test_an_embedding_attempt_keeps_its_cache_figures_and_old_spooled_rows_have_none(
    url: str, tmp_path: Path
) -> None:
    # Given a worker of schema 5's spooled rows (no embedding counts), in the file spool
    old = [
        {k: v for k, v in row.items() if k not in EMBEDDING_COUNTS}
        for row in simple_rows("before", 2)
    ]
    spool_file = tmp_path / "spool" / "ledger-spool.jsonl"
    spool_file.parent.mkdir()
    spool_file.write_text(encode_rows(old) + "\n")
    # When this version records an embedding job (2 inputs embedded, 3 from the cache)
    ledger = open_ledger(url, tmp_path)
    answer = embedding_attempt(1, "local/qwen3-embedding", 2, 3, tokens_per_item=7)
    ledger.record(rows("embedded", [answer], task_class="embedding"))
    # Then it drained the old rows first, with none, and its row holds its figures
    found = {(r["job_id"], r["attempt"]): r for r in stored(ledger)}
    figures = {k: (r["items"], r["cached_items"], r["cached_tokens"]) for k, r in found.items()}
    assert figures == {
        ("before", 1): (0, 0, 0),
        ("before", 2): (0, 0, 0),
        ("embedded", 1): (2, 3, 21),
    }
    assert found[("embedded", 1)]["prompt_tokens"] == 14 and spool_file.read_text() == ""
    ledger.close()


def test_concurrent_drainers_write_every_spooled_row_once(
    url: str, tmp_path: Path, spool: redis.Redis, spool_url: str
) -> None:
    entries = 600
    spool.rpush(SPOOL_KEY, *[encode_rows(simple_rows(f"s{i}", 2)) for i in range(entries)])
    drainers = [open_ledger(url, tmp_path, redis_url=spool_url) for _ in range(4)]
    counts: list[int] = []
    threads = [threading.Thread(target=lambda d=d: counts.append(d.drain())) for d in drainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 2 * entries  # each entry claimed by exactly one drainer
    assert drainers[0].count() == 2 * entries and drainers[0].pending() == 0
    assert spool.zcard(CLAIMS_KEY) == 0
    for d in drainers:
        d.close()


def test_a_dead_drainers_claim_goes_back_to_the_spool(
    url: str, tmp_path: Path, spool: redis.Redis, spool_url: str
) -> None:
    spool.rpush(SPOOL_KEY, encode_rows(simple_rows("dead-1")), encode_rows(simple_rows("dead-2")))
    keys = (SPOOL_KEY, CLAIMS_KEY, CLAIM_PREFIX + "dead")
    claim = script(spool, "spool_claim")
    claimed = claim(keys=list(keys), args=[10, time.time() - 3600, "dead"])  # then it died
    assert len(claimed) == 2 and spool.llen(SPOOL_KEY) == 0
    ledger = open_ledger(url, tmp_path, redis_url=spool_url)
    assert ledger.pending() == 2
    assert ledger.drain() == 6
    assert ledger.count() == 6 and ledger.pending() == 0
    assert not spool.exists(CLAIM_PREFIX + "dead")
    ledger.close()


# --- end to end ----------------------------------------------------------------------------


def ask(text: str, **fields):
    return {"messages": [{"role": "user", "content": text}], **fields}


def test_the_fleet_records_every_attempt_of_every_job(
    fleet_app, fleet_env: dict[str, str], simulator, tmp_path: Path
) -> None:
    handles = [
        dispatch(ask("Route this", task_class="user_facing", profile="routing")),
        dispatch(ask("[[sim:MiniMax-M2.1=503]] quick one", task_class="fast_general")),
        dispatch(ask("[[sim:*=400]] bad", task_class="cost_free", source="cron")),
    ]
    results = [handle.get(timeout=60, propagate=False) for handle in handles]
    simulator.configure(models={"kimi": {"cost": 0.0125}})  # OpenRouter-style usage.cost
    try:
        costed = dispatch(ask("Route that", task_class="user_facing", profile="routing"))
        results.append(costed.get(timeout=60))
    finally:
        simulator.reset()
    assert [r.ok for r in results] == [True, True, False, True]
    assert [len(r.attempts) for r in results] == [1, 2, 1, 1]

    ledger = open_ledger(fleet_env["FLEET_LEDGER_URL"], tmp_path)
    # A job's rows reach the spool with its result; the workers' writer threads drain the
    # spool into the database every second (workers/ledger/writer.py).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        len(stored(ledger, r.job_id)) < len(r.attempts) for r in results
    ):
        time.sleep(0.05)
    for result in results:
        got = stored(ledger, result.job_id)
        assert [
            (r["attempt"], r["model"], r["outcome"], r["prompt_tokens"], r["completion_tokens"])
            for r in got
        ] == [
            (a.number, a.model, a.outcome, a.prompt_tokens, a.completion_tokens)
            for a in result.attempts
        ]
        assert {(r["task_class"], r["source"]) for r in got} == {(result.task_class, result.source)}
    paid = stored(ledger, results[0].job_id)[0]
    assert (paid["model"], paid["profile"], paid["cost_source"]) == (
        "litellm/kimi",
        "routing",
        "catalog",
    )
    expected = (paid["prompt_tokens"] * KIMI_IN + paid["completion_tokens"] * KIMI_OUT) / 1e6
    assert paid["cost_usd"] == pytest.approx(expected, abs=1e-12) and paid["cost_usd"] > 0
    escalated = stored(ledger, results[1].job_id)
    assert [(r["queue"], r["error_kind"]) for r in escalated] == [
        ("subscription", "server_error"),
        ("free", None),
    ]
    assert stored(ledger, results[2].job_id)[0]["error_kind"] == "bad_request"
    provider = stored(ledger, results[3].job_id)[0]
    assert (provider["cost_usd"], provider["cost_source"]) == (0.0125, "provider")
    ledger.close()
