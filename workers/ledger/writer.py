"""The ledger's batching writer: one process per fleet (`fleet ledger-writer`; `fleet up`
and compose.yaml start it) that drains the Redis spool into the database every second.

Workers push each finished job's rows onto the spool together with its final state, so
neither the task's path nor the worker process ever waits on, or spends CPU on, the
database; this process inserts what every worker pushed, a batch per transaction.
Several writers may run (each claims its batch atomically: workers/ledger/store.py);
while the database is down the rows wait in Redis and are written when it is back.
`fleet usage` drains the spool before it reads, so it never shows a second-old ledger.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any, TextIO

from workers.ledger.store import Ledger, redacted

log = logging.getLogger(__name__)
EVERY_S = 1.0
READY = "ledger writer: ready"  # the line `fleet up` waits for


def run(
    ledger: Ledger,
    *,
    every_s: float = EVERY_S,
    stop: threading.Event | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Drain the spool every `every_s` until `stop` is set (or SIGTERM/SIGINT), then drain
    once more and return 0."""
    stop = stop or _stop_on_signals()
    ledger.ensure_schema()  # a bad URL or a newer schema is said now, not every second
    print(
        f"{READY} (spool {redacted(ledger.redis_url or 'none')}, ledger {redacted(ledger.url)})",
        file=out,
        flush=True,
    )
    written = 0
    while not stop.wait(every_s):
        written += ledger.drain()  # never raises: what cannot be written stays spooled
    written += ledger.drain()
    ledger.close()
    print(f"ledger writer: stopped after writing {written} rows", file=out, flush=True)
    return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(_signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop
