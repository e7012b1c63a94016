"""A partitioned host: one worker stands in a network namespace of its own (an island,
netns.py) and reaches Redis and the provider through a veth pair; a second worker runs
on the host. Under steady traffic the island's link is cut mid-run, then healed.

The jobs the island held (popped, mid-call, or with their BRPOP reply on the wire) come
back to the host's worker after the visibility timeout; when the island returns, what it
writes late must change nothing: no job lost, no caller answered twice, each delivered
run billed once."""

from __future__ import annotations

import time
from pathlib import Path

from tests.fixtures import WORKER_READY
from workers.ops.pools import worker_argv

from .harness import ROOT, ChaosFleet, Tally, audit, timed
from .kills import Traffic, broker_transport, unfinished
from .netns import Island
from .scenarios import redelivered


def partition(
    workdir: Path, cut_s: float = 12.0, per_s: float = 25.0, transport: str = "fleet"
) -> Tally:
    tally = Tally(f"partition {cut_s:g} s ({transport})")
    with (
        broker_transport(transport),
        timed(tally),
        Island() as island,
        ChaosFleet(
            "partition", workdir, visibility_s=5, latency_ms=150, host=island.host_ip
        ) as fleet,
    ):
        fleet.start_worker("free", concurrency=8)
        name = "chaos-free-island"
        argv = [*island.prefix, *worker_argv(["free"], pool="threads", concurrency=8, name=name)]
        islander = fleet.processes.supervisor.start(name, argv, WORKER_READY, cwd=ROOT)
        fleet.workers.append(islander)
        fleet.wait_ready()
        with Traffic(fleet, "part", per_s) as traffic:
            time.sleep(4.0)
            with fleet.cut_off(islander, island.cut, island.heal):
                time.sleep(cut_s)
            time.sleep(4.0)
        records = traffic.records
        lost = unfinished(fleet, records, 4 * fleet.visibility_s + 20)
        fleet.collect(records, timeout_s=30)
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        by_island = sum(
            1
            for r in records
            if r.got is not None and any(a.worker and name in a.worker for a in r.got.attempts)
        )
        tally.notes.append(f"{len(records)} jobs, {len(lost)} unfinished")
        # the cut must have struck a worker at work: jobs it answered, jobs it held
        tally.hit("jobs answered on the island", by_island)
        tally.hit("messages redelivered", redelivered(fleet))
        tally.reference = transport == "kombu"  # the baseline: its losses are the measure
    return tally
