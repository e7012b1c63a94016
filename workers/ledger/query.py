"""The one query layer over the ledger: `fleet usage`, the dashboard and its JSON read
their figures here, so they agree by construction.

    usage = Usage(ledger, Filters(since=parse_since("7d"), app="billing"), catalog)
    usage.totals()              # {"attempts", "jobs", ..., "cost_usd", "saving_usd", ...}
    usage.by("day", "tier")     # one row per (day, tier): the keys, then the same figures
    usage.latency()             # per model: calls, errors, error_rate, mean, p50/p95/p99 ms
    usage.tiers()               # per tier: jobs, answered, failed, share of all jobs
    usage.escalations()         # per (from_model, to_model, reason): how many
    usage.embedding_cache()     # per model: the embedding cache's hits, hit rate, savings

Figures come from the rollups (schema.py, kept by rollup.py): whole UTC days from
`usage_daily`, whole hours from `usage_hourly`, and the parts of an hour a window cuts (an
age like 24h starts mid-hour) from the raw rows, summed in Python by the very code that
keeps the rollups. So a window's figures are those of the raw rows started in it,
[since, until), to the microsecond; days and hours are UTC.

A job counts once, in the group of its final attempt (the highest-numbered that is not an
orphaned call; for an answered job, the answering one), at that attempt's time: `jobs` of
every group add up to the total. `answered` are those whose final attempt is ok,
`escalated_jobs` those whose final model is not the one first tried. The saving of a group
is what its tokens would have cost on the paid primary (REFERENCE_MODEL, at the catalog's
prices; an embedding job's on the paid embedding model, EMBEDDING_REFERENCE_MODEL) minus
what they did cost. Orphaned calls (in flight when their worker died:
workers/runtime/orphans.py) count in every figure like any call, on their estimated
tokens and cost, and are also counted apart.

The embedding cache's figures are those of the answers (ok attempts), whose vectors the
job returned: `embedded_items` the inputs their calls embedded, `cached_items` those the
cache answered, `cache_hit_rate` cached / (cached + embedded) (None without either),
`cached_tokens` the prompt tokens the cache saved, `cache_saved_usd` what those would have
cost on their model (0 on local, free and subscription models: rollup.py) and
`cache_saved_vs_reference_usd` what they would have cost on the paid embedding model,
the measure of `saving_usd`. A failed attempt's cache hits did not answer the job
(the next model's vectors did), so they count nowhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Table, and_, case, func, or_, select
from sqlalchemy.engine import Connection

from router.catalog import Catalog
from router.errors import ConfigError
from workers.ledger.filters import (
    EMBEDDING_REFERENCE_MODEL,
    REFERENCE_MODEL,
    Filters,
    Prices,
    day_label,
    hour_label,
    parse_since,
    reference_prices,
)
from workers.ledger.rollup import ROW_COLUMNS, Tally, group_by_job
from workers.ledger.schema import (
    ESCALATION_KEYS,
    LATENCY_BOUNDS_MS,
    LATENCY_COLUMNS,
    NULLABLE_KEYS,
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

__all__ = [
    "EMBEDDING_REFERENCE_MODEL",
    "GROUPS",
    "QUANTILES",
    "REFERENCE_MODEL",
    "TIERS",
    "Filters",
    "Usage",
    "figures",
    "parse_since",
    "percentile_ms",
    "reference_prices",
    "segments",
]

GROUPS: tuple[str, ...] = (*ROLLUP_KEYS, "day", "hour")
TIERS = ("local", "free", "subscription", "paid")  # cheapest first
QUANTILES = (0.5, 0.95, 0.99)
DIGITS = 9  # USD figures are rounded to a billionth of a dollar


# --- what a window is read from ---------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A piece of a window and where it is read: `raw` rows in [lo, hi) (datetimes), or
    rollup rows of `hour` or `day` numbers in [lo, hi) (None: unbounded)."""

    grain: str
    lo: Any
    hi: Any


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def segments(since: datetime | None, until: datetime | None, days: bool = True) -> list[Segment]:
    """[since, until) cut into raw edges, whole hours and (when `days`) whole UTC days."""
    if since is not None and until is not None and since >= until:
        return []
    s = None if since is None else _micros(since)
    u = None if until is None else _micros(until)
    first_hour = None if s is None else _ceil_div(s, _HOUR_US)
    end_hour = None if u is None else u // _HOUR_US
    if first_hour is not None and end_hour is not None and first_hour > end_hour:
        return [Segment("raw", since, until)]  # within one hour
    out: list[Segment] = []
    if since is not None and first_hour is not None and first_hour * _HOUR_US != s:
        out.append(Segment("raw", since, _at_hour(first_hour)))
    out.extend(_hours_and_days(first_hour, end_hour, days))
    if until is not None and end_hour is not None and end_hour * _HOUR_US != u:
        out.append(Segment("raw", _at_hour(end_hour), until))
    return out


