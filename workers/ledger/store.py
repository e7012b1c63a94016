"""The usage ledger's store: its database (SQLite or PostgreSQL, through SQLAlchemy Core;
tables in schema.py, created when absent) and the spool that feeds it.

    ledger = Ledger()                       # FLEET_LEDGER_URL, or sqlite:///<data dir>/ledger.db
    ledger.record(rows_for(result, job, catalog))     # rows.py

Exactly once: rows are inserted with insert-or-ignore on the key, so a redelivered task
records nothing twice. Off the task's path: a worker pushes a finished job's rows (JSON)
onto the Redis list `fleet:ledger:spool` together with the job's final state
(workers/runtime/resultstore.py), and the writer (workers/ledger/writer.py) drains the
spool into the database in batches. `record()` inserts directly and never raises: when
the database cannot take the rows it spools them to the same list, or, with Redis down
too, to `ledger-spool.jsonl` in the data dir. `drain()` writes the spool back; `record()`
drains first when this process spooled, and every DRAIN_EVERY_S otherwise. Drainers
claim spooled entries atomically (spool_claim.lua moves them to a per-drainer claim
list), so concurrent writers never trim each other's rows; a claim left by a killed
drainer goes back to the spool after CLAIM_STALE_S.

"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from router.errors import ConfigError
from workers.config import data_dir, fleet_urls
from workers.ledger import rollup
from workers.ledger.rows import decode_rows, encode_rows
from workers.ledger.schema import (
    COLUMNS,
    EMBEDDING_COUNTS,
    MIGRATIONS,
    SCHEMA_VERSION,
    attempts,
    ledger_meta,
    metadata,
)
from workers.state import keys
from workers.state.connections import new_client, script

log = logging.getLogger(__name__)

LOCKED_RETRIES = 3
SPOOL_KEY = keys.LEDGER_SPOOL
CLAIMS_KEY = keys.LEDGER_CLAIMS
CLAIM_PREFIX = keys.LEDGER_CLAIM_PREFIX
SPOOL_FILE = "ledger-spool.jsonl"
DRAIN_BATCH = 200  # spool entries (one per record() call) per claim
DRAIN_EVERY_S = 5.0  # how often record() looks for rows spooled by other processes
CLAIM_STALE_S = 120.0  # a claim older than this belongs to a dead drainer
RETRY_DB_AFTER_S = 2.0  # after an outage, spool straight away for this long
SQLITE_BUSY_TIMEOUT_MS = 30_000
_PG_LOCK_ID = 0x666C656574  # advisory lock serialising schema creation ("fleet")

# --- configuration ---------------------------------------------------------------------


def default_url(environ: Mapping[str, str] = os.environ) -> str:
    """FLEET_LEDGER_URL, or the SQLite file in the data dir."""
    if environ.get("FLEET_LEDGER_URL"):
        return environ["FLEET_LEDGER_URL"]
    return f"sqlite:///{data_dir(environ) / 'ledger.db'}"


def database_url(url: str) -> URL:
    """The URL with a driver SQLAlchemy can use: postgresql:// means psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"ledger URL {redacted(url)!r} is not a database URL"
            " (valid: sqlite:///PATH, postgresql://USER@HOST/DB)"
        ) from None
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"ledger URL scheme {parsed.drivername!r} not supported (valid: sqlite, postgresql)"
        )
    return parsed


def redacted(url: str | URL) -> str:
    """A URL fit for a log line: no password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def spool_redis_url(environ: Mapping[str, str] = os.environ) -> str | None:
    """The fleet's state Redis, or None when the settings name none."""
    try:
        return fleet_urls(environ)[1]
    except ConfigError:
        return None


def _reason(exc: BaseException) -> str:
    """One line about a failure: the driver's message, never the SQL or its parameters."""
    inner = getattr(exc, "orig", None) or exc
    first = (str(inner).strip().splitlines() or [""])[0]
    return f"{type(inner).__name__}: {first[:300]}"


