"""Idempotency keys: a key names the first job dispatched with it, for a day.

A dispatcher claims a job's key only once the job is routed and about to be sent, and
releases it when the send fails: a key never names a job that was never sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workers.state import keys
from workers.state.connections import Pipeline

KEEP_S = 86_400


def claim(redis: Any, wanted: Sequence[tuple[str, str]]) -> list[str]:
    """For each (idempotency key, job id): the id of the job that owns the key now, which
    is this job's unless another came first. One round trip for all of them."""
    if not wanted:
        return []
    pipe = redis.pipeline(transaction=False)
    for key, job_id in wanted:
        pipe.set(keys.idempotency(key), job_id, nx=True, ex=KEEP_S)
        pipe.get(keys.idempotency(key))
    replies = pipe.execute()
    owners = []
    for (_, job_id), owner in zip(wanted, replies[1::2], strict=True):
        owners.append(owner.decode() if owner else job_id)
    return owners


def release(redis: Any, claimed: Sequence[tuple[str, str]]) -> None:
    """Give back keys this dispatcher claimed for jobs it then failed to send."""
    if not claimed:
        return
    batch = Pipeline(redis)
    for key, job_id in claimed:
        batch.script("release", [keys.idempotency(key)], [job_id])
    batch.execute()
