"""The ledger's rollups (schema.py: `usage_hourly`, `usage_daily`, `escalations_hourly`,
`escalations_daily`): additive sums of the `attempts` rows, kept in the transaction that
inserts the rows.

What a row adds, at the UTC hour (and day) its attempt started:
- every row: one attempt, its tokens, whether they were estimated, its cost; a call (outcome
  ok or error) its latency, to the sum and to one histogram bucket (schema.py); an
  embedding attempt its items, cached items and cached tokens, and what those tokens would
  have cost on its model (cache_saved_usd());
- a job, once: `jobs` +1 under the key of its final attempt, the highest-numbered of its
  rows that is not an orphaned call (for an answered job, the answering one), and
  `escalated_jobs` +1 there when that attempt's model is not its first attempt's;
- each step of a job to a different model (orphans aside, in attempt order): one
  escalation (from model, to model, the reason the first gave way), at the second's hour.

The first are the row's alone. The job's depend on its other rows: when rows of a job that
already has rows are inserted, its job figures are taken off under their old keys and added
under their new ones. Every figure is a function of the rows stored, so the rollups equal
their sums over the raw rows however, and in how many batches, the rows came, and
`rebuild()` reproduces them from the rows alone.
"""

from __future__ import annotations

import calendar
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, Table, any_, bindparam, delete, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from router.costs import PER_MTOK
from workers.ledger.schema import (
    ESCALATION_KEYS,
    LATENCY_BOUNDS_MS,
    ROLLUP_KEYS,
    USAGE_MEASURES,
    attempts,
    escalations_daily,
    escalations_hourly,
    usage_daily,
    usage_hourly,
)

if TYPE_CHECKING:
    from workers.ledger.store import Ledger

Row = Mapping[Any, Any]  # a row as a dict, or as SQLAlchemy returns it (RowMapping)
UsageKey = tuple[Any, ...]  # (hour, *ROLLUP_KEYS)
EscalationKey = tuple[Any, ...]  # (hour, *ESCALATION_KEYS)

# The columns of `attempts` the rollups read.
ROW_COLUMNS = (
    attempts.c.job_id,
    attempts.c.attempt,
    *(attempts.c[k] for k in ROLLUP_KEYS),
    attempts.c.prompt_tokens,
    attempts.c.completion_tokens,
    attempts.c.tokens_estimated,
    attempts.c.cost_usd,
    attempts.c.latency_ms,
    attempts.c.started_at,
    attempts.c["items"],  # (attempts.c.items is the collection's items())
    attempts.c.cached_items,
    attempts.c.cached_tokens,
    attempts.c.usd_per_mtok_in,
)
ORPHANED = "orphaned"
CALLS = ("ok", "error")  # the outcomes of an attempt that made a call
_M = {name: i for i, name in enumerate(USAGE_MEASURES)}
_LATENCY_FROM = _M["latency_00"]
_JOBS_IN = 500  # job ids per IN (...) list
_FLUSH_KEYS = 50_000  # rollup keys held in memory while rebuilding
_PG_ROLLUP_LOCK = 0x726F6C6C7570  # advisory lock serialising rollup updates ("rollup")


def hour_of(when: datetime) -> int:
    """Whole UTC hours since the epoch (a naive datetime is UTC, as SQLite returns it)."""
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return calendar.timegm(when.timetuple()) // 3600


def latency_bucket(ms: float) -> int:
    return bisect_right(LATENCY_BOUNDS_MS, ms)


def usage_key(row: Row) -> UsageKey:
    return (hour_of(row["started_at"]), *(row[k] or "" for k in ROLLUP_KEYS))


def cache_saved_usd(row: Row) -> float:
    """What the prompt tokens the cache saved an embedding attempt would have cost on its
    model: at the prompt price the row was billed at (router/costs.py: 0 for a local, free
    or subscription model), or, when the provider gave the cost, at what its call paid a
    prompt token (an embedding call has no completion)."""
    tokens = int(row["cached_tokens"])
    if not tokens:
        return 0.0
    price = row["usd_per_mtok_in"]
    if price is not None:
        return tokens * float(price) / PER_MTOK
    paid_for = int(row["prompt_tokens"])
    return float(row["cost_usd"]) * tokens / paid_for if paid_for else 0.0


def _reason(row: Row) -> str:
    return str(row["error_kind"] or row["outcome"])


