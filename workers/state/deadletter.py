"""The dead-letter store: every job that ended without an answer, with its reasons, kept
in the fleet's Redis for an operator to list and replay (`fleet dead-letter`).

A worker files a dead letter together with the job's final state, in one script
(workers/runtime/resultstore.py); `entry()` is what it files."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from workers.state import keys


def entry(job: dict[str, Any], result: dict[str, Any]) -> str:
    """A failed job's dead letter: its payload and its Result (never a key), as JSON."""
    return json.dumps({"job": job, "result": result, "failed_at": time.time()})


def entries(redis: Any) -> list[dict[str, Any]]:
    """Every dead letter, oldest first."""
    raw = redis.hgetall(keys.DEAD_LETTER)
    found = [json.loads(value) for value in raw.values()]
    return sorted(found, key=lambda e: e["failed_at"])


def take(redis: Any, job_id: str) -> dict[str, Any] | None:
    """Remove and return one dead letter (None if there is no such job)."""
    pipe = redis.pipeline()
    pipe.hget(keys.DEAD_LETTER, job_id)
    pipe.hdel(keys.DEAD_LETTER, job_id)
    raw, _ = pipe.execute()
    return json.loads(raw) if raw else None


def replay_job(entry: dict[str, Any]) -> dict[str, Any]:
    """The job to dispatch again: a new id (the old one's result stays as it was),
    pointing back at the failed one."""
    job = dict(entry["job"])
    old_id = job.pop("id")
    job.pop("idempotency_key", None)
    job["metadata"] = {**(job.get("metadata") or {}), "replay_of": old_id}
    job["id"] = f"{old_id[:150]}-replay-{uuid.uuid4().hex[:8]}"
    return job
