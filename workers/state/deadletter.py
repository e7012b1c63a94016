"""The dead-letter store: every job that ended without an answer, with its reasons, kept
in the fleet's Redis for an operator to list and replay (`fleet dead-letter`), within a
retention per task class (the catalog's `policy.dead_letters`: a count and an age, past
which a class's oldest letters go).

A worker files a dead letter together with the job's final state, in one script
(workers/runtime/resultstore.py, scripts/store_result.lua); `entry()` is what it files and
`filing()` where, under which retention. The same script trims the letter's class, so the
store never holds more than each class's count, and nothing is ever half-written: a
letter is in the hash and its class's index, or in neither. `trim()` applies every
class's retention (age included) for a class that has filed nothing since; the `fleet`
commands that read the store call it first.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from router.catalog import (
    DEAD_LETTER_MAX_AGE_DAYS,
    DEAD_LETTER_MAX_COUNT,
    TASK_CLASSES,
    DeadLetters,
)
from workers.state import keys
from workers.state.connections import script

DAY_S = 86_400
# The class of a letter whose job names none the catalog knows (a job enqueued by hand
# with a bad one): one bucket for all of them, so a stream of junk names cannot make an
# index each.
OTHER = "other"
BUCKETS = (*TASK_CLASSES, OTHER)


def bucket(task_class: Any) -> str:
    return task_class if task_class in TASK_CLASSES else OTHER


@dataclass(frozen=True)
class Filing:
    """Where a dead letter goes and what its class keeps: past `max_count` letters, or
    once older than `max_age_s`, the class's oldest go."""

    bucket: str = OTHER
    max_count: int = DEAD_LETTER_MAX_COUNT
    max_age_s: float = DEAD_LETTER_MAX_AGE_DAYS * DAY_S


NOT_FILED = Filing()  # what goes with a final state that files no letter


def filing(job: dict[str, Any], policy: DeadLetters) -> Filing:
    """The filing of `job`'s dead letter under the catalog's retention."""
    name = bucket(job.get("task_class"))
    max_count, max_age_days = policy.for_class(name)
    return Filing(name, max_count, max_age_days * DAY_S)


def entry(job: dict[str, Any], result: dict[str, Any]) -> str:
    """A failed job's dead letter: its payload and its Result (never a key), as JSON."""
    return json.dumps({"job": job, "result": result, "failed_at": time.time()})


def entries(redis: Any) -> list[dict[str, Any]]:
    """Every dead letter, oldest first."""
    raw = redis.hgetall(keys.DEAD_LETTER)
    found = [json.loads(value) for value in raw.values()]
    return sorted(found, key=lambda e: e["failed_at"])


def take(redis: Any, job_id: str) -> dict[str, Any] | None:
    """Remove and return one dead letter (None if there is no such job). One transaction:
    of two replays of the same letter, one gets it."""
    pipe = redis.pipeline()
    pipe.hget(keys.DEAD_LETTER, job_id)
    pipe.hdel(keys.DEAD_LETTER, job_id)
    for name in BUCKETS:  # its class is in the letter; a ZREM of an absent id is free
        pipe.zrem(keys.dead_letter_index(name), job_id)
    raw = pipe.execute()[0]
    return json.loads(raw) if raw else None


def trim(redis: Any, policy: DeadLetters) -> dict[str, int]:
    """Apply every class's retention now; the letters taken out, per class."""
    args: list[Any] = []
    for name in BUCKETS:
        max_count, max_age_days = policy.for_class(name)
        args += [name, max_count, max_age_days * DAY_S]
    index_keys = [keys.dead_letter_index(name) for name in BUCKETS]
    trim_script = script(redis, "trim_dead_letters")
    gone = trim_script(keys=[keys.DEAD_LETTER, keys.DEAD_LETTER_TRIMMED, *index_keys], args=args)
    return {name: int(n) for name, n in zip(BUCKETS, gone, strict=True) if int(n)}


def summary(redis: Any, policy: DeadLetters) -> list[dict[str, Any]]:
    """Per class that holds or has lost letters: how many it holds, how many retention
    took out (and when last), and its retention."""
    pipe = redis.pipeline(transaction=False)
    for name in BUCKETS:
        pipe.zcard(keys.dead_letter_index(name))
    pipe.hgetall(keys.DEAD_LETTER_TRIMMED)
    *held, trimmed_raw = pipe.execute()
    trimmed = {_text(k): _text(v) for k, v in trimmed_raw.items()}
    rows = []
    for name, count in zip(BUCKETS, held, strict=True):
        lost = int(trimmed.get(name, 0))
        if not (count or lost):
            continue
        max_count, max_age_days = policy.for_class(name)
        last = trimmed.get(f"{name}:at")
        rows.append(
            {
                "task_class": name,
                "held": int(count),
                "trimmed": lost,
                "last_trimmed_at": float(last) if last else None,
                "max_count": max_count,
                "max_age_days": max_age_days,
            }
        )
    return rows


def replay_job(entry: dict[str, Any]) -> dict[str, Any]:
    """The job to dispatch again: a new id (the old one's result stays as it was),
    pointing back at the failed one."""
    job = dict(entry["job"])
    old_id = job.pop("id")
    job.pop("idempotency_key", None)
    job["metadata"] = {**(job.get("metadata") or {}), "replay_of": old_id}
    job["id"] = f"{old_id[:150]}-replay-{uuid.uuid4().hex[:8]}"
    return job


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
