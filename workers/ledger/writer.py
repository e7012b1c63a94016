"""The ledger's batching writer: a thread in every worker process that drains the Redis
spool into the database every second or so.

Workers push each finished job's rows onto the spool together with its final state, so
the task's path never waits on the database; this thread inserts what every worker
pushed, a batch per transaction. Several writers (one per worker process) share the
spool safely: each claims its batch atomically (workers/ledger/store.py). While the
database is down the rows wait in Redis and are written when it is back.
"""

from __future__ import annotations

import logging
import threading

from workers.ledger.store import Ledger

log = logging.getLogger(__name__)
EVERY_S = 1.0


class SpoolWriter:
    def __init__(self, ledger: Ledger, every_s: float = EVERY_S) -> None:
        self.ledger = ledger
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)

    def start(self) -> SpoolWriter:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.ledger.drain()  # never raises: what cannot be written stays spooled

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop, after one last drain of what is spooled."""
        self._stop.set()
        self._thread.join(timeout_s)
        self.ledger.drain()
        self.ledger.close()
