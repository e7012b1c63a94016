"""Kill -9 at random moments under steady traffic: the scenario that can see the moment
between Redis' pop of a job message and the worker's record of it (kombu's stock channel
loses the message there; workers/runtime/transport.py files it at publish).

Two threads workers share the `free` queue while jobs arrive at a steady rate; mostly
idle, each waits in BRPOP, so a kill finds it blocked on the broker as often as in the
middle of a call. They take turns: 0.3 to 1.2 s after one is up (consuming), it is killed
-9 and started again at once. (Killing whichever worker is up at fixed moments instead
strikes a worker as it comes up, again and again, just as it takes in the jobs put back
for the worker killed before: those are then delivered four times and poisoned, which says
nothing about the broker.)
The same run is made on kombu's stock channel and on the fleet's, and lost per kill is
reported for each (`python -m tests.chaos.report kills`, `--long` for 150 kills each).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.fixtures import reply_bytes

from .harness import ChaosFleet, JobRecord, Tally, ask, audit, backend_meta, job_id, timed
from .scenarios import LLAMA, answered_by, redelivered

SHORT_KILLS, LONG_KILLS = 12, 150
RECOVERY_CAP_S = 60.0  # a held job answered later than this after its kill counts as not back


@contextlib.contextmanager
def broker_transport(name: str) -> Iterator[None]:
    """FLEET_BROKER_TRANSPORT for the fleet's processes and this dispatcher."""
    saved = os.environ.get("FLEET_BROKER_TRANSPORT")
    os.environ["FLEET_BROKER_TRANSPORT"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FLEET_BROKER_TRANSPORT", None)
        else:
            os.environ["FLEET_BROKER_TRANSPORT"] = saved


class Traffic:
    """Jobs dispatched at a steady rate from a thread of their own, until stopped."""

    def __init__(self, fleet: ChaosFleet, scenario: str, per_s: float) -> None:
        self.fleet, self.scenario, self.per_s = fleet, scenario, per_s
        self.records: list[JobRecord] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{scenario}")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        due = time.monotonic()
        n = 0
        while not self._stop.is_set():
            jid = job_id(self.scenario, n)
            job = ask(f"{jid} free", task_class="cost_free", id=jid)
            self.records.append(self.fleet.submit(job, answered_by(LLAMA, ["free"])))
            n += 1
            due += 1 / self.per_s
            self._stop.wait(max(0.0, due - time.monotonic()))


def unfinished(fleet: ChaosFleet, records: list[JobRecord], within_s: float) -> list[str]:
    """The jobs that have no final state after waiting up to `within_s`."""
    pending = [r.id for r in records]
    deadline = time.monotonic() + within_s
    while pending and time.monotonic() < deadline:
        time.sleep(0.5)
        pending = [
            jid
            for jid in pending
            if (backend_meta(fleet.client, jid) or {}).get("status") not in ("SUCCESS", "FAILURE")
        ]
    return pending


def stranded(fleet: ChaosFleet, jobs: list[str]) -> set[str]:
    """Those of `jobs` whose message kombu's stock channel still holds in its unacked set."""
    held = b"".join(map(reply_bytes, fleet.client.hvals("unacked")))
    return {jid for jid in jobs if jid.encode() in held}


def random_kills(
    workdir: Path,
    *,
    transport: str = "fleet",
    kills: int = SHORT_KILLS,
    per_s: float = 40.0,
    seed: int | None = None,
) -> Tally:
    """kill -9 two `free` workers in turn, each 0.3-1.2 s after it is up, restarting it
    at once."""
    tally = Tally(f"random kill -9 x{kills} ({transport})")
    rng = random.Random(seed)
    with (
        broker_transport(transport),
        timed(tally),
        ChaosFleet(f"kills-{transport}", workdir, visibility_s=5, latency_ms=30) as fleet,
    ):
        workers = [fleet.start_worker("free", concurrency=8) for _ in range(2)]
        fleet.wait_ready()
        made = 0
        with Traffic(fleet, f"kill-{transport}", per_s) as traffic:
            time.sleep(1.0)
            while made < kills:
                victim = workers[made % 2]
                fleet.wait_ready([victim], timeout_s=60)
                time.sleep(rng.uniform(0.3, 1.2))
                fleet.kill(victim)
                fleet.restart(victim, wait=False)
                made += 1
            fleet.wait_ready(timeout_s=60)
            time.sleep(1.0)
        records = traffic.records
        # a lost message comes back after the visibility timeout, or never
        lost = unfinished(fleet, records, 4 * fleet.visibility_s + 10)
        tally.hit("workers killed", made)
        tally.hit("messages redelivered", redelivered(fleet))
        tally.notes.append(f"{made} kills, {len(records)} jobs, {len(lost)} unfinished")
        if transport == "kombu":  # the baseline: its losses are the measure
            tally.reference = True
            held = stranded(fleet, lost)
            vanished = [jid for jid in lost if jid not in held]
            tally.jobs, tally.lost = len(records), len(vanished)
            tally.answered = len(records) - len(lost)
            tally.notes.append(
                f"{len(vanished)} vanished ({len(vanished) / max(made, 1):.3f} per kill),"
                f" {len(held)} more still held in kombu's unacked set after"
                f" {4 * fleet.visibility_s + 10:g} s (its sweep's lock, held by a killed"
                " worker, lasts 300 s)"
            )
            if vanished:
                tally.notes.append(f"vanished: {', '.join(vanished[:10])}")
            return tally
        fleet.collect(records, timeout_s=30)
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        from .recovery import recovered  # (recovery.py builds on this module)

        tally.recovery = found = recovered(fleet, "random kills (fleet)", RECOVERY_CAP_S)
        tally.notes.append(
            f"recovery per kill, {len(found.kills)} kills that held jobs: median"
            f" {found.seconds(found.percentile(0.5))} s, p99"
            f" {found.seconds(found.percentile(0.99))} s, worst"
            f" {found.seconds(found.percentile(1.0))} s"
        )
    return tally


def kills_short(workdir: Path) -> Tally:
    return random_kills(workdir, transport="fleet", kills=SHORT_KILLS)


def kills_stock_short(workdir: Path) -> Tally:
    return random_kills(workdir, transport="kombu", kills=SHORT_KILLS)


def kills_long(workdir: Path) -> Tally:
    return random_kills(workdir, transport="fleet", kills=LONG_KILLS)


def kills_stock_long(workdir: Path) -> Tally:
    return random_kills(workdir, transport="kombu", kills=LONG_KILLS)
