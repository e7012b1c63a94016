"""The health of beat's entries: a heartbeat or cron job that cannot run (no key set, no
local model) fails at every firing; it is reported once, not filed every 5 minutes.

Every job beat fires carries its entry's name (`metadata.beat_entry`, beat_schedule.py).
When it ends, its worker hands `run_of()` to the result store, whose script keeps one
field per entry in `fleet:beat:health` (scripts/beat.lua), in the same step as the job's
final state: failing since when, why, how many repeats. A failure whose cause the entry
already failed with since it started failing is counted, not filed again as a dead
letter; the first failure, and each new cause, is filed and logged once (`report()`);
so is the recovery. `fleet status` shows every entry's health (`entries()`).

A cause is what stopped each model of the chain (`cause()`), not the error's text, which
changes from one firing to the next: times, the order of the attempts, and whether a
model failed again or was still resting from its last failure ("cooldown until ...
(not_found)" is the same cause as not_found).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from router.results import Result
from workers.state import keys

log = logging.getLogger(__name__)

BEAT_SOURCES = ("cron", "heartbeat")
ENTRY_FIELD = "beat_entry"  # the metadata field naming a job's beat entry
REASON_CHARS = 500


@dataclass(frozen=True)
class BeatRun:
    """How one job fired by beat ended, as beat.lua reads it."""

    entry: str
    ok: bool
    cause: str = ""
    reason: str = ""

    def encode(self) -> str:
        return json.dumps(asdict(self))


def run_of(job: dict[str, Any], result: Result) -> BeatRun | None:
    """The beat run of a finished job (None when beat did not fire it)."""
    entry = (job.get("metadata") or {}).get(ENTRY_FIELD)
    if not entry or job.get("source") not in BEAT_SOURCES:
        return None
    if result.ok:
        return BeatRun(str(entry), True)
    reason = (result.error or "")[:REASON_CHARS]
    return BeatRun(str(entry), False, cause(result), reason)


# "no usable model (m1: cooldown until 10:00:00 UTC (not_found); m2: ...)[; tried: ...]"
_BLOCKED = re.compile(r"no usable model \((?P<blocks>.*?)\)(?:; tried: |$)")
# one model's block: "model: why", the model id holding no spaces (it may hold ':')
_BLOCK = re.compile(r"(?P<model>\S+?): (?P<why>.*)")
_COOLDOWN = re.compile(r"cooldown until .*\((?P<kind>[^()]*)\)$")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def cause(result: Result) -> str:
    """What stopped the job, stable from one firing to the next: per model, the kind of
    its failure or of the block it met; else the error with its numbers blanked."""
    stops = {f"{a.model}: {a.error_kind}" for a in result.attempts if a.outcome != "ok"}
    stops |= _blocked(result.error or "")
    if stops:
        return "; ".join(sorted(stops))
    return _NUMBER.sub("#", result.error or "failed")[:REASON_CHARS]


def _blocked(error: str) -> set[str]:
    """'model: kind' for each model a "no usable model (...)" error lists; a cooldown
    counts as the failure that started it (its reason in parentheses)."""
    found = _BLOCKED.search(error)
    if not found:
        return set()
    stops = set()
    for block in found.group("blocks").split("; "):
        parts = _BLOCK.match(block)
        if not parts:
            continue
        why = parts.group("why")
        resting = _COOLDOWN.match(why)
        kind = resting.group("kind") if resting else why.split(" until ")[0]
        stops.add(f"{parts.group('model')}: {_NUMBER.sub('#', kind).replace(' ', '_')}")
    return stops


def report(entry: str, event: str, health_json: str) -> None:
    """Log an entry's change of health, once (the script says which job saw it)."""
    health = json.loads(health_json)
    if event == "failing":
        log.warning(
            "beat entry %r failing: %s (dead letter %s; further failures for this cause"
            " are counted in `fleet status`, not filed)",
            entry,
            health.get("reason"),
            health.get("dead_letter"),
        )
    elif event == "another":
        log.warning(
            "beat entry %r still failing, for another cause: %s (dead letter %s)",
            entry,
            health.get("reason"),
            health.get("dead_letter"),
        )
    elif event == "recovered":
        log.warning(
            "beat entry %r recovered: answered again after failing since %s (%d repeats)",
            entry,
            _clock(health.get("since")),
            health.get("repeats", 0),
        )


def entries(redis: Any) -> list[dict[str, Any]]:
    """Every beat entry's health, by name: `failing`, `since` (when its current or last
    failing spell began), `reason` (its latest failure), `repeats` (failures counted, not
    filed), `dead_letter` (the last one filed), `last_failed_at`, `last_ok_at`,
    `recovered_at` (times in unix s)."""
    raw = redis.hgetall(keys.BEAT_HEALTH)
    found = []
    for name, value in sorted(raw.items()):
        health = json.loads(value)
        health.pop("causes", None)
        health.pop("last_job", None)
        found.append({"entry": name.decode() if isinstance(name, bytes) else name, **health})
    return found


def describe(health: dict[str, Any]) -> str:
    """One line for `fleet status`."""
    if health.get("failing"):
        return (
            f"failing since {_clock(health.get('since'))}: {health.get('reason')};"
            f" {health.get('repeats', 0)} repeats (dead letter {health.get('dead_letter')})"
        )
    if health.get("recovered_at"):
        return (
            f"ok: recovered at {_clock(health['recovered_at'])} after failing since"
            f" {_clock(health.get('since'))} ({health.get('repeats', 0)} repeats)"
        )
    return f"ok (last answered {_clock(health.get('last_ok_at'))})"


def _clock(ts: Any) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
