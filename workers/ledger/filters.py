"""What a question to the ledger names, light enough for the command line's parser (no
SQLAlchemy): a window and filters (Filters), ages and dates (parse_since), the paid models
a saving is measured against, and UTC day and hour labels. workers/ledger/query.py answers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from router.catalog import Catalog
from router.errors import ConfigError

REFERENCE_MODEL = "litellm/kimi"
REFERENCE_PRICES: tuple[float, float] = (
    0.56,
    2.94,
)  # $/1M tokens in, out: when the catalog has no litellm/kimi
# Embedding tokens are measured against a paid embedding model, not the chat primary (at
# 28x its price, the saving of a fleet that embeds much would be mostly fiction): OpenAI's
# text-embedding-3-small, the usual paid choice, at its list price ($ per 1M tokens).
EMBEDDING_REFERENCE_MODEL = "openai/text-embedding-3-small"
EMBEDDING_REFERENCE_PRICE = 0.02
_AGE = re.compile(r"^(\d+)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
SINCE_HELP = "an age like 30m, 24h, 7d (units s, m, h, d, w) or a UTC date like 2025-01-31"
_EPOCH = date(1970, 1, 1)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """The UTC instant `text` names: an age back from now, or a date/time (UTC if naive)."""
    now = now or datetime.now(UTC)
    value = text.strip()
    age = _AGE.match(value)
    if age:
        return now - timedelta(seconds=int(age.group(1)) * _UNIT_S[age.group(2)])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is neither an age nor a date: give {SINCE_HELP}") from None
    return _utc(when)


Prices = tuple[float, float, float]  # $/1M tokens: chat in, chat out, embedding


def reference_prices(catalog: Catalog | None) -> Prices:
    model = catalog.by_id.get(REFERENCE_MODEL) if catalog else None
    chat = (model.usd_per_mtok_in, model.usd_per_mtok_out) if model else REFERENCE_PRICES
    return (*chat, EMBEDDING_REFERENCE_PRICE)


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def day_label(day: int) -> str:
    """A day number (UTC days since 1970-01-01) as YYYY-MM-DD."""
    return (_EPOCH + timedelta(days=day)).isoformat()


def hour_label(hour: int) -> str:
    """An hour number (UTC hours since the epoch) as YYYY-MM-DDTHH:00Z."""
    return datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y-%m-%dT%H:00Z")


@dataclass(frozen=True)
class Filters:
    """Which rows count: started in [since, until) (None: unbounded; naive means UTC), and
    of this task class, app and model (None: any). For escalations, `model` matches the
    model left or the model taken."""

    since: datetime | None = None
    until: datetime | None = None
    task_class: str | None = None
    app: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            when = getattr(self, name)
            if when is not None:
                object.__setattr__(self, name, _utc(when))

    @classmethod
    def days(cls, first: date, last: date | None = None, **filters: Any) -> Filters:
        """The UTC days first to last (default: first alone), both included."""
        last = last or first
        if last < first:
            raise ConfigError(f"the date range ends ({last}) before it starts ({first})")
        since = datetime(first.year, first.month, first.day, tzinfo=UTC)
        until = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
        return cls(since=since, until=until, **filters)
