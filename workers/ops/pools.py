"""How each queue's worker runs: pool type and concurrency, and the command that starts it.

The HTTP queues wait on providers, not on the CPU: a threads pool holds many calls in
flight in one process, without a process per call (prefork) or gevent's patching of every
socket and its CPU per task. The local queue runs one MLX generation at a time: a model's
weights and compute are per process, so more would only contend. docs/architecture.md,
"Processes", has the table and its reasons.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from router.catalog import QUEUES
from router.errors import InvalidJob, choices


@dataclass(frozen=True)
class Pool:
    kind: str  # Celery's -P: threads, solo, prefork
    concurrency: int


DEFAULT_POOLS: dict[str, Pool] = {
    "local": Pool("solo", 1),
    "free": Pool("threads", 100),
    "subscription": Pool("threads", 100),
    "vision": Pool("threads", 50),
    "long-context": Pool("threads", 20),
}


def check_queues(queues: list[str]) -> None:
    for queue in queues:
        if queue not in QUEUES:
            raise InvalidJob(f"unknown queue {queue!r} (valid: {choices(QUEUES)})")


def worker_argv(
    queues: list[str],
    *,
    pool: str | None = None,
    concurrency: int | None = None,
    name: str | None = None,
    loglevel: str = "INFO",
) -> list[str]:
    """The `celery worker` command line for these queues (defaults from the first queue)."""
    check_queues(queues)
    default = DEFAULT_POOLS[queues[0]]
    kind = pool or default.kind
    count = 1 if kind == "solo" else concurrency or default.concurrency
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers",
        "worker",
        "-Q",
        ",".join(queues),
        "-P",
        kind,
        "-c",
        str(count),
        "-n",
        f"{name or '+'.join(queues)}@%h",
        "-E",  # task events, for Flower
        "--without-gossip",
        "--without-mingle",
        "-l",
        loglevel,
    ]