def _upgrade(conn: Connection, version: int) -> None:
    """Bring a database of an older schema version up to this one, in the transaction
    that checked it (a PostgreSQL advisory lock keeps two processes from racing)."""
    for step in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS.get(step, []):
            if isinstance(statement, str):
                if not _adds_a_column_there_already(conn, statement):
                    conn.execute(text(statement))
            else:
                statement(conn)
    if version < SCHEMA_VERSION:
        conn.execute(ledger_meta.update().values(schema_version=SCHEMA_VERSION))


_ADD_COLUMN = re.compile(r"^ALTER TABLE (\w+) ADD COLUMN (\w+)", re.IGNORECASE)


def _adds_a_column_there_already(conn: Connection, statement: str) -> bool:
    """Whether `statement` adds a column its table already has: a table an older version
    lacked is created whole, new columns included, before the migrations run."""
    found = _ADD_COLUMN.match(statement)
    if found is None:
        return False
    from sqlalchemy import inspect

    table, column = found.groups()
    return column in {c["name"] for c in inspect(conn).get_columns(table)}


def insert_rows(conn: Connection, rows: list[dict[str, Any]]) -> int:
    """Insert-or-ignore `rows` and add the ones inserted to the rollups, in `conn`'s
    transaction; how many were new."""
    # In key order, so that two writers' overlapping batches wait on each other rather
    # than deadlock.
    values = sorted(
        (_stored(row) for row in rows), key=lambda v: (str(v["job_id"]), v["attempt"] or 0)
    )
    # RETURNING names exactly the rows this statement inserted (a row already there is
    # ignored and not returned), as stored: only those are added to the rollups.
    if conn.dialect.name == "postgresql":
        batch = json.dumps(values, default=_json_value, separators=(",", ":"))
        inserted = conn.execute(_PG_INSERT, {"rows": batch}).mappings().all()
    else:
        inserted = conn.execute(_SQLITE_INSERT, values).mappings().all()
    rollup.add(conn, inserted)
    return len(inserted)


