"""The ledger's tables: `attempts`, one row per attempt keyed by (job_id, attempt);
`app_keys`, the gateway's keys per app (hashed, never in clear); and `ledger_meta`, the
schema version (a database of a newer version is refused; an older one is upgraded:
MIGRATIONS)."""

from __future__ import annotations

from sqlalchemy import (
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

SCHEMA_VERSION = 4

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

# What takes a database of version N to N + 1 (tables that are new are created as such).
MIGRATIONS: dict[int, list[str]] = {
    1: ["ALTER TABLE attempts ADD COLUMN app VARCHAR(64)"],
    2: [
        "ALTER TABLE attempts ADD COLUMN tools BOOLEAN",
        "ALTER TABLE attempts ADD COLUMN json_schema BOOLEAN",
    ],
    3: ["ALTER TABLE app_keys ADD COLUMN admin BOOLEAN"],
}

ledger_meta = Table(
    "ledger_meta",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("schema_version", Integer, nullable=False),
)

COLUMNS: tuple[str, ...] = tuple(c.name for c in attempts.columns)
TIMESTAMPS = ("started_at", "finished_at", "recorded_at")
