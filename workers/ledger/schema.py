"""The ledger's tables: `attempts`, one row per attempt keyed by (job_id, attempt);
its rollups `usage_hourly`, `usage_daily`, `escalations_hourly` and `escalations_daily`
(additive sums kept with every insert: workers/ledger/rollup.py); `app_keys`, the
gateway's keys per app (hashed, never in clear); and `ledger_meta`, the schema version (a
database of a newer version is refused; an older one is upgraded: MIGRATIONS)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)
from sqlalchemy.engine import Connection

SCHEMA_VERSION = 6

metadata = MetaData()

attempts = Table(
    "attempts",
    metadata,
    Column("job_id", String(200), primary_key=True),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("task_class", String(64), nullable=False),
    Column("source", String(32), nullable=False),
    Column("focus", String(200)),
    Column("profile", String(200)),
    Column("model", String(300), nullable=False),
    Column("provider", String(200), nullable=False),
    Column("queue", String(64), nullable=False),
    Column("tier", String(32), nullable=False),
    Column("outcome", String(16), nullable=False),  # ok, error, skipped, orphaned
    Column("error_kind", String(64)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("tokens_estimated", Boolean, nullable=False),
    Column("cost_usd", Float, nullable=False),
    # provider, catalog, subscription, free; estimated for an orphaned call
    Column("cost_source", String(16), nullable=False),
    Column("usd_per_mtok_in", Float),  # the prices used (NULL when the provider gave the cost)
    Column("usd_per_mtok_out", Float),
    Column("latency_ms", Float, nullable=False),
    Column("worker", String(300)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("app", String(64)),  # the app that sent the job (its gateway key's), if known
    # whether the call was sent tool definitions / asked for a JSON schema (NULL: a row
    # recorded before the ledger kept it)
    Column("tools", Boolean),
    Column("json_schema", Boolean),
    # an embedding attempt's inputs: embedded by its call, answered by the fleet's cache
    # for its model instead, and the prompt tokens those cost when they were embedded
    # (0 for a chat attempt, and in rows recorded before schema version 6)
    Column("items", Integer, nullable=False, server_default="0"),
    Column("cached_items", Integer, nullable=False, server_default="0"),
    Column("cached_tokens", Integer, nullable=False, server_default="0"),
    Index("ix_attempts_started_at", "started_at"),
)

app_keys = Table(
    "app_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),  # the key's public prefix, shown in lists
    Column("key_sha256", String(64), nullable=False),  # the whole key, hashed
    Column("app", String(64), nullable=False),
    Column("usd_per_day", Float),
    Column("usd_per_month", Float),
    Column("requests_per_min", Integer),
    Column("classes", String(1000)),  # comma-separated task classes; NULL: every class
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    # an admin key sees the whole fleet on the dashboard and /metrics (NULL: an app's key)
    Column("admin", Boolean),
    Index("ix_app_keys_app", "app"),
)

# --- the rollups (workers/ledger/rollup.py keeps them; workers/ledger/query.py reads them)
#
# A rollup row sums the attempts that share its key. Its time is a whole number of UTC hours
# (or days) since 1970-01-01T00:00Z: the attempt's started_at, floored. The keys' NULLs
# (app, focus, profile, error_kind) are stored as '' so that the key is a primary key both
# databases can upsert on.

ROLLUP_KEYS: tuple[str, ...] = (
    "model",
    "provider",
    "tier",
    "queue",
    "task_class",
    "app",
    "source",
    "focus",
    "profile",
    "outcome",
    "error_kind",
)
NULLABLE_KEYS = frozenset({"app", "focus", "profile", "error_kind"})

# Latency of the calls (outcome ok or error) in fixed log-spaced buckets, 6 a decade:
# bucket 0 holds < 1 ms, bucket i (1..36) [10^((i-1)/6), 10^(i/6)) ms, bucket 37 >= 1,000 s.
LATENCY_BUCKETS_PER_DECADE = 6
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(
    10 ** (i / LATENCY_BUCKETS_PER_DECADE) for i in range(6 * LATENCY_BUCKETS_PER_DECADE + 1)
)
LATENCY_COLUMNS: tuple[str, ...] = tuple(
    f"latency_{i:02d}" for i in range(len(LATENCY_BOUNDS_MS) + 1)
)

# The additive measures of a usage rollup row, in the order rollup.py keeps them.
USAGE_MEASURES: tuple[str, ...] = (
    "attempts",  # rows
    "jobs",  # jobs whose final attempt (highest-numbered, orphans aside) has this key
    "escalated_jobs",  # of those, jobs whose final model is not their first attempt's
    "prompt_tokens",
    "completion_tokens",
    "tokens_estimated",  # rows whose tokens were estimated
    "cost_usd",
    "latency_ms_sum",  # of the calls (outcome ok or error), as the histogram
    *LATENCY_COLUMNS,
    # an embedding attempt's: items, cached_items, cached_tokens, and what the cached
    # tokens would have cost on its model (rollup.py: cache_saved_usd())
    "items",
    "cached_items",
    "cached_tokens",
    "cache_saved_usd",
)
_BIG = frozenset({"prompt_tokens", "completion_tokens", "cached_tokens"})
_REAL = frozenset({"cost_usd", "latency_ms_sum", "cache_saved_usd"})
_KEY_LENGTHS = {c.name: c.type.length for c in attempts.columns if c.name in ROLLUP_KEYS}  # type: ignore[attr-defined]


def _usage_rollup(name: str, grain: str) -> Table:
    measures = [
        Column(m, BigInteger if m in _BIG else Float if m in _REAL else Integer, nullable=False)
        for m in USAGE_MEASURES
    ]
    return Table(
        name,
        metadata,
        Column(grain, Integer, primary_key=True, autoincrement=False),
        *(Column(k, String(_KEY_LENGTHS[k]), primary_key=True) for k in ROLLUP_KEYS),
        *measures,
    )


usage_hourly = _usage_rollup("usage_hourly", "hour")
usage_daily = _usage_rollup("usage_daily", "day")

# One row per (hour or day, class, app, from model, to model, reason): how many times a job
# went from one model to the next (a different model; orphans aside) because the first
# failed with that error kind (or was skipped: the kind, else its outcome), at the second's
# time.
ESCALATION_KEYS: tuple[str, ...] = ("task_class", "app", "from_model", "to_model", "reason")


def _escalation_rollup(name: str, grain: str) -> Table:
    return Table(
        name,
        metadata,
        Column(grain, Integer, primary_key=True, autoincrement=False),
        Column("task_class", String(64), primary_key=True),
        Column("app", String(64), primary_key=True),
        Column("from_model", String(300), primary_key=True),
        Column("to_model", String(300), primary_key=True),
        Column("reason", String(64), primary_key=True),
        Column("escalations", Integer, nullable=False),
    )


escalations_hourly = _escalation_rollup("escalations_hourly", "hour")
escalations_daily = _escalation_rollup("escalations_daily", "day")


def _backfill_rollups(conn: Connection) -> None:
    """Version 4's step: fill the new rollups from the rows the ledger already holds."""
    from workers.ledger.rollup import rebuild_in  # rollup.py imports this module

    rebuild_in(conn)


