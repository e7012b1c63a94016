"""Apps behind the gateway, as live state: each app's requests per minute and its USD
per day and per month, counted fleet-wide in Redis.

A request is admitted with its worst-case cost set aside (`app_admit`: one script per
request, so concurrent requests never spend past a cap); its job carries the reservation, and the
worker settles it to the job's real cost together with the job's final state
(store_result.lua). A job that never runs is refunded (`refund`). Settling happens once
per job, whoever does it first.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from router.jobs import Job, Reservation
from workers.state import keys
from workers.state.connections import Pipeline

DAY_TTL_S = 2 * 86_400
MONTH_TTL_S = 33 * 86_400
OWNER_TTL_S = 86_400


@dataclass(frozen=True)
class AppLimits:
    usd_per_day: float | None = None
    usd_per_month: float | None = None
    requests_per_min: int | None = None


@dataclass(frozen=True)
class Owner:
    """Who sent a job through the gateway (its owner key, keys.owner), what its app set
    aside for it, and what the job is: enough to answer for it, and end it, before any
    worker has seen it."""

    app: str
    reservation: Reservation
    task_class: str
    source: str

    def encode(self) -> str:
        r = self.reservation
        fields = {"app": self.app, "usd": r.usd, "day": r.day, "month": r.month}
        return json.dumps({**fields, "task_class": self.task_class, "source": self.source})

    @classmethod
    def decode(cls, raw: bytes | str) -> Owner:
        entry = json.loads(raw)
        reservation = Reservation(usd=entry["usd"], day=entry["day"], month=entry["month"])
        return cls(str(entry["app"]), reservation, str(entry["task_class"]), str(entry["source"]))


@dataclass(frozen=True)
class Refused:
    """Why an app's request is refused now, and in how many seconds to try again."""

    reason: str
    retry_after_s: float


def app_admit(
    redis: Any,
    requests: Sequence[tuple[str, AppLimits, float, Job]],
    now: datetime | None = None,
) -> list[Reservation | Refused]:
    """For each (app, limits, worst USD, job), in order, in one round trip: take the
    request's slot and set its worst-case cost aside, or say which limit is full (one
    script call each: every request is admitted or refused on its own). The job is
    recorded as the app's (`Owner`) in the same step."""
    now = now or datetime.now(UTC)
    day, month = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")
    batch = Pipeline(redis)
    owners = []
    for app, limits, worst_usd, job in requests:
        reservation = Reservation(usd=worst_usd, day=day, month=month)
        owner = Owner(app, reservation, job.task_class, job.source)
        owners.append(owner)
        batch.script(
            "app_admit",
            [
                keys.app_requests(app),
                keys.app_spend(app, "day", day),
                keys.app_spend(app, "month", month),
                keys.owner(job.id),
            ],
            [
                uuid.uuid4().hex,
                limits.requests_per_min or 0,
                worst_usd,
                -1 if limits.usd_per_day is None else limits.usd_per_day,
                -1 if limits.usd_per_month is None else limits.usd_per_month,
                DAY_TTL_S,
                MONTH_TTL_S,
                owner.encode(),
                OWNER_TTL_S,
            ],
        )
    replies = batch.execute()
    return [
        owner.reservation if int(reply[0]) == 1 else _refused(reply, limits, worst, now)
        for reply, owner, (_, limits, worst, _) in zip(replies, owners, requests, strict=True)
    ]


def _refused(reply: Any, limits: AppLimits, worst_usd: float, now: datetime) -> Refused:
    which = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
    spent = float(reply[3])
    if which == "requests":
        return Refused(
            f"the key's limit of {limits.requests_per_min} requests per minute is reached",
            max(0.001, int(reply[2]) / 1000),
        )
    cap = limits.usd_per_day if which == "day" else limits.usd_per_month
    ends = _period_end(now, which)
    return Refused(
        f"the key's budget of ${cap:.4f} per {which} would be passed: ${spent:.6f} spent or"
        f" set aside, and this request may cost up to ${worst_usd:.6f}",
        max(1.0, (ends - now).total_seconds()),
    )


def _period_end(now: datetime, period: str) -> datetime:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return start + timedelta(days=1)
    return (start.replace(day=1) + timedelta(days=32)).replace(day=1)


def settle_keys(app: str, job_id: str, reservation: Reservation) -> list[str]:
    """The keys a settlement of this job's reservation writes (marker, day, month)."""
    return [
        keys.settled(job_id),
        keys.app_spend(app, "day", reservation.day),
        keys.app_spend(app, "month", reservation.month),
    ]


def refund(redis: Any, app: str, job_id: str, reservation: Reservation) -> bool:
    """Give back the whole reservation of a job that will not run; False when the job was
    settled already (it ran after all)."""
    batch = Pipeline(redis)
    batch.script("refund", settle_keys(app, job_id, reservation), [reservation.usd])
    return bool(batch.execute()[0])


def revoke(
    redis: Any,
    job_id: str,
    state_json: str,
    expires_s: int,
    app: str,
    reservation: Reservation | None,
) -> str:
    """Revoke a job (scripts/revoke.lua): 'REVOKED' (ended now: it was not delivered yet),
    'REVOKING' (a worker holds it: its next delivery ends it), or 'ENDED <status>' for a
    job that has its final status already."""
    script_keys = [keys.result(job_id), keys.revoked(job_id)]
    args: list[Any] = [state_json, expires_s, ""]
    if reservation is not None:
        script_keys += settle_keys(app, job_id, reservation)
        args[2] = reservation.usd
    batch = Pipeline(redis)
    batch.script("revoke", script_keys, args)
    answer = batch.execute()[0]
    return answer.decode() if isinstance(answer, bytes) else str(answer)


def owner_of(raw: bytes | str | None) -> Owner | None:
    """Who sent a job through the gateway, from the job's owner key (keys.owner), if any."""
    return Owner.decode(raw) if raw else None