class Tally:
    """Rollup rows being summed: usage measures per (hour, key), escalations per (hour,
    class, app, from, to, reason). Signed: a job's figures may be taken off."""

    def __init__(self) -> None:
        self.usage: dict[UsageKey, list[float]] = {}
        self.escalations: defaultdict[EscalationKey, int] = defaultdict(int)

    def _measures(self, key: UsageKey) -> list[float]:
        found = self.usage.get(key)
        if found is None:
            found = self.usage[key] = [0] * len(USAGE_MEASURES)
        return found

    def add_row(self, row: Row) -> None:
        """What one attempt adds by itself."""
        m = self._measures(usage_key(row))
        m[_M["attempts"]] += 1
        m[_M["prompt_tokens"]] += int(row["prompt_tokens"])
        m[_M["completion_tokens"]] += int(row["completion_tokens"])
        m[_M["tokens_estimated"]] += 1 if row["tokens_estimated"] else 0
        m[_M["cost_usd"]] += float(row["cost_usd"])
        m[_M["items"]] += int(row["items"])
        m[_M["cached_items"]] += int(row["cached_items"])
        m[_M["cached_tokens"]] += int(row["cached_tokens"])
        m[_M["cache_saved_usd"]] += cache_saved_usd(row)
        if row["outcome"] in CALLS:
            latency = float(row["latency_ms"])
            m[_M["latency_ms_sum"]] += latency
            m[_LATENCY_FROM + latency_bucket(latency)] += 1

    def add_job(
        self, rows: Sequence[Row], sign: int = 1, within: Callable[[Row], bool] | None = None
    ) -> None:
        """What a job adds through its rows (`rows`: all of the job's, in attempt order),
        times `sign`; only the figures whose row is `within`, when given."""
        tries = [r for r in rows if r["outcome"] != ORPHANED]
        if not tries:
            return
        final = tries[-1]
        if within is None or within(final):
            m = self._measures(usage_key(final))
            m[_M["jobs"]] += sign
            if final["model"] != tries[0]["model"]:
                m[_M["escalated_jobs"]] += sign
        for before, after in pairwise(tries):
            if before["model"] != after["model"] and (within is None or within(after)):
                key = (
                    hour_of(after["started_at"]),
                    after["task_class"],
                    after["app"] or "",
                    before["model"],
                    after["model"],
                    _reason(before),
                )
                self.escalations[key] += sign

    def escalation_counts(self) -> dict[EscalationKey, list[float]]:
        return {key: [n] for key, n in self.escalations.items()}

    def prune(self) -> None:
        """Drop what sums to nothing (a job's figures taken off and put back alike)."""
        self.usage = {k: m for k, m in self.usage.items() if any(m)}
        for key in [k for k, n in self.escalations.items() if n == 0]:
            del self.escalations[key]


# --- kept as rows are inserted -------------------------------------------------------------


def add(conn: Connection, inserted: Sequence[Row]) -> None:
    """Add to the rollups the rows `inserted` (as stored: RETURNING), in `conn`'s
    transaction: each row's own figures, and its job's figures moved to where they now
    belong."""
    if not inserted:
        return
    if conn.dialect.name == "postgresql":
        # One writer at a time from here to its commit, so that each reads the rows of
        # its jobs that the one before it inserted: two writers inserting different rows
        # of one job at once must not both count the job. (Their inserts stay concurrent.)
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_ROLLUP_LOCK})
    tally = Tally()
    for row in inserted:
        tally.add_row(row)
    new = {(r["job_id"], r["attempt"]) for r in inserted}
    jobs = sorted({r["job_id"] for r in inserted if r["outcome"] != ORPHANED})
    for job_id, rows in _job_rows(conn, jobs):
        tally.add_job(rows, +1)
        before = [r for r in rows if (job_id, r["attempt"]) not in new]
        if before:
            tally.add_job(before, -1)
    tally.prune()
    write(conn, tally)


def _job_rows(conn: Connection, job_ids: Sequence[str]) -> Iterator[tuple[str, list[Row]]]:
    """Each job's stored rows that are not orphaned calls, in attempt order."""
    for start in range(0, len(job_ids), _JOBS_IN):
        chunk = list(job_ids[start : start + _JOBS_IN])
        if conn.dialect.name == "postgresql":  # one array parameter, not one per id
            ids = bindparam("ids", chunk, type_=postgresql.ARRAY(String))
            among = attempts.c.job_id == any_(ids)
        else:
            among = attempts.c.job_id.in_(chunk)
        query = (
            select(*ROW_COLUMNS)
            .where(among, attempts.c.outcome != ORPHANED)
            .order_by(attempts.c.job_id, attempts.c.attempt)
        )
        yield from group_by_job(conn.execute(query).mappings())


def group_by_job(rows: Iterable[Row]) -> Iterator[tuple[str, list[Row]]]:
    """Rows ordered by job, grouped by job."""
    job_id: str | None = None
    group: list[Row] = []
    for row in rows:
        if row["job_id"] != job_id:
            if group:
                yield str(job_id), group
            job_id, group = row["job_id"], []
        group.append(row)
    if group:
        yield str(job_id), group


