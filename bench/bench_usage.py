"""The query layer over big ledgers: the dashboard's queries at 10k, 100k and 1M rows, on
SQLite and on PostgreSQL (workers/ledger/query.py; bench/README.md, measure 11).

    .venv/bin/python -m bench.bench_usage                    # 10k, 100k, 1M rows, both
    .venv/bin/python -m bench.bench_usage --rows 100000 --databases sqlite --rounds 3

For each size and database: a fresh ledger (a SQLite file in a temp dir; a PostgreSQL
schema of its own, dropped after) is filled with generated rows by bulk insert (SQLite
executemany, PostgreSQL COPY), then its rollups are built by `rollup.rebuild()` (the
migration's way; the writer keeps them the same way row by row) and ANALYZEd. Then, in
`--rounds` rounds after one warm-up, each query is timed on a fresh `Usage` (its raw edges
read again); the medians are printed. "page" is `Usage.page()`: everything the dashboard
shows (totals; 30 days by day and tier; by model, class, app, source, focus, profile;
tier shares; latency percentiles per model; escalations), on one connection. The raw
GROUP BY (what `fleet usage` ran before the rollups) is timed once per round for scale.
Then the page itself over HTTP: a real `fleet serve --port 0` on that ledger (and on the
bench's private redis-server) serves `GET /dashboard?since=30d` (7d, 24h) to an admin key
sent as `Authorization: Bearer`: query layer, live state from Redis, HTML rendered. Each
window: one warm-up request, then `--rounds` timed ones, their medians printed. The
timed requests all fall within the page's 15 s cache of Celery's inspect broadcast (no
workers run, so a request that asks waits out its 0.5 s timeout): the page prints when
it asked, and a timed request whose page asked again is dropped and taken again.
Last, the writer's cost: batches of 200 new jobs' rows inserted by `Ledger.insert` (rows
and rollups) against the same rows inserted alone.

`--screenshot PATH` also saves the top of the first run's page (`?since=30d`, admin key)
as Debian's chromium shows it, through Playwright: the README's docs/dashboard.png is

    .venv/bin/python -m bench.bench_usage --rows 20000 --databases sqlite --rounds 1 \
        --screenshot docs/dashboard.png

The generated fleet: 35 days of jobs up to now, from four apps and the fleet's own crons
and heartbeats, each sending a few kinds of job (class, source, focus, profile; embedding
batches of 1 to 64 texts, up to 80% of them from the cache, among them); each job
walks its class's chain in the catalog (1% of models skipped without a key, 12% failing
with a rate limit, timeout or server error, the next model then), 0.3% of jobs leave an
orphaned call; tokens and latencies log-normal, paid models priced from the catalog.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import func, select, text

from router.catalog import Catalog, load_catalog
from workers.ledger.query import Filters, Usage
from workers.ledger.rollup import rebuild
from workers.ledger.schema import COLUMNS, EMBEDDING_COUNTS, attempts, usage_daily, usage_hourly
from workers.ledger.store import Ledger, database_url
from workers.ops.redis_server import RedisServer
from workers.ops.supervisor import Supervisor

SIZES = (10_000, 100_000, 1_000_000)
DATABASES = ("sqlite", "postgresql")
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DAYS = 35
TARGET_MS = 500.0  # the whole page at 1M rows (issue 18)
WRITER_BATCH_JOBS = 200  # the writer's claim: up to 200 spool entries, a job each
HTTP_WINDOWS = ("30d", "7d", "24h")  # the page's presets, each timed over HTTP
ROOT = Path(__file__).resolve().parents[1]
GATEWAY_READY = "gateway: serving on"  # gateway/serve.py's READY
CHROMIUM = "/usr/bin/chromium"  # Debian's (scripts/setup installs it)
# When the page's workers were last asked (gateway/templates/dashboard.html): a change
# between two requests means the second waited out Celery's inspect broadcast.
ASKED_AT = re.compile(r"inspect at (\d\d:\d\d:\d\d) UTC")
MAX_RETAKES = 3  # per window: timed requests dropped for an inspect broadcast, at most
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores a DateTime in SQLite

# Who sends what: app -> kinds of job (task class, source, focus, profile), and its weight.
SENDERS: dict[str | None, tuple[float, list[tuple[str, str, str | None, str | None]]]] = {
    "support": (
        0.35,
        [
            ("user_facing", "app", None, "routing"),
            ("user_facing", "app", None, None),
            ("fast_general", "app", None, None),
        ],
    ),
    "newsroom": (
        0.2,
        [
            ("creative", "app", "journalist", "creative"),
            ("long_context", "app", "journalist", None),
            ("fast_general", "app", "social", "social"),
        ],
    ),
    "research": (
        0.2,
        [
            ("complex_reasoning", "app", "data", "analysis"),
            ("reasoning_free", "sub-agent", "data", None),
            ("vision", "app", None, None),
            ("embedding", "app", "data", None),
        ],
    ),
    "billing": (
        0.1,
        [("user_facing", "app", "orchestrator", "routing"), ("cost_free", "app", "trader", None)],
    ),
    None: (
        0.15,
        [
            ("heartbeat", "heartbeat", None, None),
            ("cost_free", "cron", None, None),
            ("creative", "cron", "social", None),
        ],
    ),
}
ERROR_KINDS = (("rate_limited", 0.4), ("timeout", 0.3), ("server_error", 0.3))
LATENCY_MEDIAN_MS = {"local": 400.0, "free": 1_500.0, "subscription": 2_500.0, "paid": 3_000.0}


# --- generated rows ---------------------------------------------------------------------


class Generator:
    """Rows as tuples in COLUMNS' order, for bulk loading."""

    def __init__(self, catalog: Catalog, seed: int = 18) -> None:
        self.rng = random.Random(seed)
        self.catalog = catalog
        self.chains: dict[str, list[str]] = {
            str(c): list(models) for c, models in catalog.policy.chains.items()
        }
        self.apps = list(SENDERS)
        self.weights = [SENDERS[a][0] for a in self.apps]
        self.serial = 0

    def rows(self, count: int, start: float, end: float) -> Iterator[tuple[Any, ...]]:
        made = 0
        while made < count:
            job = self.job(start + self.rng.random() * (end - start))
            made += len(job)
            yield from job

    def job(self, started: float) -> list[tuple[Any, ...]]:
        rng = self.rng
        self.serial += 1
        job_id = f"bench-{self.serial:09d}-{rng.getrandbits(32):08x}"
        app = rng.choices(self.apps, self.weights)[0]
        task_class, source, focus, profile = rng.choice(SENDERS[app][1])
        job = (job_id, task_class, source, focus, profile, app)
        out = []
        for number, model_id in enumerate(self.chains[task_class], start=1):
            roll = rng.random()
            if roll < 0.01:
                out.append(self.row(job, number, model_id, started, "skipped", "no_key"))
                continue
            if roll < 0.13:
                kind = rng.choices([k for k, _ in ERROR_KINDS], [w for _, w in ERROR_KINDS])[0]
                out.append(self.row(job, number, model_id, started, "error", kind))
                started += out[-1][COLUMNS.index("latency_ms")] / 1000
                continue
            out.append(self.row(job, number, model_id, started, "ok", None))
            break
        if rng.random() < 0.003:
            lost = self.chains[task_class][0]
            out.append(self.row(job, 1001, lost, started - 30, "orphaned", "worker_lost"))
        return out

    def row(
        self,
        job: tuple[Any, ...],
        number: int,
        model_id: str,
        started: float,
        outcome: str,
        error_kind: str | None,
    ) -> tuple[Any, ...]:
        rng = self.rng
        job_id, task_class, source, focus, profile, app = job
        model = self.catalog.by_id[model_id]
        called = outcome in ("ok", "error")
        latency = rng.lognormvariate(math.log(LATENCY_MEDIAN_MS[model.tier]), 0.6) if called else 0
        tokens_in = int(rng.lognormvariate(math.log(2_000), 1.0)) if outcome != "skipped" else 0
        tokens_out = int(rng.lognormvariate(math.log(300), 0.8)) if outcome == "ok" else 0
        if outcome == "orphaned":
            tokens_out = 4096
        counts = dict.fromkeys(EMBEDDING_COUNTS, 0)
        if task_class == "embedding":  # a batch of texts, some answered from the cache
            tokens_out = 0
            if outcome == "ok":
                texts = rng.randint(1, 64)
                cached = int(texts * rng.random() * 0.8)
                per_text = max(1, tokens_in // texts)
                tokens_in = per_text * (texts - cached)
                counts = {
                    "items": texts - cached,
                    "cached_items": cached,
                    "cached_tokens": per_text * cached,
                }
        prices = (model.usd_per_mtok_in, model.usd_per_mtok_out)
        cost = (tokens_in * prices[0] + tokens_out * prices[1]) / 1e6 if model.tier == "paid" else 0
        source_of_cost = {"paid": "catalog", "subscription": "subscription"}.get(model.tier, "free")
        at = datetime.fromtimestamp(started, UTC)
        values = {
            "job_id": job_id,
            "attempt": number,
            "task_class": task_class,
            "source": source,
            "focus": focus,
            "profile": profile,
            "model": model_id,
            "provider": model_id.split("/", 1)[0],
            "queue": model.queue,
            "tier": model.tier,
            "outcome": outcome,
            "error_kind": error_kind,
            "prompt_tokens": tokens_in,
            "completion_tokens": tokens_out,
            "tokens_estimated": outcome == "orphaned",
            "cost_usd": cost,
            "cost_source": "estimated" if outcome == "orphaned" else source_of_cost,
            "usd_per_mtok_in": prices[0],
            "usd_per_mtok_out": prices[1],
            "latency_ms": latency,
            "worker": "bench@host",
            "started_at": at,
            "finished_at": at + timedelta(milliseconds=latency),
            "recorded_at": at + timedelta(milliseconds=latency + 50),
            "app": app,
            "tools": False,
            "json_schema": False,
            **counts,
        }
        return tuple(values[c] for c in COLUMNS)


# --- ledgers ----------------------------------------------------------------------------


@contextmanager
def fresh_ledger(kind: str, pg_url: str, work: Path) -> Iterator[Ledger]:
    """An empty ledger: a SQLite file under `work`, or a PostgreSQL schema of its own."""
    if kind == "sqlite":
        path = work / f"ledger-{uuid.uuid4().hex[:8]}.db"
        ledger = Ledger(f"sqlite:///{path}", redis_url=None, spool_dir=work)
        try:
            yield ledger
        finally:
            ledger.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    from sqlalchemy import create_engine

    admin = create_engine(database_url(pg_url))
    schema = f"bench_usage_{uuid.uuid4().hex[:10]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in pg_url else "?"
    url = f"{pg_url}{separator}options={quote(f'-csearch_path={schema}')}"
    ledger = Ledger(url, redis_url=None, spool_dir=work)
    try:
        yield ledger
    finally:
        ledger.close()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def bulk_load(ledger: Ledger, rows: Iterator[tuple[Any, ...]], chunk: int = 50_000) -> int:
    """The rows into `attempts`, raw (the rollups are left alone): how many."""
    ledger.ensure_schema()
    raw = ledger.engine.raw_connection()
    loaded = 0
    try:
        driver: Any = raw.driver_connection
        if ledger.dialect == "postgresql":
            with (
                driver.cursor() as cursor,
                cursor.copy(f"COPY attempts ({', '.join(COLUMNS)}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
                    loaded += 1
        else:
            at = [COLUMNS.index(c) for c in ("started_at", "finished_at", "recorded_at")]
            insert = f"INSERT INTO attempts VALUES ({', '.join('?' * len(COLUMNS))})"
            batch: list[list[Any]] = []
            driver.execute("BEGIN")
            for row in rows:
                values = list(row)
                for i in at:
                    values[i] = values[i].strftime(_SQLITE_TIME)
                batch.append(values)
                if len(batch) >= chunk:
                    driver.executemany(insert, batch)
                    loaded += len(batch)
                    batch = []
            driver.executemany(insert, batch)
            loaded += len(batch)
            driver.execute("COMMIT")
        raw.commit()
    finally:
        raw.close()
    return loaded


def analyze(ledger: Ledger) -> None:
    with ledger.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text("ANALYZE"))


def table_rows(ledger: Ledger) -> dict[str, int]:
    with ledger.engine.connect() as conn:
        return {
            t.name: int(conn.execute(select(func.count()).select_from(t)).scalar() or 0)
            for t in (usage_hourly, usage_daily)
        }


# --- timing -----------------------------------------------------------------------------


def timed(fn: Callable[[], object], rounds: int) -> list[float]:
    """Milliseconds of `rounds` calls, after one untimed warm-up."""
    fn()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def queries(ledger: Ledger, catalog: Catalog, now: datetime) -> dict[str, Callable[[], object]]:
    month = Filters(since=now - timedelta(days=30))

    def usage(filters: Filters = month) -> Usage:
        return Usage(ledger, filters, catalog)

    def raw_group_by() -> object:
        by_model = (
            select(attempts.c.model, func.count(), func.sum(attempts.c.cost_usd))
            .where(attempts.c.started_at >= month.since)
            .group_by(attempts.c.model)
        )
        with ledger.engine.connect() as conn:
            return conn.execute(by_model).all()

    return {
        "page, 30 d": lambda: usage().page(),
        "page, 7 d": lambda: usage(Filters(since=now - timedelta(days=7))).page(),
        "page, 24 h": lambda: usage(Filters(since=now - timedelta(hours=24))).page(),
        "page, 30 d, one app": lambda: usage(Filters(since=month.since, app="newsroom")).page(),
        "30 d by day and tier": lambda: usage().by("day", "tier"),
        "30 d by model": lambda: usage().by("model"),
        "30 d by app": lambda: usage().by("app"),
        "30 d latency per model": lambda: usage().latency(),
        "ref: raw GROUP BY model, 30 d": raw_group_by,
    }


def writer_cost(ledger: Ledger, generator: Generator, rounds: int) -> dict[str, float]:
    """Median ms per batch of WRITER_BATCH_JOBS new jobs: Ledger.insert (rows and rollups)
    against the same kind of rows inserted alone (on-conflict-do-nothing, no rollup)."""
    from sqlalchemy.dialects import postgresql, sqlite

    module = postgresql if ledger.dialect == "postgresql" else sqlite
    alone = module.insert(attempts).on_conflict_do_nothing(index_elements=["job_id", "attempt"])
    now = time.time()

    def batch() -> list[dict[str, Any]]:
        rows = [r for _ in range(WRITER_BATCH_JOBS) for r in generator.job(now)]
        return [dict(zip(COLUMNS, r, strict=True)) for r in rows]

    with_rollups, rows_alone, sizes = [], [], []
    for _ in range(rounds + 1):
        first, second = batch(), batch()
        started = time.perf_counter()
        ledger.insert(first)
        with_rollups.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        with ledger.engine.connect() as conn:
            conn.execution_options(ledger_write=True)
            with conn.begin():
                conn.execute(alone, second)
        rows_alone.append((time.perf_counter() - started) * 1000)
        sizes.append(len(first))
    return {
        "rows per batch": statistics.median(sizes[1:]),
        "insert + rollups, ms": statistics.median(with_rollups[1:]),
        "insert alone, ms": statistics.median(rows_alone[1:]),
    }


# --- the page over HTTP -----------------------------------------------------------------


@contextmanager
def gateway(ledger: Ledger, redis_url: str, work: Path) -> Iterator[str]:
    """`fleet serve --port 0` on `ledger` (the same URL, a PostgreSQL schema's search_path
    included) and the bench's Redis, in its own process: its base URL."""
    url = ledger.engine.url.render_as_string(hide_password=False)
    home = work / f"gateway-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "FLEET_BROKER_URL": redis_url,
        "FLEET_LEDGER_URL": url,
        "FLEET_DATA_DIR": str(home / "data"),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("FLEET_STATE_URL", None)  # state in the bench's Redis too (the broker's)
    supervisor = Supervisor(home, env)
    try:
        argv = [sys.executable, "-m", "workers.cli", "serve", "--port", "0"]
        child = supervisor.start("gateway", argv, GATEWAY_READY, cwd=ROOT)
        supervisor.wait_ready(60, [child])
        found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", child.log())
        if not found:
            raise RuntimeError(f"the gateway named no URL (log {child.log_path})")
        yield found.group(1)
    finally:
        supervisor.stop(20)


def admin_key(ledger: Ledger) -> str:
    from gateway.keys import KeyStore
    from workers.state.apps import AppLimits

    key, _ = KeyStore(ledger).create("bench", AppLimits(None, None, None), admin=True)
    return key


def page_over_http(base: str, key: str, rounds: int) -> tuple[dict[str, float], int]:
    """Median ms of `GET /dashboard?since=W` for each window W (one keep-alive client,
    as a browser's), after one warm-up each; the body read whole. Requests whose page
    asked the workers again (its inspect time changed) are dropped and taken again: the
    medians, and how many were dropped. A 200 at all says the gateway reads the bench's
    ledger: the admin key is only there (a PostgreSQL run's own schema)."""
    import httpx

    medians: dict[str, float] = {}
    dropped = 0
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:

        def get(window: str) -> tuple[float, str]:
            started = time.perf_counter()
            response = client.get("/dashboard", params={"since": window})
            ms = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"GET /dashboard?since={window}: {response.status_code}")
            found = ASKED_AT.search(response.text)
            if not found:
                raise RuntimeError("the dashboard no longer says when it asked the workers")
            return ms, found.group(1)

        for window in HTTP_WINDOWS:
            _, asked = get(window)
            samples: list[float] = []
            retakes = 0
            while len(samples) < rounds:
                ms, now_asked = get(window)
                if now_asked != asked:
                    asked, retakes, dropped = now_asked, retakes + 1, dropped + 1
                    if retakes > MAX_RETAKES:
                        raise RuntimeError(f"since={window}: the workers were asked again")
                    continue
                samples.append(ms)
            medians[f"page over HTTP, {window}"] = statistics.median(samples)
    return medians, dropped


# --- the run ----------------------------------------------------------------------------


def screenshot(base: str, key: str, path: Path) -> None:
    """The top of the page of the last 30 days, as chromium shows it, saved at `path`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(
                viewport={"width": 1280, "height": 1700},
                extra_http_headers={"Authorization": f"Bearer {key}"},
            )
            page.goto(f"{base}/dashboard?since=30d")
            page.screenshot(path=str(path))  # its top: the whole page is 4 to 7 times that
        finally:
            browser.close()
    print(f"  screenshot of /dashboard?since=30d: {path}")


def run_one(
    kind: str, size: int, args: argparse.Namespace, work: Path, redis_url: str
) -> dict[str, Any]:
    catalog = load_catalog()
    generator = Generator(catalog)
    now = datetime.now(UTC)
    start = (now - timedelta(days=DAYS)).timestamp()
    with fresh_ledger(kind, args.pg_url, work) as ledger:
        began = time.perf_counter()
        loaded = bulk_load(ledger, generator.rows(size, start, now.timestamp() - 1))
        load_s = time.perf_counter() - began
        began = time.perf_counter()
        rebuild(ledger)
        rebuild_s = time.perf_counter() - began
        analyze(ledger)
        sizes = table_rows(ledger)
        result: dict[str, Any] = {
            "database": kind,
            "rows": loaded,
            "usage_hourly rows": sizes["usage_hourly"],
            "usage_daily rows": sizes["usage_daily"],
            "bulk load, s": load_s,
            "rebuild, s": rebuild_s,
            "medians, ms": {},
        }
        load_before = os.getloadavg()[0]
        for name, fn in queries(ledger, catalog, now).items():
            rounds = 1 if name.startswith("ref:") and size >= 1_000_000 else args.rounds
            result["medians, ms"][name] = statistics.median(timed(fn, rounds))
        result["load 1m"] = (load_before, os.getloadavg()[0])
        key = admin_key(ledger)
        with gateway(ledger, redis_url, work) as base:
            load_before = os.getloadavg()[0]
            result["over HTTP, ms"], result["HTTP dropped"] = page_over_http(base, key, args.rounds)
            result["HTTP load 1m"] = (load_before, os.getloadavg()[0])
            if args.screenshot is not None:
                screenshot(base, key, args.screenshot)
                args.screenshot = None  # the first run's only
        result["writer"] = writer_cost(ledger, generator, args.rounds)
    return result


def print_result(result: dict[str, Any]) -> None:
    page = result["medians, ms"]["page, 30 d"]
    met = "yes" if page < TARGET_MS else "NO"
    load = "→".join(f"{x:.1f}" for x in result["load 1m"])
    print(
        f"\n{result['database']}, {result['rows']:,} rows"
        f" (rollups: {result['usage_hourly rows']:,} hourly, {result['usage_daily rows']:,}"
        f" daily rows); bulk load {result['bulk load, s']:.1f} s,"
        f" rebuild {result['rebuild, s']:.1f} s; load 1m {load} while timed"
    )
    for name, ms in result["medians, ms"].items():
        print(f"  {name:<34}{ms:>10.1f} ms")
    print(f"  page, 30 d under {TARGET_MS:.0f} ms: {met}")
    http_load = "→".join(f"{x:.1f}" for x in result["HTTP load 1m"])
    print(
        f"  GET /dashboard from `fleet serve`, admin key; load 1m {http_load} while timed;"
        f" {result['HTTP dropped']} dropped for an inspect broadcast"
    )
    for name, ms in result["over HTTP, ms"].items():
        print(f"  {name:<34}{ms:>10.1f} ms")
    http_met = "yes" if result["over HTTP, ms"]["page over HTTP, 30d"] < TARGET_MS else "NO"
    print(f"  page over HTTP, 30d under {TARGET_MS:.0f} ms: {http_met}")
    writer = result["writer"]
    print(
        f"  writer, a batch of {WRITER_BATCH_JOBS} jobs ({writer['rows per batch']:.0f} rows):"
        f" insert + rollups {writer['insert + rollups, ms']:.1f} ms,"
        f" insert alone {writer['insert alone, ms']:.1f} ms"
    )
    sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def sizes(text: str) -> list[int]:
        try:
            found = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--rows {text!r}: give row counts like 10000 or 10000,100000"
            ) from None
        if not found or min(found) < 1:
            raise argparse.ArgumentTypeError(f"--rows {text!r}: give positive row counts")
        return found

    def databases(text: str) -> list[str]:
        found = [part.strip() for part in text.split(",") if part.strip()]
        wrong = [d for d in found if d not in DATABASES]
        if not found or wrong:
            raise argparse.ArgumentTypeError(f"--databases {text!r}: valid: {', '.join(DATABASES)}")
        return found

    p = argparse.ArgumentParser(prog="python -m bench.bench_usage", description=__doc__)
    p.add_argument("--rows", type=sizes, default=list(SIZES), help="row counts (default all)")
    p.add_argument("--databases", type=databases, default=list(DATABASES))
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per query (default 7)")
    p.add_argument("--pg-url", default=PG_URL, help=f"PostgreSQL (default {PG_URL})")
    p.add_argument("--screenshot", type=Path, help="save the first run's page as this PNG")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"bench_usage: {', '.join(args.databases)} at {', '.join(f'{n:,}' for n in args.rows)}")
    print(f"rows; medians of {args.rounds} rounds after a warm-up")
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as tmp:
        redis = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        try:
            for size in args.rows:
                for kind in args.databases:
                    print_result(run_one(kind, size, args, Path(tmp), redis.url))
        finally:
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