# Version 6: the embedding figures. A row recorded before has none (0), nor has a rollup
# row, so the columns' DEFAULT 0 is their value and nothing is recomputed.
EMBEDDING_COUNTS: tuple[str, ...] = ("items", "cached_items", "cached_tokens")
_EMBEDDING_COLUMNS = [
    f"ALTER TABLE attempts ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0"
    for name in EMBEDDING_COUNTS
]
_EMBEDDING_MEASURES = [
    f"ALTER TABLE {table} ADD COLUMN {name} {kind} NOT NULL DEFAULT 0"
    for table in ("usage_hourly", "usage_daily")
    for name, kind in (
        ("items", "INTEGER"),
        ("cached_items", "INTEGER"),
        ("cached_tokens", "BIGINT"),
        ("cache_saved_usd", "FLOAT"),
    )
]

# What takes a database of version N to N + 1: SQL, or a function of the connection (tables
# that are new are created as such before the steps run, in the same transaction).
Migration = str | Callable[[Connection], None]
MIGRATIONS: dict[int, list[Migration]] = {
    1: ["ALTER TABLE attempts ADD COLUMN app VARCHAR(64)"],
    2: [
        "ALTER TABLE attempts ADD COLUMN tools BOOLEAN",
        "ALTER TABLE attempts ADD COLUMN json_schema BOOLEAN",
    ],
    3: ["ALTER TABLE app_keys ADD COLUMN admin BOOLEAN"],
    # The backfill reads the attempts columns of this version: those added since come first
    # (a step adding a column that is there already skips it: store.py).
    4: [*_EMBEDDING_COLUMNS, _backfill_rollups],
    5: [*_EMBEDDING_COLUMNS, *_EMBEDDING_MEASURES],
}

ledger_meta = Table(
    "ledger_meta",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("schema_version", Integer, nullable=False),
)

COLUMNS: tuple[str, ...] = tuple(c.name for c in attempts.columns)
TIMESTAMPS = ("started_at", "finished_at", "recorded_at")