def by_day(hourly: Mapping[tuple[Any, ...], Sequence[float]]) -> dict[tuple[Any, ...], list[float]]:
    """Rollup rows keyed by hour (first), summed by UTC day."""
    days: dict[tuple[Any, ...], list[float]] = {}
    for (hour, *rest), measures in hourly.items():
        key = (hour // 24, *rest)
        found = days.get(key)
        if found is None:
            days[key] = list(measures)
        else:
            for i, value in enumerate(measures):
                found[i] += value
    return days


def write(conn: Connection, tally: Tally) -> None:
    """Add `tally` to the rollup tables (upserts, in key order so that concurrent writers
    never deadlock)."""
    _upsert(conn, usage_hourly, ("hour", *ROLLUP_KEYS), USAGE_MEASURES, tally.usage)
    _upsert(conn, usage_daily, ("day", *ROLLUP_KEYS), USAGE_MEASURES, by_day(tally.usage))
    counts = tally.escalation_counts()
    for table, grain, rows in (
        (escalations_hourly, "hour", counts),
        (escalations_daily, "day", by_day(counts)),
    ):
        _upsert(conn, table, (grain, *ESCALATION_KEYS), ("escalations",), rows)


def _upsert(
    conn: Connection,
    table: Table,
    keys: tuple[str, ...],
    measures: tuple[str, ...],
    rows: Mapping[tuple[Any, ...], Sequence[float]],
) -> None:
    if not rows:
        return
    stmt = _upsert_statement(conn.dialect.name, table, keys, measures)
    values = [
        {**dict(zip(keys, key, strict=True)), **dict(zip(measures, sums, strict=True))}
        for key, sums in sorted(rows.items())
    ]
    conn.execute(stmt, values)


_UPSERTS: dict[tuple[str, str], Any] = {}


def _upsert_statement(
    dialect: str, table: Table, keys: tuple[str, ...], measures: tuple[str, ...]
) -> Any:
    """INSERT … ON CONFLICT DO UPDATE SET m = m + excluded.m, built once per table."""
    made = _UPSERTS.get((dialect, table.name))
    if made is None:
        module = postgresql if dialect == "postgresql" else sqlite
        stmt = module.insert(table)
        made = _UPSERTS[(dialect, table.name)] = stmt.on_conflict_do_update(
            index_elements=list(keys),
            set_={m: table.c[m] + stmt.excluded[m] for m in measures},
        )
    return made


# --- rebuilt from the rows ---------------------------------------------------------------


def rebuild(ledger: Ledger, since: datetime | None = None) -> int:
    """Recompute the rollups from the raw rows, from the start of `since`'s UTC day (None:
    all of them), in one transaction; how many rows were read. Writers wait meanwhile."""
    ledger.ensure_schema()
    with ledger.engine.connect() as conn:
        conn.execution_options(ledger_write=True)
        with conn.begin():
            return rebuild_in(conn, since)


def rebuild_in(
    conn: Connection, since: datetime | None = None, *, flush_keys: int = _FLUSH_KEYS
) -> int:
    """rebuild() in the caller's transaction (schema.py's migration to version 5 uses it);
    the sums are written whenever they reach `flush_keys` rollup keys."""
    if conn.dialect.name == "postgresql":
        # Inserts wait until the rollups are rebuilt; rebuilds wait on each other.
        conn.execute(text("LOCK TABLE attempts IN SHARE ROW EXCLUSIVE MODE"))
    first_day = None if since is None else hour_of(since) // 24
    first_hour = None if first_day is None else first_day * 24
    for table, column, start in (
        (usage_hourly, "hour", first_hour),
        (usage_daily, "day", first_day),
        (escalations_hourly, "hour", first_hour),
        (escalations_daily, "day", first_day),
    ):
        gone = delete(table)
        if start is not None:
            gone = gone.where(table.c[column] >= start)
        conn.execute(gone)
    query = select(*ROW_COLUMNS).order_by(attempts.c.job_id, attempts.c.attempt)
    if first_hour is not None:
        begins = datetime.fromtimestamp(first_hour * 3600, UTC)
        touched = select(attempts.c.job_id).where(attempts.c.started_at >= begins)
        query = query.where(attempts.c.job_id.in_(touched))

    def counted(row: Row) -> bool:
        return first_hour is None or hour_of(row["started_at"]) >= first_hour

    tally = Tally()
    read = 0
    rows = conn.execute(query.execution_options(yield_per=10_000)).mappings()
    for _job_id, job in group_by_job(rows):
        read += len(job)
        for row in job:
            if counted(row):
                tally.add_row(row)
        tally.add_job(job, +1, within=counted)
        if len(tally.usage) >= flush_keys:
            write(conn, tally)
            tally = Tally()
    write(conn, tally)
    return read
