"""The Celery beat schedule: heartbeat and cron jobs, pinned to the free and local queues.

`SCHEDULE` is the data: a name, when (seconds between firings, or a five-field cron
spec "minute hour day-of-month month day-of-week" in the app's timezone, UTC by default)
and the Job to send. `beat_schedule()` turns it into Celery's `beat_schedule` setting:
every job is validated and routed when the schedule is built, so a broken entry stops
beat at start with the entry's name, not at 02:00 in a worker log.

Jobs carry no `id`: the worker takes the Celery task id, fresh for every firing. Their
source is cron or heartbeat, so rule 4 keeps them on the free and local tiers, on
escalation too. Each carries its entry's name (`metadata.beat_entry`): an entry that
cannot run (no key set, no local model) fails at every firing, and is filed as a dead
letter once per cause, not per firing; `fleet status` shows it failing, with its repeats
(workers/state/beathealth.py).

`celery -A workers beat -s PATH` runs it (one beat per fleet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from celery.schedules import crontab

from router.catalog import Catalog, load_catalog
from router.errors import ConfigError, FleetError
from router.jobs import parse_job
from router.policy import route_job
from workers.runtime.sending import TASK_RUN_JOB, describe
from workers.state.beathealth import BEAT_SOURCES, ENTRY_FIELD

CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")


@dataclass(frozen=True)
class Entry:
    name: str
    every: float | str  # seconds between firings, or a cron spec such as "0 2 * * *"
    job: dict[str, Any] = field(default_factory=dict)


def _ask(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


SCHEDULE: list[Entry] = [
    Entry(
        "heartbeat",
        300.0,
        {
            "task_class": "heartbeat",
            "source": "heartbeat",
            "messages": [{"role": "user", "content": "ping: reply with one word, ok"}],
            "max_tokens": 8,
        },
    ),
    Entry(
        "inbox-digest",
        "0 * * * *",
        {
            "task_class": "cost_free",
            "source": "cron",
            "messages": _ask(
                "You write short, factual inbox digests. No greetings, no filler.",
                "Digest the messages that arrived in the last hour: at most five bullet"
                " points, most urgent first, each with its sender and the action it asks"
                " for. If nothing needs attention, reply 'Nothing new.'",
            ),
            "max_tokens": 512,
            "temperature": 0.2,
        },
    ),
    Entry(
        "nightly-summary",
        "0 2 * * *",
        {
            "task_class": "cost_free",
            "source": "cron",
            "messages": _ask(
                "You write a concise nightly report for the operator of an LLM job fleet.",
                "Summarise yesterday: what was done, what failed and why, what is waiting"
                " for a decision, and the three priorities for today. Plain text, under"
                " 300 words.",
            ),
            "max_tokens": 1024,
            "temperature": 0.3,
        },
    ),
]


def beat_schedule(
    catalog: Catalog | None = None,
    *,
    every_s: float | None = None,
    entries: list[Entry] | None = None,
) -> dict[str, dict[str, Any]]:
    """Celery's `beat_schedule` setting for `entries` (default SCHEDULE), each routed with
    `catalog` (default: the catalog in force). `every_s` replaces every entry's timing
    with that many seconds: a knob for tests and demos (FLEET_BEAT_EVERY_S), not for
    production."""
    catalog = catalog or load_catalog()
    entries = SCHEDULE if entries is None else entries
    names = [entry.name for entry in entries]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"beat schedule: duplicate entry names {dupes}")
    if every_s is not None and not every_s > 0:
        raise ConfigError(f"beat schedule: every_s must be above 0 (got {every_s})")
    return {entry.name: _celery_entry(catalog, entry, every_s) for entry in entries}


def _celery_entry(catalog: Catalog, entry: Entry, every_s: float | None) -> dict[str, Any]:
    try:
        return _build(catalog, entry, every_s)
    except (FleetError, ValueError, TypeError) as exc:
        raise ConfigError(f"beat entry {entry.name!r}: {exc}") from exc


def _build(catalog: Catalog, entry: Entry, every_s: float | None) -> dict[str, Any]:
    if "id" in entry.job:
        raise ValueError("a beat job must not set 'id': every firing needs its own")
    source = entry.job.get("source")
    if source not in BEAT_SOURCES:
        raise ValueError(f"a beat job's source must be 'cron' or 'heartbeat' (got {source!r})")
    metadata = {**entry.job.get("metadata", {}), ENTRY_FIELD: entry.name}
    job = parse_job({**entry.job, "metadata": metadata})
    decision = route_job(catalog, job)
    payload = job.model_dump(mode="json", exclude_none=True, exclude={"id"})
    first = decision.chain[0]
    return {
        "task": TASK_RUN_JOB,
        "schedule": float(every_s) if every_s is not None else _schedule(entry.every),
        "kwargs": {"job": payload},
        "options": {
            "queue": first.queue,
            "priority": job.priority,
            "argsrepr": "()",
            "kwargsrepr": describe(
                {"id": f"beat:{entry.name}", "task_class": job.task_class, "source": job.source},
                first.model,
            ),
        },
    }


def _schedule(every: float | str) -> float | crontab:
    if isinstance(every, str):
        fields = every.split()
        if len(fields) != len(CRON_FIELDS):
            raise ValueError(
                f"cron spec {every!r} needs 5 fields (minute hour day-of-month month day-of-week)"
            )
        return crontab(**dict(zip(CRON_FIELDS, fields, strict=True)))
    if isinstance(every, bool) or not isinstance(every, int | float) or not every > 0:
        raise ValueError(f"interval must be a number of seconds above 0 (got {every!r})")
    return float(every)
