"""Keys per app: created once and shown once, stored hashed in the ledger database,
checked in constant time, revoked for good.

A key reads `mf-<key id>-<secret>`: the key id is public (it names the key in
`fleet keys list`), the secret is 32 random bytes. The table holds the SHA-256 of the
whole key: a key is long and random, so a fast hash is enough and a slow one would only
slow every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update

from router.catalog import TASK_CLASSES
from router.errors import InvalidJob, choices
from workers.ledger.schema import app_keys
from workers.ledger.store import Ledger
from workers.state.apps import AppLimits

KEY_PREFIX = "mf"
CACHE_S = 2.0  # a revoked key stops working within this
_APP = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_KEY = re.compile(r"^mf-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$")
_NO_SUCH_KEY = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class AppKey:
    key_id: str
    app: str
    limits: AppLimits
    classes: frozenset[str] | None  # None: every task class
    created_at: datetime
    revoked_at: datetime | None = None
    admin: bool = False  # sees the whole fleet on the dashboard and /metrics

    def as_dict(self) -> dict[str, object]:
        """What `fleet keys list` shows: never the key."""
        return {
            "key_id": self.key_id,
            "app": self.app,
            "usd_per_day": self.limits.usd_per_day,
            "usd_per_month": self.limits.usd_per_month,
            "requests_per_min": self.limits.requests_per_min,
            "classes": sorted(self.classes) if self.classes is not None else None,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "admin": self.admin,
        }


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_app(app: str) -> str:
    if not _APP.match(app):
        raise InvalidJob(f"app name {app!r} is not valid (1-64 of A-Z a-z 0-9 . _ -)")
    return app


def check_classes(classes: list[str] | None) -> frozenset[str] | None:
    if classes is None:
        return None
    unknown = [c for c in classes if c not in TASK_CLASSES]
    if unknown or not classes:
        raise InvalidJob(
            f"unknown task class {unknown[0] if unknown else ''!r} (valid: {choices(TASK_CLASSES)})"
        )
    return frozenset(classes)


class KeyStore:
    """The `app_keys` table of a ledger, and a short cache of what it says."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._cache: dict[str, tuple[float, tuple[str, AppKey] | None]] = {}
        self._lock = threading.Lock()

    def create(
        self,
        app: str,
        limits: AppLimits,
        classes: list[str] | None = None,
        admin: bool = False,
    ) -> tuple[str, AppKey]:
        """A new key for `app`: (the key, shown this once; what is stored of it). An
        admin key also sees the whole fleet on the dashboard and /metrics."""
        check_app(app)
        allowed = check_classes(classes)
        for value, name in (
            (limits.usd_per_day, "usd per day"),
            (limits.usd_per_month, "usd per month"),
        ):
            if value is not None and not value >= 0:
                raise InvalidJob(f"{name} must be 0 or more (got {value})")
        if limits.requests_per_min is not None and limits.requests_per_min < 1:
            raise InvalidJob(f"requests per min must be 1 or more (got {limits.requests_per_min})")
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
        row = AppKey(key_id, app, limits, allowed, datetime.now(UTC), admin=admin)
        self.ledger.ensure_schema()
        with self.ledger.engine.connect() as conn:
            conn.execution_options(ledger_write=True)
            with conn.begin():
                conn.execute(
                    app_keys.insert().values(
                        key_id=key_id,
                        key_sha256=_digest(key),
                        app=app,
                        usd_per_day=limits.usd_per_day,
                        usd_per_month=limits.usd_per_month,
                        requests_per_min=limits.requests_per_min,
                        classes=",".join(sorted(allowed)) if allowed is not None else None,
                        created_at=row.created_at,
                        admin=admin or None,
                    )
                )
        return key, row

    def list(self) -> list[AppKey]:
        self.ledger.ensure_schema()
        with self.ledger.engine.connect() as conn:
            rows = conn.execute(select(app_keys).order_by(app_keys.c.created_at)).mappings()
            return [_key_of(row) for row in rows]

    def revoke(self, key_id: str) -> AppKey:
        """Revoke a key for good; InvalidJob naming the known keys if there is no such key."""
        self.ledger.ensure_schema()
        now = datetime.now(UTC)
        with self.ledger.engine.connect() as conn:
            conn.execution_options(ledger_write=True)
            with conn.begin():
                done = conn.execute(
                    update(app_keys)
                    .where(app_keys.c.key_id == key_id, app_keys.c.revoked_at.is_(None))
                    .values(revoked_at=now)
                )
        if not done.rowcount:
            known = [k.key_id for k in self.list() if k.revoked_at is None]
            raise InvalidJob(f"no active key {key_id!r} (active: {', '.join(known) or 'none'})")
        with self._lock:
            self._cache.pop(key_id, None)
        return next(k for k in self.list() if k.key_id == key_id)

    def cached(self, presented: str) -> AppKey | bool | None:
        """verify() when what it needs is in the cache (no database read): the key or
        None; False when the database must be read (call verify() then)."""
        match = _KEY.match(presented)
        if not match:
            return self.verify(presented)  # no key id: no read, refused in constant time
        with self._lock:
            cached = self._cache.get(match.group(1))
        if cached is None or cached[0] <= time.monotonic():
            return False
        return self.verify(presented)

    def verify(self, presented: str) -> AppKey | None:
        """The active key `presented` is, or None. The digests are compared in constant
        time, and an unknown key id costs the same comparison as a known one."""
        match = _KEY.match(presented)
        key_id = match.group(1) if match else ""
        stored = self._stored(key_id) if key_id else None
        expected = stored[0] if stored else _NO_SUCH_KEY
        same = hmac.compare_digest(_digest(presented), expected)
        if not same or stored is None or stored[1].revoked_at is not None:
            return None
        return stored[1]

    def active(self, key_id: str) -> AppKey | None:
        """The key of this id if it is not revoked (a dashboard session holds the id, not
        the key): read through the same cache, so a revoke takes effect within CACHE_S."""
        stored = self._stored(key_id)
        if stored is None or stored[1].revoked_at is not None:
            return None
        return stored[1]

    def _stored(self, key_id: str) -> tuple[str, AppKey] | None:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        self.ledger.ensure_schema()
        with self.ledger.engine.connect() as conn:
            row = conn.execute(select(app_keys).where(app_keys.c.key_id == key_id)).mappings()
            found = next(iter(row), None)
        value = (str(found["key_sha256"]), _key_of(found)) if found else None
        with self._lock:
            self._cache[key_id] = (now + CACHE_S, value)
        return value


def _key_of(row: object) -> AppKey:
    r = dict(row)  # type: ignore[call-overload]
    classes = r["classes"]
    return AppKey(
        key_id=r["key_id"],
        app=r["app"],
        limits=AppLimits(r["usd_per_day"], r["usd_per_month"], r["requests_per_min"]),
        classes=frozenset(classes.split(",")) if classes else None,
        created_at=_aware(r["created_at"]),
        revoked_at=_aware(r["revoked_at"]) if r["revoked_at"] else None,
        admin=bool(r.get("admin")),
    )


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)