_HOUR_US = 3_600_000_000
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(when: datetime) -> int:
    """Microseconds since the epoch, exactly (no float on the way)."""
    return (when - _EPOCH_UTC) // timedelta(microseconds=1)


def _at_hour(hour: int) -> datetime:
    return _EPOCH_UTC + timedelta(hours=hour)


def _hours_and_days(lo: int | None, hi: int | None, days: bool) -> list[Segment]:
    if lo is not None and hi is not None and lo >= hi:
        return []
    first_day = None if lo is None else _ceil_div(lo, 24)
    end_day = None if hi is None else hi // 24
    if not days or (first_day is not None and end_day is not None and first_day >= end_day):
        return [Segment("hour", lo, hi)]
    out = []
    if lo is not None and first_day is not None and first_day * 24 > lo:
        out.append(Segment("hour", lo, first_day * 24))
    out.append(Segment("day", first_day, end_day))
    if hi is not None and end_day is not None and end_day * 24 < hi:
        out.append(Segment("hour", end_day * 24, hi))
    return out


# --- sums -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agg:
    """A figure: the sum of a rollup measure over the rows of these outcomes and task
    classes (() = all)."""

    name: str
    measure: str
    outcomes: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()

    def counts(self, outcome: Any, task_class: Any) -> bool:
        return (not self.outcomes or outcome in self.outcomes) and (
            not self.classes or task_class in self.classes
        )


def _split_by(aggs: Sequence[Agg]) -> list[str]:
    """The keys figures of some outcomes or classes only are summed per, then folded."""
    return [
        *(["outcome"] if any(a.outcomes for a in aggs) else []),
        *(["task_class"] if any(a.classes for a in aggs) else []),
    ]


FIGURES = (
    Agg("attempts", "attempts"),
    Agg("jobs", "jobs"),
    Agg("answered", "jobs", ("ok",)),
    Agg("escalated_jobs", "escalated_jobs"),
    Agg("prompt_tokens", "prompt_tokens"),
    Agg("completion_tokens", "completion_tokens"),
    Agg("embedding_tokens", "prompt_tokens", classes=("embedding",)),
    Agg("tokens_estimated", "tokens_estimated"),
    Agg("cost_usd", "cost_usd"),
    Agg("orphaned", "attempts", ("orphaned",)),
    Agg("orphaned_cost_usd", "cost_usd", ("orphaned",)),
    Agg("errors", "attempts", ("error",)),
    Agg("skipped", "attempts", ("skipped",)),
    Agg("embedded_items", "items", ("ok",)),
    Agg("cached_items", "cached_items", ("ok",)),
    Agg("cached_tokens", "cached_tokens", ("ok",)),
    Agg("cache_saved_usd", "cache_saved_usd", ("ok",)),
)
# The figures of the embedding cache, in figures()' order.
CACHE_FIGURES = (
    "embedded_items",
    "cached_items",
    "cache_hit_rate",
    "cached_tokens",
    "cache_saved_usd",
    "cache_saved_vs_reference_usd",
)


def _latency_aggs(outcomes: tuple[str, ...]) -> tuple[Agg, ...]:
    return (
        Agg("ok", "attempts", ("ok",)),
        Agg("errors", "attempts", ("error",)),
        Agg("timed", "attempts", outcomes),
        Agg("latency_ms_sum", "latency_ms_sum", outcomes),
        *(Agg(c, c, outcomes) for c in LATENCY_COLUMNS),
    )