def _stored(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row's values for every column; a row spooled by a worker of an older version has
    no embedding counts, which are then 0 (NOT NULL: the batch would never be written)."""
    values = {k: row.get(k) for k in COLUMNS}
    for name in EMBEDDING_COUNTS:
        values[name] = values[name] or 0
    return values


_SQLITE_INSERT = (
    sqlite.insert(attempts)
    .on_conflict_do_nothing(index_elements=["job_id", "attempt"])
    .returning(*rollup.ROW_COLUMNS)
)
# PostgreSQL gets the batch as one JSON parameter: a multi-row VALUES of thousands of
# parameters costs psycopg more to prepare (it parses the statement's text) than the
# insert itself costs the server.
_PG_INSERT = text(
    f"INSERT INTO attempts ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)}"
    " FROM jsonb_populate_recordset(NULL::attempts, CAST(:rows AS jsonb))"
    " ON CONFLICT (job_id, attempt) DO NOTHING"
    f" RETURNING {', '.join(c.name for c in rollup.ROW_COLUMNS)}"
).columns(*rollup.ROW_COLUMNS)


def _json_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"a ledger row holds a {type(value).__name__}, which JSON cannot carry")


class Ledger:
    """The ledger of one process: its engine (pooled, thread-safe) and its spool."""

    def __init__(
        self,
        url: str | None = None,
        *,
        redis_url: str | None = "",
        spool_dir: str | Path | None = None,
        retry_db_after_s: float = RETRY_DB_AFTER_S,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        """`redis_url`: the spool's Redis ("" = the fleet's state Redis, None = no Redis);
        `spool_dir`: where the file spool goes when Redis is down (default: the data dir)."""
        self.url = database_url(url or default_url(environ))
        self.redis_url = spool_redis_url(environ) if redis_url == "" else redis_url
        if spool_dir is None:
            spool_dir = data_dir(environ)
        self.spool_file = Path(spool_dir) / SPOOL_FILE
        self.retry_db_after_s = retry_db_after_s
        self.engine = self._create_engine()
        self._lock = threading.Lock()
        self._ready = False
        self._redis: Any = None
        self._down_until = 0.0
        self._spooled_here = False
        self._next_drain = 0.0

    def __repr__(self) -> str:
        return f"<Ledger {redacted(self.url)}>"

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    # --- the database ----------------------------------------------------------------

    def _create_engine(self) -> Engine:
        if self.dialect == "postgresql":
            return create_engine(
                self.url,
                pool_size=4,
                max_overflow=16,
                pool_pre_ping=True,
                connect_args={"connect_timeout": 5},
            )
        engine = create_engine(
            self.url,
            pool_size=4,
            max_overflow=32,
            pool_timeout=60,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # transactions are ours: see _on_begin
            cursor = dbapi_conn.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
            cursor.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints, WAL-safe
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # A writer takes the write lock up front, so busy_timeout applies to it instead
            # of SQLite failing an upgrade from reader to writer with "database is locked".
            write = conn.get_execution_options().get("ledger_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    def _sqlite_path(self) -> Path | None:
        database = self.url.database
        if self.dialect != "sqlite" or not database or database == ":memory:":
            return None
        return Path(database)

    def ensure_schema(self) -> None:
        """Create the tables if absent; ConfigError if the database's schema is newer."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            path = self._sqlite_path()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            with self.engine.connect() as conn:
                conn.execution_options(ledger_write=True)
                with conn.begin():
                    if self.dialect == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
                    metadata.create_all(conn, checkfirst=True)
                    version = conn.execute(select(ledger_meta.c.schema_version)).scalar()
                    if version is None:
                        conn.execute(
                            ledger_meta.insert().values(id=1, schema_version=SCHEMA_VERSION)
                        )
                    elif version > SCHEMA_VERSION:
                        raise ConfigError(
                            f"the ledger at {redacted(self.url)} has schema version {version},"
                            f" newer than this modelfleet's {SCHEMA_VERSION}: upgrade modelfleet"
                        )
                    else:
                        _upgrade(conn, version)
            self._ready = True

    def insert(self, rows: list[dict[str, Any]]) -> int:
        """Insert-or-ignore `rows` and add the ones inserted to the rollups, in one
        transaction; how many were new. Raises on a database error."""
        if not rows:
            return 0
        for attempt in range(LOCKED_RETRIES + 1):
            try:
                return self._insert_once(rows)
            except OperationalError as exc:
                # SQLite can answer 'database is locked' without waiting out its busy
                # timeout (a writer racing a checkpoint): that is contention, not an outage.
                if "locked" not in str(exc) or attempt == LOCKED_RETRIES:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable: the last try raises")

    def _insert_once(self, rows: list[dict[str, Any]]) -> int:
        self.ensure_schema()
        with self.engine.connect() as conn:
            conn.execution_options(ledger_write=True)
            with conn.begin():
                return insert_rows(conn, rows)

    def count(self) -> int:
        """How many attempts the ledger holds."""
        self.ensure_schema()
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(attempts)).scalar() or 0)

    # --- recording, spooling, draining -------------------------------------------------

    def record(self, rows: Iterable[dict[str, Any]]) -> None:
        """Write `rows` (or spool them when the database cannot take them). Never raises."""
        try:
            batch = list(rows)
            now = time.monotonic()
            if now < self._down_until:
                self._spool(batch)
                return
            try:
                if self._spooled_here or now >= self._next_drain:
                    self._drain(raise_db_errors=True)
                self.insert(batch)
            except (SQLAlchemyError, OSError, ConfigError) as exc:
                self._outage(exc)
                self._spool(batch)
        except Exception:  # the answer matters more than its bookkeeping
            log.exception("ledger: could not record a job's rows")

    def drain(self) -> int:
        """Write every spooled row to the database; how many rows were written (or were
        already there). Never raises: what cannot be written stays spooled."""
        try:
            return self._drain(raise_db_errors=False)
        except Exception:
            log.exception("ledger: drain failed")
            return 0

    def _outage(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_db_after_s
        log.warning(
            "ledger: database %s unavailable (%s); spooling rows until it is back",
            redacted(self.url),
            _reason(exc),
        )

    def _drain(self, *, raise_db_errors: bool) -> int:
        self._next_drain = time.monotonic() + DRAIN_EVERY_S
        written = 0
        try:
            written += self._drain_file()
            written += self._drain_redis()
        except (SQLAlchemyError, OSError, ConfigError) as exc:
            if raise_db_errors:
                raise
            self._outage(exc)
            return written
        self._spooled_here = False
        if written:
            log.debug("ledger: wrote %d spooled rows to %s", written, redacted(self.url))
        return written

    def _spool(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        entry = encode_rows(rows)
        self._spooled_here = True
        client = self._client()
        if client is not None:
            try:
                client.rpush(SPOOL_KEY, entry)
                return
            except Exception as exc:
                log.warning(
                    "ledger: spool Redis %s unavailable (%s); spooling to %s",
                    redacted(self.redis_url or ""),
                    _reason(exc),
                    self.spool_file,
                )
        self.spool_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool_file, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(entry + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _client(self) -> Any:
        if self.redis_url is None:
            return None
        if self._redis is None:
            self._redis = new_client(self.redis_url)
        return self._redis

    def _drain_redis(self) -> int:
        client = self._client()
        if client is None:
            return 0
        from redis.exceptions import RedisError

        written = 0
        try:
            cutoff = time.time() - CLAIM_STALE_S
            script(client, "spool_reclaim")(
                keys=[SPOOL_KEY, CLAIMS_KEY], args=[cutoff, CLAIM_PREFIX]
            )
            while True:
                token = uuid.uuid4().hex
                claim = CLAIM_PREFIX + token
                claim_keys = [SPOOL_KEY, CLAIMS_KEY, claim]
                entries = script(client, "spool_claim")(
                    keys=claim_keys, args=[DRAIN_BATCH, time.time(), token]
                )
                if not entries:
                    return written
                rows = [row for entry in entries for row in self._decoded(entry)]
                try:
                    self.insert(rows)
                except BaseException:
                    script(client, "spool_give_back")(keys=claim_keys, args=[token])  # at once
                    raise
                client.pipeline().delete(claim).zrem(CLAIMS_KEY, token).execute()
                written += len(rows)
        except RedisError as exc:
            log.warning(
                "ledger: cannot drain the spool on %s (%s)",
                redacted(self.redis_url or ""),
                _reason(exc),
            )
            return written

    def _decoded(self, entry: str | bytes) -> list[dict[str, Any]]:
        try:
            return decode_rows(entry)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ledger: dropping an unreadable spool entry (%s)", _reason(exc))
            return []

    def _drain_file(self) -> int:
        if not self.spool_file.exists():
            return 0
        with open(self.spool_file, "r+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            rows = [row for line in f if line.strip() for row in self._decoded(line)]
            self.insert(rows)  # raises, leaving the file as it was, if the database is down
            f.seek(0)
            f.truncate()
        return len(rows)

    def pending(self) -> int:
        """Spooled entries (record() calls) not yet written: Redis spool, claims, file."""
        count = 0
        client = self._client()
        if client is not None:
            count += int(client.llen(SPOOL_KEY))
            for token in client.zrange(CLAIMS_KEY, 0, -1):
                count += int(client.llen(CLAIM_PREFIX + token.decode()))
        if self.spool_file.exists():
            with open(self.spool_file, encoding="utf-8") as f:
                count += sum(1 for line in f if line.strip())
        return count

    def close(self) -> None:
        self.engine.dispose()
        if self._redis is not None:
            self._redis.close()
            self._redis = None
