"""How soon a killed worker's jobs come back: recovery time per kill -9, on the fleet's
broker transport, kombu's stock Redis channel and RabbitMQ, in one report.

Two threads workers share the `free` queue, with the fleet's default settings (as `fleet
up` runs them: no visibility timeout set). A job's provider call takes JOB_S (the
simulator's latency). Each round dispatches a batch of CONCURRENCY jobs; once the victim
has calls in flight it is killed -9 in the middle of them, 0.5 to 2 s into the first,
and started again at once. The jobs it held are those with a call from its process
(X-Fleet-Job's `process`) and no final state stored at the kill; the kill's recovery time
runs from the kill to the moment the last of them has its final state stored (the
result backend's `date_done`). Each wait is capped (`cap_s`): a job still not back then is
counted as not back, and the kill's time as "> cap", so a broker that gives a message
back only after its visibility timeout (600 s by default) does not stall the run. The
next round starts once the rest of the batch is answered and the victim is up again.

A batch is no larger than one worker's concurrency, so the survivor always has room for
every job the victim held: the time measured is the broker's, not a queue behind busy
threads. The fleet's promise (BOUND_S) is checked on its own transport only; kombu's
stock channel and RabbitMQ are baselines, reported beside it, never a failure.

    .venv/bin/python -m tests.chaos.report recovery          # 3 kills per broker
    .venv/bin/python -m tests.chaos.report --long recovery   # 20 kills per broker
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from workers.ops.supervisor import Child

from .harness import (
    FINAL,
    ChaosFleet,
    JobRecord,
    Struck,
    Tally,
    _stamp,
    ask,
    audit,
    backend_meta,
    chaos_rng,
    job_id,
    process_of,
    timed,
)
from .kills import broker_transport, unfinished
from .scenarios import LLAMA, answered_by

BROKERS = ("fleet", "kombu", "rabbitmq")
JOB_S = 3.0  # a job's provider call (the simulator's latency)
PROVIDER_TIMEOUT_S = 10.0  # well above a call: no job times out
CONCURRENCY = 8  # each worker's threads, and a round's batch of jobs
BOUND_S = 10.0  # the fleet's transport: every job a killed worker held is back within this
SHORT_KILLS, LONG_KILLS = 3, 20
SHORT_CAP_S, LONG_CAP_S = 12.0, 30.0  # (short: above BOUND_S, and within ~60 s a broker)
KILL_AFTER_S = (0.5, 2.0)  # into the victim's first call in flight: mid-call (JOB_S)
# RabbitMQ for the `rabbitmq` runs (a vhost of its own is made for each run, with
# rabbitmqctl when it is installed; else the default vhost, its queues purged first)
AMQP = os.environ.get("FLEET_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@dataclass
class Kill:
    """One kill -9 of the victim: when (epoch s), the jobs it held, and for each job back
    the seconds from the kill to its final state stored."""

    at: float
    held: list[str]
    back: dict[str, float] = field(default_factory=dict)

    @property
    def not_back(self) -> int:
        return len(self.held) - len(self.back)

    def later_than(self, bound_s: float) -> int:
        """The held jobs not back within `bound_s` of the kill."""
        return len(self.held) - sum(1 for s in self.back.values() if s <= bound_s)

    @property
    def seconds(self) -> float:
        """The kill's recovery time: to the last held job's final state (inf: not all back)."""
        return math.inf if self.not_back else max(self.back.values(), default=0.0)


@dataclass
class Recovery:
    """One broker's kills, for the report's recovery table."""

    broker: str
    cap_s: float
    kills: list[Kill] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        """The nearest-rank percentile of the kills' recovery times (inf: not back)."""
        times = sorted(k.seconds for k in self.kills)
        return times[max(0, math.ceil(q * len(times)) - 1)] if times else math.nan

    def seconds(self, value: float) -> str:
        if math.isnan(value):
            return "-"
        return f"> {self.cap_s:g}" if math.isinf(value) else f"{value:.1f}"

    def cells(self) -> tuple[str, ...]:
        """broker, kills, jobs held, median, p99, worst, jobs not back within the cap."""
        return (
            self.broker,
            str(len(self.kills)),
            str(sum(len(k.held) for k in self.kills)),
            self.seconds(self.percentile(0.5)),
            self.seconds(self.percentile(0.99)),
            self.seconds(self.percentile(1.0)),
            str(sum(k.not_back for k in self.kills)),
        )


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A broker URL on a fresh RabbitMQ vhost, deleted afterwards (or the default vhost,
    its job queues purged, without rabbitmqctl)."""
    url = urlsplit(AMQP)
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        purge_queues(AMQP)
        yield AMQP
        return
    vhost = f"modelfleet-chaos-{uuid.uuid4().hex[:8]}"
    user = url.username or "guest"
    subprocess.run([ctl, "-q", "add_vhost", vhost], check=True, capture_output=True)
    try:
        subprocess.run(
            [ctl, "-q", "set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )
        yield f"{url.scheme}://{url.netloc}/{vhost}"
    finally:
        subprocess.run([ctl, "-q", "delete_vhost", vhost], capture_output=True)


def purge_queues(url: str) -> None:
    """Empty the fleet's job queues on a RabbitMQ broker (declared first: purging a queue
    that does not exist closes the channel)."""
    from kombu.connection import Connection

    from workers.runtime.celery_app import celery_settings

    queues = celery_settings({"FLEET_BROKER_URL": url, "FLEET_STATE_URL": "redis://"})
    with Connection(url) as conn:
        channel = conn.default_channel
        for queue in queues["task_queues"]:
            bound = queue(channel)
            bound.declare()
            bound.purge()


@contextlib.contextmanager
def broker(name: str) -> Iterator[str | None]:
    """The broker for a run: its URL (None: the fleet's own Redis), its transport set."""
    if name not in BROKERS:
        raise ValueError(f"broker {name!r}: one of {', '.join(BROKERS)}")
    if name == "rabbitmq":
        with broker_transport("fleet"), rabbitmq_vhost() as url:
            yield url
    else:
        with broker_transport(name):
            yield None


def in_flight(fleet: ChaosFleet, pid: int, jobs: set[str]) -> float | None:
    """The arrival (epoch s) of the first call process `pid` made for one of `jobs`."""
    here = (socket.gethostname(), pid)
    mine = [
        float(c["t"])
        for c in fleet.provider_calls()
        if c.get("job") in jobs and process_of(c.get("job_process")) == here
    ]
    return min(mine, default=None)


def held_at(fleet: ChaosFleet, kill: Struck) -> Kill:
    """The jobs the killed process held: a call from it, no final state stored before
    the kill."""
    held = []
    for jid in sorted({c["job"] for c in fleet.provider_calls() if kill.made(c)}):
        meta = backend_meta(fleet.client, jid) or {}
        done = meta.get("date_done")
        if meta.get("status") not in FINAL or not done or _stamp(done) > kill.until:
            held.append(jid)
    return Kill(kill.until, held)


def recovered(fleet: ChaosFleet, label: str, cap_s: float) -> Recovery:
    """After a run: each kill -9 the fleet made whose process held jobs, and when each of
    those jobs had its final state stored (the random kills' figures, kills.py)."""
    found = Recovery(label, cap_s)
    for struck in fleet.struck:
        if struck.kind != "killed":
            continue
        kill = held_at(fleet, struck)
        for jid in kill.held:
            meta = backend_meta(fleet.client, jid) or {}
            if meta.get("status") in FINAL and meta.get("date_done"):
                after = _stamp(meta["date_done"]) - kill.at
                if after <= cap_s:
                    kill.back[jid] = after
        if kill.held:
            found.kills.append(kill)
    return found


def wait_back(fleet: ChaosFleet, kill: Kill, cap_s: float) -> None:
    """Wait until every held job has its final state stored, up to `cap_s` after the kill."""
    while True:
        for jid in kill.held:
            meta = backend_meta(fleet.client, jid) or {}
            if jid not in kill.back and meta.get("status") in FINAL and meta.get("date_done"):
                after = _stamp(meta["date_done"]) - kill.at
                if after <= cap_s:
                    kill.back[jid] = after
        if not kill.not_back or time.time() > kill.at + cap_s:
            return
        time.sleep(0.1)


def recovery(
    workdir: Path,
    *,
    broker_name: str = "fleet",
    kills: int = SHORT_KILLS,
    cap_s: float = SHORT_CAP_S,
    seed: int | None = None,
) -> Tally:
    """`kills` kills -9 of a victim holding jobs mid-call on `broker_name`; its Tally
    carries the figures (`recovery`) and, on the fleet's transport, a problem for each
    kill whose jobs were not all back within BOUND_S."""
    tally = Tally(f"recovery x{kills} ({broker_name})")
    found = Recovery(broker_name, cap_s)
    tally.recovery, tally.reference = found, broker_name != "fleet"
    rng, seed = chaos_rng(seed)
    with (
        timed(tally),
        broker(broker_name) as url,
        ChaosFleet(
            f"recovery-{broker_name}",
            workdir,
            visibility_s=None,  # the fleet's default, as `fleet up` runs it
            latency_ms=JOB_S * 1000,
            provider_timeout_s=PROVIDER_TIMEOUT_S,
            broker_url=url,
        ) as fleet,
    ):
        victim = fleet.start_worker("free", concurrency=CONCURRENCY)
        survivor = fleet.start_worker("free", concurrency=CONCURRENCY)
        fleet.wait_ready()
        records: list[JobRecord] = []
        rounds = idle = 0
        while len(found.kills) < kills and rounds < 3 * kills:
            rounds += 1
            fleet.wait_ready([victim, survivor], timeout_s=60)
            batch = []
            for _ in range(CONCURRENCY):
                jid = job_id(f"recovery-{broker_name}", len(records))
                job = ask(f"{jid} free", task_class="cost_free", id=jid)
                records.append(fleet.submit(job, answered_by(LLAMA, ["free"])))
                batch.append(records[-1])
            kill = strike(fleet, victim, {r.id for r in batch}, rng.uniform(*KILL_AFTER_S))
            if kill is None:  # the survivor took the whole batch, or finished it first
                idle += 1
            else:
                wait_back(fleet, kill, cap_s)
                found.kills.append(kill)
            # the rest of the batch (the survivor's part) is answered before the next round
            lost = set(kill.held) - set(kill.back) if kill else set()
            unfinished(fleet, [r for r in batch if r.id not in lost], 2 * JOB_S + 10)
        # (every job but those not back is answered by now: no long waits for those)
        fleet.collect(records, timeout_s=2)
        audit(fleet, records, tally, quiet_s=2)
        fleet.check_workers(tally)
        tally.hit("kills with jobs held", len(found.kills))
        tally.hit("jobs held at a kill", sum(len(k.held) for k in found.kills))
        late = [k for k in found.kills if k.seconds > BOUND_S]
        tally.notes.append(
            f"seed {seed}: {len(found.kills)} kills ({idle} rounds the victim held nothing),"
            f" {len(records)} jobs; recovery per kill (s):"
            f" {', '.join(found.seconds(k.seconds) for k in found.kills)}"
        )
        if broker_name == "fleet":
            for late_kill in late:
                tally.problems.append(
                    f"recovery: {late_kill.later_than(BOUND_S)} of {len(late_kill.held)} jobs"
                    f" held at a kill not back within {BOUND_S:g} s (the last after"
                    f" {found.seconds(late_kill.seconds)} s)"
                )
    return tally


def strike(fleet: ChaosFleet, victim: Child, jobs: set[str], after_s: float) -> Kill | None:
    """Once the victim has a call in flight for one of `jobs`, kill it -9 `after_s` into
    that call and start it again at once; the jobs it held (None: it held none)."""
    first = None
    deadline = time.time() + 10
    while first is None and time.time() < deadline:
        time.sleep(0.05)
        first = in_flight(fleet, victim.pid, jobs)
    if first is None:
        return None
    time.sleep(max(0.0, first + after_s - time.time()))
    fleet.kill(victim)
    fleet.restart(victim, wait=False)
    kill = held_at(fleet, fleet.struck[-1])
    return kill if kill.held else None


def recovery_short(workdir: Path, broker_name: str = "fleet") -> Tally:
    return recovery(workdir, broker_name=broker_name, kills=SHORT_KILLS, cap_s=SHORT_CAP_S)


def recovery_long(workdir: Path, broker_name: str = "fleet") -> Tally:
    return recovery(workdir, broker_name=broker_name, kills=LONG_KILLS, cap_s=LONG_CAP_S)