@dataclass(frozen=True)
class _Family:
    """A kind of rollup: its keys, its measures, its tables and its part of a Tally."""

    keys: tuple[str, ...]
    measures: tuple[str, ...]
    hourly: Table
    daily: Table | None
    entries: Callable[[Tally], Mapping[tuple[Any, ...], Sequence[float]]]
    model_keys: tuple[str, ...]  # the keys a model filter matches


_USAGE = _Family(
    ROLLUP_KEYS, USAGE_MEASURES, usage_hourly, usage_daily, lambda t: t.usage, ("model",)
)
_ESCALATIONS = _Family(
    ESCALATION_KEYS,
    ("escalations",),
    escalations_hourly,
    escalations_daily,
    Tally.escalation_counts,
    ("from_model", "to_model"),
)

Sums = dict[tuple[Any, ...], list[float]]


def _sql_sums(
    conn: Any,
    family: _Family,
    seg: Segment,
    filters: Filters,
    by: Sequence[str],
    measures: Sequence[str],
) -> Sums:
    """The plain sums of `measures` per group of `by` (and per outcome, when `by` names
    it) over a segment's rollup rows: no CASE per row, which SQLite evaluates slowly."""
    table = family.daily if seg.grain == "day" and family.daily is not None else family.hourly
    when = table.c[seg.grain]
    groups: list[ColumnElement[Any]] = []
    for key in by:
        if key == "day":
            groups.append(when if seg.grain == "day" else when // 24)
        else:
            groups.append(when if key == "hour" else table.c[key])
    sums = [func.sum(table.c[m]) for m in measures]
    query = select(*groups, *sums).where(*_where(table, family, seg, filters))
    if groups:
        query = query.group_by(*groups)
    out: Sums = {}
    for row in conn.execute(query):
        out[tuple(row[: len(groups)])] = [_number(v) for v in row[len(groups) :]]
    return out


def _number(value: Any) -> float:
    """A SUM as Python sums it: PostgreSQL's SUM of a bigint is a numeric (Decimal)."""
    if value is None:
        return 0
    return int(value) if isinstance(value, Decimal) else value


def _where(table: Table, family: _Family, seg: Segment, filters: Filters) -> list[Any]:
    when = table.c[seg.grain]
    where: list[Any] = []
    if seg.lo is not None:
        where.append(when >= seg.lo)
    if seg.hi is not None:
        where.append(when < seg.hi)
    if filters.task_class is not None:
        where.append(table.c.task_class == filters.task_class)
    if filters.app is not None:
        where.append(table.c.app == filters.app)
    if filters.model is not None:
        where.append(or_(*(table.c[k] == filters.model for k in family.model_keys)))
    return where


def _tally_sums(
    tally: Tally, family: _Family, filters: Filters, by: Sequence[str], measures: Sequence[str]
) -> Sums:
    """_sql_sums over a Tally's rows (the raw edges of a window): the same sums."""
    at = {k: i + 1 for i, k in enumerate(family.keys)}  # a key's place after the hour
    measure_at = [family.measures.index(m) for m in measures]
    wanted = [
        (at[k], v)
        for k, v in (("task_class", filters.task_class), ("app", filters.app))
        if v is not None
    ]
    out: Sums = {}
    for key, values in family.entries(tally).items():
        if any(key[i] != v for i, v in wanted):
            continue
        model = filters.model
        if model is not None and all(key[at[k]] != model for k in family.model_keys):
            continue
        hour = key[0]
        group = tuple(hour // 24 if k == "day" else hour if k == "hour" else key[at[k]] for k in by)
        sums = out.setdefault(group, [0] * len(measures))
        for i, m in enumerate(measure_at):
            sums[i] += values[m]
    return out


def _fold(raw: Sums, grouped: int, measures: Sequence[str], aggs: Sequence[Agg]) -> Sums:
    """The aggregates per group from sums per group and split (_split_by: the outcome,
    the task class, after the first `grouped` values of a key of `raw`)."""
    measure_at = {m: i for i, m in enumerate(measures)}
    split = _split_by(aggs)
    out: Sums = {}
    for key, sums in raw.items():
        named = dict(zip(split, key[grouped:], strict=True))
        into = out.setdefault(key[:grouped], [0] * len(aggs))
        for i, agg in enumerate(aggs):
            if agg.counts(named.get("outcome"), named.get("task_class")):
                into[i] += sums[measure_at[agg.measure]]
    return out


def _merge(into: Sums, part: Sums) -> None:
    for key, sums in part.items():
        found = into.get(key)
        if found is None:
            into[key] = list(sums)
        else:
            for i, value in enumerate(sums):
                found[i] += value


def _edge_tally(conn: Any, lo: datetime, hi: datetime) -> Tally:
    """The rollup rows of the raw rows started in [lo, hi): every job that has one is read
    whole, so that its job figures land where the rollups put them."""
    inside = and_(attempts.c.started_at >= lo, attempts.c.started_at < hi)
    touched = select(attempts.c.job_id).where(inside)
    query = (
        select(*ROW_COLUMNS, case((inside, 1), else_=0).label("inside"))
        .where(attempts.c.job_id.in_(touched))
        .order_by(attempts.c.job_id, attempts.c.attempt)
    )
    tally = Tally()

    def within(row: Mapping[str, Any]) -> bool:
        return bool(row["inside"])

    for _job_id, rows in group_by_job(conn.execute(query).mappings()):
        for row in rows:
            if within(row):
                tally.add_row(row)
        tally.add_job(rows, +1, within=within)
    return tally


# --- the figures ----------------------------------------------------------------------------


def _label(key: str, value: Any) -> Any:
    if key == "day":
        return day_label(int(value))
    if key == "hour":
        return hour_label(int(value))
    if key in NULLABLE_KEYS and value == "":
        return None
    return value


def figures(sums: Mapping[str, float], prices: Prices) -> dict[str, Any]:
    """A group's figures from its FIGURES sums, with the saving against `prices`."""
    tokens_in, tokens_out = int(sums["prompt_tokens"]), int(sums["completion_tokens"])
    cost = float(sums["cost_usd"])
    embedding = int(sums["embedding_tokens"])  # priced at the paid embedding model's
    reference = ((tokens_in - embedding) * prices[0] + tokens_out * prices[1]) / 1e6
    reference += embedding * prices[2] / 1e6
    counts = ("attempts", "jobs", "answered", "escalated_jobs", "errors", "skipped", "orphaned")
    embedded, cached = int(sums["embedded_items"]), int(sums["cached_items"])
    cached_tokens = int(sums["cached_tokens"])
    return {
        **{name: int(sums[name]) for name in counts},
        "prompt_tokens": tokens_in,
        "completion_tokens": tokens_out,
        "tokens_estimated": int(sums["tokens_estimated"]),
        "cost_usd": round(cost, DIGITS),
        "saving_usd": round(reference - cost, DIGITS),
        "orphaned_cost_usd": round(float(sums["orphaned_cost_usd"]), DIGITS),  # estimated
        "embedded_items": embedded,
        "cached_items": cached,
        "cache_hit_rate": cached / (cached + embedded) if cached + embedded else None,
        "cached_tokens": cached_tokens,
        "cache_saved_usd": round(float(sums["cache_saved_usd"]), DIGITS),
        "cache_saved_vs_reference_usd": round(cached_tokens * prices[2] / 1e6, DIGITS),
    }


def percentile_ms(buckets: Sequence[float], q: float) -> float | None:
    """The q-quantile of a latency histogram (schema.py's buckets), interpolated within its
    bucket on a log scale (linearly in the first); None for an empty one."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, count in enumerate(buckets):
        if count <= 0:
            continue
        if seen + count >= rank or i == len(buckets) - 1:
            part = min(max((rank - seen) / count, 0.0), 1.0)
            if i == 0:
                return part * LATENCY_BOUNDS_MS[0]
            if i == len(LATENCY_BOUNDS_MS):
                return LATENCY_BOUNDS_MS[-1]  # past the last bound: at least this
            lo, hi = LATENCY_BOUNDS_MS[i - 1], LATENCY_BOUNDS_MS[i]
            return float(lo * (hi / lo) ** part)
        seen += count
    return None


@dataclass
class Usage:
    """The ledger's figures for one set of filters. Cheap to make: one per request. The raw
    edges of the window are read once, on first use."""

    ledger: Ledger
    filters: Filters = field(default_factory=Filters)
    catalog: Catalog | None = None
    _edges: dict[tuple[datetime, datetime], Tally] = field(default_factory=dict, repr=False)
    _open: Connection | None = field(default=None, repr=False)

    @property
    def prices(self) -> Prices:
        return reference_prices(self.catalog)

    def _sums(self, family: _Family, by: Sequence[str], aggs: Sequence[Agg]) -> Sums:
        for key in by:
            if key not in ("day", "hour", *family.keys):
                valid = ", ".join((*family.keys, "day", "hour"))
                raise ConfigError(f"cannot group by {key!r} (valid: {valid})")
        days = family.daily is not None and "hour" not in by
        measures = list(dict.fromkeys(a.measure for a in aggs))
        # Figures of some outcomes or classes only are summed per those, then folded.
        keys = [*by, *_split_by(aggs)]
        raw: Sums = {}
        with self._connection() as conn:
            for seg in segments(self.filters.since, self.filters.until, days):
                if seg.grain == "raw":
                    tally = self._edges.get((seg.lo, seg.hi))
                    if tally is None:
                        tally = self._edges[(seg.lo, seg.hi)] = _edge_tally(conn, seg.lo, seg.hi)
                    part = _tally_sums(tally, family, self.filters, keys, measures)
                else:
                    part = _sql_sums(conn, family, seg, self.filters, keys, measures)
                _merge(raw, part)
        return _fold(raw, len(by), measures, aggs)

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """The connection of the reading under way (page() reads on one), or a new one.
        On PostgreSQL it reads one snapshot (REPEATABLE READ); SQLite's read transaction
        is one already."""
        if self._open is not None:
            yield self._open
            return
        self.ledger.ensure_schema()
        with self.ledger.engine.connect() as conn:
            if self.ledger.dialect == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            self._open = conn
            try:
                yield conn
            finally:
                self._open = None

    def _grouped(self, by: Sequence[str]) -> list[dict[str, Any]]:
        prices = self.prices
        rows = []
        for key, sums in self._sums(_USAGE, by, FIGURES).items():
            named = dict(zip((a.name for a in FIGURES), sums, strict=True))
            if named["attempts"] == 0:
                continue  # a key whose rows all moved their job elsewhere
            labels = {k: _label(k, v) for k, v in zip(by, key, strict=True)}
            rows.append({**labels, **figures(named, prices)})
        return rows

    def totals(self) -> dict[str, Any]:
        """The figures of every row in the window."""
        found = self._sums(_USAGE, (), FIGURES).get(())
        named = dict(zip((a.name for a in FIGURES), found or [0] * len(FIGURES), strict=True))
        return figures(named, self.prices)

    def by(self, *keys: str) -> list[dict[str, Any]]:
        """One row per group of `keys` (GROUPS: a rollup key, `day` or `hour`, UTC): the
        keys' values (YYYY-MM-DD, YYYY-MM-DDTHH:00Z; None for no app, focus, profile or
        error kind), then figures(). In time order when grouped by time, else most
        expensive first."""
        rows = self._grouped(keys)
        if "day" in keys or "hour" in keys:
            rows.sort(key=lambda r: tuple(str(r[k]) for k in keys))
        else:
            rows.sort(key=lambda r: (-r["cost_usd"], -r["attempts"], *(str(r[k]) for k in keys)))
        return rows

    def latency(
        self,
        by: str = "model",
        quantiles: Sequence[float] = QUANTILES,
        outcomes: tuple[str, ...] = ("ok",),
    ) -> list[dict[str, Any]]:
        """Per `by`: calls (ok and error), errors, error_rate, and over the calls of
        `outcomes` (default: the answers) mean_ms and p50_ms, p95_ms, p99_ms (estimated from
        the histogram: within a sixth of a decade, about ±20%, at worst). Most calls first."""
        aggs = _latency_aggs(outcomes)
        rows = []
        for key, sums in self._sums(_USAGE, (by,), aggs).items():
            ok, errors, timed, total_ms = (int(sums[0]), int(sums[1]), int(sums[2]), sums[3])
            if ok + errors == 0:
                continue
            buckets = sums[4:]
            row: dict[str, Any] = {
                by: _label(by, key[0]),
                "calls": ok + errors,
                "errors": errors,
                "error_rate": errors / (ok + errors),
                "mean_ms": total_ms / timed if timed else None,
            }
            for q in quantiles:
                row[f"p{q * 100:g}_ms"] = percentile_ms(buckets, q)
            rows.append(row)
        rows.sort(key=lambda r: (-r["calls"], str(r[by])))
        return rows

    def tiers(self) -> list[dict[str, Any]]:
        """Per tier (cheapest first), the jobs it ended: jobs, answered, failed,
        escalated_jobs (answered or not by a model other than the first tried), and share:
        its answered jobs over all jobs in the window."""
        rows = [r for r in self._grouped(("tier",)) if r["jobs"]]
        every = sum(r["jobs"] for r in rows)
        out = [
            {
                "tier": r["tier"],
                "jobs": r["jobs"],
                "answered": r["answered"],
                "failed": r["jobs"] - r["answered"],
                "escalated_jobs": r["escalated_jobs"],
                "share": r["answered"] / every if every else 0.0,
            }
            for r in rows
        ]
        order = {tier: i for i, tier in enumerate(TIERS)}
        out.sort(key=lambda r: (order.get(r["tier"], len(order)), r["tier"]))
        return out

    def escalations(
        self, by: Sequence[str] = ("from_model", "to_model", "reason")
    ) -> list[dict[str, Any]]:
        """How many times jobs went from one model to another, per `by` (ESCALATION_KEYS,
        `day` or `hour`): {**keys, "escalations": n}, most first (in time order when
        grouped by time)."""
        rows = []
        for key, (count,) in self._sums(
            _ESCALATIONS, by, (Agg("escalations", "escalations"),)
        ).items():
            if count:
                labels = {k: _label(k, v) for k, v in zip(by, key, strict=True)}
                rows.append({**labels, "escalations": int(count)})
        if "day" in by or "hour" in by:
            rows.sort(key=lambda r: tuple(str(r[k]) for k in by))
        else:
            rows.sort(key=lambda r: (-r["escalations"], *(str(r[k]) for k in by)))
        return rows

    def embedding_cache(self, by: str = "model") -> list[dict[str, Any]]:
        """Per `by` (a rollup key, `day` or `hour`), the groups whose answers embedded
        inputs or took them from the cache: {by, *CACHE_FIGURES}, most inputs first."""
        rows = [
            {by: r[by], **{k: r[k] for k in CACHE_FIGURES}}
            for r in self._grouped((by,))
            if r["embedded_items"] or r["cached_items"]
        ]
        if by in ("day", "hour"):
            rows.sort(key=lambda r: str(r[by]))
        else:
            rows.sort(key=lambda r: (-(r["embedded_items"] + r["cached_items"]), str(r[by])))
        return rows

    def page(self) -> dict[str, Any]:
        """What the dashboard shows for these filters, as JSON-ready data."""
        f = self.filters
        with self._connection():
            return self._page(f)

    def _page(self, f: Filters) -> dict[str, Any]:
        return {
            "filters": {
                "since": f.since.isoformat() if f.since else None,
                "until": f.until.isoformat() if f.until else None,
                "task_class": f.task_class,
                "app": f.app,
                "model": f.model,
            },
            "reference_model": REFERENCE_MODEL,
            "embedding_reference_model": EMBEDDING_REFERENCE_MODEL,
            "totals": self.totals(),
            "by_day_and_tier": self.by("day", "tier"),
            **{f"by_{k}": self.by(k) for k in PAGE_GROUPS},
            "tiers": self.tiers(),
            "latency": self.latency(),
            "escalations": self.escalations(),
            "embedding_cache": self.embedding_cache(),
        }


PAGE_GROUPS = ("model", "task_class", "app", "source", "focus", "profile")
