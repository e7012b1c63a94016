"""The chaos scenarios. Each runs a few hundred jobs through a fleet of real processes,
breaks something on the way, and returns its audit (harness.Tally). The pytest tests and
`python -m tests.chaos.report` run these same functions."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from router.catalog import Catalog, Model
from router.results import Result
from tests.fixtures import reply_bytes, reply_text
from workers.state.deliveries import MAX_DEATHS

from .harness import (
    ChaosFleet,
    JobRecord,
    Strikes,
    Tally,
    ask,
    audit,
    chaos_rng,
    job_id,
    pool_children,
    steady,
    timed,
)

Expect = Callable[[Result, dict[str, Any] | None], str | None]

LLAMA = "openrouter/meta-llama/llama-3.1-405b-instruct:free"
GLM, MINIMAX = "zai/glm-4.7", "minimax/MiniMax-M2.1"


def answered_by(model: str, path: list[str] | None = None) -> Expect:
    def check(result: Result, dead: dict[str, Any] | None) -> str | None:
        if not result.ok:
            return f"failed: {result.error}"
        if result.model != model:
            return f"answered by {result.model}, not {model}"
        if path is not None and result.queue_path != path:
            return f"queue path {result.queue_path}, not {path}"
        return None

    return check


def redelivered(fleet: ChaosFleet) -> int:
    """Messages delivered more than once (the fleet's own delivery counters)."""
    return sum(
        1
        for key in fleet.client.scan_iter("fleet:deliveries:*")
        if int(fleet.client.hget(key, "n") or 0) > 1
    )


def mixed_job(scenario: str, n: int) -> tuple[dict[str, Any], Expect]:
    """Plain jobs on two queues, and jobs that escalate from one queue to the other."""
    jid = job_id(scenario, n)
    kind = n % 5
    if kind in (0, 1):
        return ask(f"{jid} free", task_class="cost_free", id=jid), answered_by(LLAMA, ["free"])
    if kind in (2, 3):
        job = ask(f"{jid} sub", task_class="user_facing", id=jid)
        return job, answered_by(GLM, ["subscription"])
    job = ask(f"[[sim:MiniMax-M2.1=503]] {jid} hop", task_class="fast_general", id=jid)
    return job, answered_by(LLAMA, ["subscription", "free"])


# --- 1. kill -9 of worker processes at random moments -------------------------------------

SLOW_MS = 300  # the free model's latency under kills: a strike catches calls mid-way


def worker_kill(
    workdir: Path, jobs: int = 480, rate: float = 40.0, kills: int = 6, seed: int | None = None
) -> Tally:
    """kill -9 at random moments under steady traffic (`rate` mixed jobs a second). Each
    strike picks, at random, a threads worker on `free` (killed with every job it holds,
    started again 0.2-1 s later: its jobs come back after the visibility timeout) or the
    pool children of the prefork worker on `subscription` (reject-on-worker-lost
    requeues their jobs at once). Every job must end once, and the strikes must have
    killed workers and made the fleet deliver messages again.

    A provider call in flight when its worker dies is made again on redelivery, and the
    ledger bills only the delivery that finished: the audit counts those calls from the
    provider's log (under-billed, redelivered). A threads worker killed while Redis
    hands it a message (BRPOP has popped it, kombu has not yet filed it as unacked)
    loses that message: kombu's Redis transport's window (celery/celery#7950,
    celery/kombu#305); the job shows as lost."""
    tally = Tally("kill -9 worker")
    rng, seed = chaos_rng(seed)
    with timed(tally), ChaosFleet("kill", workdir, visibility_s=10) as fleet:
        assert fleet.sim is not None
        fleet.sim.configure(models={LLAMA.split("/", 1)[1]: {"latency_ms": SLOW_MS}})
        free = [fleet.start_worker("free", concurrency=8) for _ in range(2)]
        sub = fleet.start_worker("subscription", pool="prefork", concurrency=3)
        fleet.wait_ready()
        killed: Counter[str] = Counter()

        def kill_one() -> str:
            target = rng.choice([*free, sub])
            if target is sub:
                children = fleet.kill_children(sub)
                killed["prefork pool children"] += children
                return f"{children} pool children of {sub.name} killed"
            fleet.kill(target)
            killed["threads workers"] += 1
            pause = rng.uniform(0.2, 1.0)
            time.sleep(pause)
            fleet.restart(target, wait=False)
            return f"{target.name} killed, started again {pause:.1f} s later"

        span = jobs / rate
        with Strikes(rng, [kill_one] * kills, (0.1 * span, 0.9 * span), gap_s=1.2) as strikes:
            records = steady(fleet, lambda n: mixed_job("kill", n), jobs, rate)
        fleet.collect(records, timeout_s=90)
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        tally.hit("processes killed", sum(killed.values()))
        tally.hit("messages redelivered", redelivered(fleet))
        tally.notes.append(
            f"seed {seed}: {kills} kills at random moments of {jobs} jobs at {rate:g}/s"
            f" ({dict(killed)}): {'; '.join(strikes.log)}"
        )
    return tally


def witnesses(workdir: Path, jobs: int = 8, kills: int = 3) -> Tally:
    """A threads worker killed -9 three times, each time with the same slow jobs in their
    calls (a deploy that keeps failing, a host's OOM killer): none of them brought it
    down, so none may be poisoned, and each must be answered on its fourth delivery. Each
    killed call is billed as an orphan (the provider log against the ledger)."""
    tally = Tally("kill -9 witnesses x3")
    with timed(tally), ChaosFleet("witnesses", workdir, visibility_s=3) as fleet:
        assert fleet.sim is not None
        slow = LLAMA.split("/", 1)[1]
        fleet.sim.configure(models={slow: {"latency_ms": 120_000}})  # held until the kill
        worker = fleet.start_worker("free", concurrency=jobs)
        fleet.wait_ready()
        records = [
            fleet.submit(
                ask(
                    f"{job_id('witness', n)} slow", task_class="cost_free", id=job_id("witness", n)
                ),
                answered_by(LLAMA, ["free"]),
            )
            for n in range(jobs)
        ]
        killed = 0
        for round_ in range(kills):
            # every job in its call (the round's deliveries all reached the provider)
            def in_call(r: int = round_) -> bool:
                return len(fleet.provider_calls()) >= jobs * (r + 1)

            if not wait_for(in_call, 60):
                tally.problems.append(f"round {round_}: {len(fleet.provider_calls())} calls")
                break
            if round_ == kills - 1:  # the last deliveries are killed, the next answer
                fleet.sim.configure(models={slow: {"latency_ms": 50}})
            fleet.kill(worker)
            killed += 1
            fleet.restart(worker)
        fleet.collect(records, timeout_s=60)
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        tally.hit("worker killed with every job in its call", killed)
        tally.hit("messages redelivered", redelivered(fleet))
        tally.notes.append(f"{jobs} slow jobs in one threads worker, killed {killed} times")
    return tally


def wait_for(check: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- 2. redis-server stopped or killed at random moments -----------------------------------


def redis_restart(
    workdir: Path,
    jobs: int = 800,
    rate: float = 40.0,
    restarts: int = 4,
    down_s: tuple[float, float] = (0.5, 2.0),
    seed: int | None = None,
) -> Tally:
    """The fleet's Redis (broker, results, state; append-only file on) goes away at
    random moments under steady traffic, stopped cleanly (SIGTERM: it flushes its
    append-only file) and killed -9 (a crash: no shutdown) in turn, and is started again
    on its port 0.5-2 s later from what its append-only file holds. The dispatcher goes
    on dispatching through each outage (retrying as an app would); workers reconnect by
    themselves, results stored during an outage are retried, a job whose ack was lost
    comes back and is recognised as finished. Every worker must have seen every restart.

    Redis going away while it hands a message to a worker (BRPOP has popped it, the
    worker has not yet read it) drops that message with the broken connection:
    kombu's Redis transport's window (celery/celery#4354, #7950); the job shows as lost."""
    tally = Tally("redis restart")
    rng, seed = chaos_rng(seed)
    with timed(tally), ChaosFleet("redis", workdir, visibility_s=10) as fleet:
        assert fleet.sim is not None and fleet.monitor is not None
        fleet.start_worker("free", concurrency=8)
        fleet.start_worker("subscription", concurrency=8)
        fleet.wait_ready()
        first = rng.randrange(2)
        kinds = [("stop", "kill -9")[(first + i) % 2] for i in range(restarts)]

        def outage(kind: str) -> Callable[[], str]:
            def strike() -> str:
                connected = fleet.broker_connections()
                fleet.stop_redis() if kind == "stop" else fleet.kill_redis()
                down = rng.uniform(*down_s)
                time.sleep(down)
                fleet.start_redis()
                # Each outage on its own: the next strikes once every worker is back.
                for name in fleet.wait_reconnected(connected):
                    tally.problems.append(f"{name} did not reconnect after Redis {kind}")
                return f"Redis {kind}, back {down:.1f} s later"

            return strike

        span = jobs / rate  # (longer in fact: dispatching waits through each outage)
        gap = down_s[1] + 1.0  # (a strike returns once every worker has reconnected)
        window = (0.1 * span, 0.9 * span)
        with Strikes(rng, [outage(k) for k in kinds], window, gap_s=gap) as strikes:
            records = steady(fleet, lambda n: mixed_job("redis", n), jobs, rate)
        fleet.collect(records, timeout_s=90)
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        seen = fleet.broker_losses()
        for worker, losses in seen.items():
            if losses < restarts:
                tally.problems.append(f"{worker} saw {losses} of {restarts} Redis restarts")
        tally.hit("Redis restarts", len(strikes.log))
        tally.hit("restarts seen by the least-affected worker", min(seen.values()))
        tally.hit("listener resubscriptions", fleet.monitor.subscriptions - 1)
        tally.notes.append(
            f"seed {seed}: {'; '.join(strikes.log)}; dispatch retried {fleet.dispatch_retries}"
            f" times, get() {fleet.get_retries} times; {redelivered(fleet)} messages"
            f" redelivered; broker connection lost per worker {seen}"
        )
    return tally


# --- 3. the provider fault matrix ---------------------------------------------------------

# fault -> (error kind, action) of the faulted model's attempt. "refused" is a
# long_context job whose first model's provider listens nowhere: the job moves to the next
# model, on another queue. Every other fault is scripted into a user_facing job by a
# `[[sim:MODEL=FAULT]]` directive for the job's explicit first model (see fault_targets):
# the job must then be answered by glm-4.7 ("retry" and "next"), or fail at once ("fail").
FAULTS: dict[str, tuple[str, str]] = {
    "429": ("rate_limited", "retry"),
    "429:1": ("rate_limited", "retry"),
    "429:date:1": ("rate_limited", "retry"),
    "500": ("server_error", "retry"),
    "502": ("server_error", "retry"),
    "503": ("server_error", "retry"),
    "408": ("timeout", "retry"),
    "timeout": ("timeout", "retry"),  # no answer within the provider's 2 s timeout
    "stall": ("timeout", "retry"),  # headers and half a body, then silence
    "malformed": ("malformed", "retry"),
    "empty": ("empty", "retry"),
    "reset": ("connection", "retry"),
    "refused": ("connection", "retry"),
    "400": ("bad_request", "fail"),
    "401": ("auth", "next"),
    "404": ("not_found", "next"),
}
MOONSHOT, QWEN_NEXT = "moonshot/kimi-k2-0905-preview", "litellm/qwen3-next-free"
USER_FACING = (GLM, MINIMAX, "litellm/kimi", QWEN_NEXT)  # the class's chain


def fault_targets(catalog: Catalog, dead: tuple[str, ...]) -> list[Model]:
    """The models a fault group spreads its jobs over, one job per model at a time. A
    429, 401 or 404 rests the model that served it (fleet-wide): had every job of a
    group faulted the same model, only the first few would have met the fault. These
    are the simulator's models outside the user_facing chain (which the jobs fall back
    to, so it must stay healthy) and outside the vision chain (the long Retry-After jobs
    rest it), whose name no directive could confuse with a chain model's."""
    chain = {catalog.model(m).upstream for m in USER_FACING}

    def confusable(upstream: str) -> bool:  # the simulator's directive matching
        return any(upstream == c or upstream.endswith("/" + c) for c in chain)

    return [
        m
        for m in catalog.models
        if catalog.providers[m.provider].kind == "openai"
        and not m.supports("embedding")  # a chat job cannot name one
        and m.provider not in dead
        and m.id not in USER_FACING
        and m.queue != "vision"
        and not confusable(m.upstream)
    ]


def fault_job(fault: str, n: int, target: Model) -> tuple[dict[str, Any], Expect]:
    """A job meeting `fault` on its first model, `target`, and its expectation."""
    jid = job_id(f"fault-{fault.replace(':', '_')}", n)
    if fault == "refused":
        job = ask(f"{jid} long read", task_class="long_context", id=jid)
        return job, documented(fault, MOONSHOT, QWEN_NEXT, ["long-context", "free"])
    directive = f"[[sim:{target.upstream}={fault}]]"
    job = ask(f"{directive} {jid} answer", task_class="user_facing", model=target.id, id=jid)
    return job, documented(fault, target.id, GLM, [target.queue, "subscription"])


def documented(fault: str, faulty: str, then: str, path: list[str]) -> Expect:
    action = FAULTS[fault][1]

    def check(result: Result, dead: dict[str, Any] | None) -> str | None:
        tried = [a for a in result.attempts if a.model == faulty]
        why = next((w for a in tried if (w := attempt_problem(fault, a))), None)
        if why:
            return f"{faulty}: {why}"
        if action == "fail":
            if result.ok or len(result.attempts) != 1 or not tried:
                return f"a bad request must end the job at once: {result.attempts}"
            if dead is None or "HTTP 400" not in (result.error or ""):
                return f"not dead-lettered with its reason: {result.error}"
            return None
        if not result.ok or result.model != then:
            return f"answered by {result.model} ({result.error}), not {then}"
        if tried and result.queue_path != path:  # (a model resting after 429/401 is skipped)
            return f"queue path {result.queue_path}, not {path}"
        return None

    return check


def attempt_problem(fault: str, attempt: Any) -> str | None:
    """What is wrong with the faulted model's attempt, if anything."""
    kind, action = FAULTS[fault]
    if (attempt.outcome, attempt.error_kind, attempt.action) != ("error", kind, action):
        return f"{attempt.outcome}/{attempt.error_kind}/{attempt.action}, not error/{kind}/{action}"
    wait = attempt.retry_after_s
    if fault == "429:1" and wait != 1.0:
        return f"Retry-After read as {wait}"
    if fault == "429:date:1" and (wait is None or not 0 <= wait <= 1):
        return f"Retry-After date read as {wait}"
    if fault in ("timeout", "stall") and not 1_900 <= attempt.latency_ms <= 5_000:
        return f"gave up after {attempt.latency_ms:.0f} ms, not the 2 s timeout"
    return None


LONG_WAIT_S = 12  # a Retry-After beyond the chaos fleet's visibility timeout (10 s)


def long_retry_after(fleet: ChaosFleet, jobs: int = 2) -> list[JobRecord]:
    """Vision jobs whose every model answers 429 with Retry-After 12 s: each walks its
    chain, waits for its first model's Retry-After, walks it again and fails. A job
    waiting in a worker longer than the visibility timeout would be handed to a second
    worker too (and run twice): it must wait in hops shorter than the timeout. (The
    vision chain shares no model with the other groups: its cooldowns touch nobody.)"""

    def check(result: Result, dead: dict[str, Any] | None) -> str | None:
        tries = [a for a in result.attempts if a.model == VISION_MINIMAX]
        if result.ok or len(result.attempts) != 4 or len(tries) != 2:
            return f"expected 4 rate-limited attempts and a failure: {result.error}"
        if any(a.retry_after_s != LONG_WAIT_S for a in result.attempts):
            return "a Retry-After was not read"
        first, again = tries
        waited = again.started_at - (first.started_at + first.latency_ms / 1000)
        if not LONG_WAIT_S - 0.1 <= waited <= 2 * LONG_WAIT_S + 3:  # (the other job cools it)
            return f"tried {VISION_MINIMAX} again after {waited:.1f} s, not {LONG_WAIT_S} s"
        return None

    sent = []
    for n in range(jobs):
        job = vision_job(job_id("fault-long-429", n))
        parts = job["messages"][0]["content"]
        parts[0]["text"] = f"[[sim:*=429:{LONG_WAIT_S}]] {parts[0]['text']}"
        sent.append(fleet.submit(job, check))
    return sent


def fault_matrix(workdir: Path, per_fault: int = 24) -> Tally:
    """Every provider fault against the simulator, `per_fault` jobs each. A group's jobs
    take turns over fault_targets() (each model faulted by one job of a wave, the live
    state reset before each wave), so every job meets its fault: checked job by job in
    the simulator's log, which must show each named model serving the fault. "refused"
    never reaches the simulator: its log must show no call to that model."""
    tally = Tally("provider faults")
    dead = ("moonshot",)
    with timed(tally), ChaosFleet("faults", workdir, dead_providers=dead) as fleet:
        fleet.start_worker("subscription", concurrency=16)
        fleet.start_worker("free", concurrency=16)
        fleet.start_worker("long-context", concurrency=8)
        fleet.start_worker("vision", concurrency=4)
        fleet.wait_ready()
        targets = fault_targets(fleet.catalog, dead)
        waiting = long_retry_after(fleet)  # they wait while the groups run
        groups: dict[str, list[tuple[JobRecord, Model]]] = {}
        for index, fault in enumerate(FAULTS):
            turn = [targets[(index * per_fault + n) % len(targets)] for n in range(per_fault)]
            groups[fault] = run_fault_group(fleet, fault, turn, len(targets))
        fleet.collect(waiting, timeout_s=60)
        fleet.reset_live_state()
        records = [r for group in groups.values() for r, _ in group] + waiting
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        named = check_faults_met(fleet, groups, tally)
        tally.notes.append(
            f"{len(FAULTS)} faults x {per_fault} jobs over {len(targets)} models, each job"
            f" meeting its fault (provider log); {named}; + 2 jobs rate-limited everywhere"
            " for 12 s (longer than the 10 s visibility timeout)"
        )
    return tally


def run_fault_group(
    fleet: ChaosFleet, fault: str, turn: list[Model], wave: int
) -> list[tuple[JobRecord, Model]]:
    """Dispatch a fault's jobs in waves of distinct models, each from a clean live state
    (no model resting from an earlier fault), and wait for each wave's answers."""
    sent = []
    for start in range(0, len(turn), wave):
        fleet.reset_live_state()
        batch = []
        for n, target in enumerate(turn[start : start + wave], start):
            job, expect = fault_job(fault, n, target)
            batch.append((fleet.submit(job, expect), target))
        fleet.collect([r for r, _ in batch], timeout_s=60)
        sent += batch
    return sent


def check_faults_met(
    fleet: ChaosFleet, groups: dict[str, list[tuple[JobRecord, Model]]], tally: Tally
) -> str:
    """Each job met its fault on its model, by the provider's log; each fault struck.
    Returns how many faults every model they name served."""
    calls: dict[str, list[dict[str, Any]]] = {}
    for call in fleet.provider_calls():
        calls.setdefault(call["job"], []).append(call)
    complete = 0
    for fault, sent in groups.items():
        if fault == "refused":  # the simulator never sees a refused connection
            tally.hit("calls refused", refused_calls(sent, calls, tally))
            continue
        served = {t.upstream for r, t in sent if met(fault, t, calls.get(r.id, []))}
        for record, target in sent:
            if not met(fault, target, calls.get(record.id, [])):
                tally.problem(
                    "wrong", record.id, f"never met {fault} on {target.id} (provider log)"
                )
        tally.hit(f"models serving {fault}", len(served))
        complete += served == {t.upstream for _, t in sent}
    return f"{complete}/{len(groups) - 1} faults served by every model they name"


def met(fault: str, target: Model, calls: list[dict[str, Any]]) -> bool:
    """The provider's log shows `target` serving `fault` to this job."""
    return any(c["model"] == target.upstream and c["fault"] == fault for c in calls)


def refused_calls(
    sent: list[tuple[JobRecord, Model]], calls: dict[str, list[dict[str, Any]]], tally: Tally
) -> int:
    """Attempts refused at the door of the dead provider; none may reach the simulator."""
    upstream = MOONSHOT.split("/", 1)[1]
    refused = 0
    for record, _ in sent:
        if any(c["model"] == upstream for c in calls.get(record.id, [])):
            tally.problem("wrong", record.id, f"{MOONSHOT} was served: it must be refused")
        attempts = record.got.attempts if record.got else []
        refused += sum(1 for a in attempts if a.model == MOONSHOT and a.error_kind == "connection")
    return refused


# --- 4. poison jobs and the dead-letter store ---------------------------------------------

PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
VISION_UPSTREAMS = ("MiniMax-Vision-Video-01", "nvidia/nemotron-nano-12b-v2-vl:free")


def vision_job(jid: str) -> dict[str, Any]:
    parts = [
        {"type": "text", "text": f"{jid} what is in this picture?"},
        {"type": "image_url", "image_url": {"url": PIXEL}},
    ]
    return {"id": jid, "task_class": "vision", "messages": [{"role": "user", "content": parts}]}


def failed_with(needle: str, attempts: int | None = None) -> Expect:
    def check(result: Result, dead: dict[str, Any] | None) -> str | None:
        if result.ok:
            return f"answered by {result.model}: it should have failed"
        if needle not in (result.error or ""):
            return f"failed with {result.error!r}, not {needle!r}"
        if attempts is not None and len(result.attempts) != attempts:
            return f"{len(result.attempts)} attempts, not {attempts}"
        return None

    return check


class Crasher:
    """Kills the pool process that makes a crashing job's call (a `stall` fault: the call
    hangs until the kill), so the job's worker dies on each of its deliveries. Only that
    process dies: a kill that struck its neighbours too would count deliveries against
    jobs that did not cause them, and the count the poison guard stops at would drift."""

    def __init__(self, fleet: ChaosFleet, worker: Any) -> None:
        import threading

        self.fleet, self.worker = fleet, worker
        self.kills = 0
        self.missed: list[str] = []  # stalls whose caller could not be found
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crasher", daemon=True)

    def __enter__(self) -> Crasher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        assert self.fleet.sim is not None
        seen = 0
        while not self._stop.is_set():
            stalls = [r for r in self.fleet.sim.requests() if r["fault"] == "stall"]
            for stall in stalls[seen:]:
                time.sleep(0.05)  # let the delivery be well inside its call
                pid = socket_owner(stall["client_port"], pool_children(self.worker.pid))
                if pid is None:
                    self.missed.append(f"{stall.get('job')}: no pool process on port")
                    continue
                self.fleet.kill_pid(pid)  # (recorded: the audit excuses its call)
                self.kills += 1
            seen = len(stalls)
            time.sleep(0.02)


def socket_owner(port: int, pids: list[int]) -> int | None:
    """Which of `pids` holds the local TCP end on `port` (/proc/net/tcp names the socket's
    inode, /proc/PID/fd links to it)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return pid
    return None


def poison(workdir: Path, jobs: int = 200, failing: int = 24, crashing: int = 3) -> Tally:
    """Jobs that fail on every model (every vision model answers 500), and jobs whose
    worker dies on every delivery: the first end with every attempt's reason, the second
    after a bounded number of deliveries; both land in the dead-letter store, which
    `fleet dead-letter list` shows and `fleet dead-letter replay` empties. Plain jobs run
    alongside and must not be touched."""
    tally = Tally("poison + dead letters")
    with timed(tally), ChaosFleet("poison", workdir) as fleet:
        assert fleet.sim is not None
        fleet.sim.configure(models={m: {"fault": "500"} for m in VISION_UPSTREAMS})
        sub = fleet.start_worker("subscription", pool="prefork", concurrency=2)
        fleet.start_worker("free", concurrency=8)
        fleet.start_worker("vision", concurrency=8)
        fleet.wait_ready()
        records: list[JobRecord] = []
        plain = jobs - failing - crashing
        crashers: set[str] = set()
        with Crasher(fleet, sub) as crasher:
            for n in range(jobs):
                jid = job_id("poison", n)
                if n % (jobs // crashing) == 1 and n // (jobs // crashing) < crashing:
                    crashers.add(jid)
                    job = ask(f"[[sim:*=stall]] {jid} crash", task_class="user_facing", id=jid)
                    expect = failed_with("delivered 4 times without finishing", 0)
                elif n % (jobs // failing) == 0 and n // (jobs // failing) < failing:
                    job, expect = vision_job(jid), failed_with("every model failed", 4)
                else:
                    job = ask(f"{jid} plain", task_class="cost_free", id=jid)
                    expect = answered_by(LLAMA, ["free"])
                records.append(fleet.submit(job, expect))
                time.sleep(0.005)
            fleet.collect(records, timeout_s=90)
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        dead_ids = {r.id for r in records if r.got is not None and not r.got.ok}
        served = sum(1 for c in fleet.provider_calls() if c["fault"] in ("500", "stall"))
        # each crashing job's pool process died on it alone, three times; the fourth
        # delivery made no call
        stalls = Counter(c["job"] for c in fleet.provider_calls() if c["fault"] == "stall")
        for jid in sorted(crashers):
            if stalls[jid] != MAX_DEATHS:
                tally.problems.append(f"{jid}: {stalls[jid]} crashing calls, not {MAX_DEATHS}")
        tally.problems.extend(crasher.missed)
        replays = dead_letter_cli(fleet, dead_ids, tally)
        tally.hit("pool children killed by crashing jobs", crasher.kills)
        tally.hit("500s and stalls served", served)
        tally.notes.append(
            f"{plain} plain, {failing} failing everywhere, {crashing} crashing their worker"
            f" ({crasher.kills} kills); {len(replays)} replayed from the dead-letter store"
        )
    return tally


def dead_letter_cli(fleet: ChaosFleet, dead_ids: set[str], tally: Tally) -> list[JobRecord]:
    """`fleet dead-letter list` shows exactly the dead jobs; `replay` of a few (the
    vision models healed) answers them under new ids and empties their entries."""
    import json
    import subprocess
    import sys

    from celery.result import AsyncResult

    from client import JobHandle
    from router.jobs import parse_job
    from workers.runtime.celery_app import get_app

    from .harness import ROOT

    fleet_cli = str(Path(sys.executable).with_name("fleet"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [fleet_cli, "dead-letter", *args],
            env=fleet.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = cli("list", "--json")
    rows = json.loads(listed.stdout) if listed.returncode == 0 else []
    if {r["job_id"] for r in rows} != dead_ids:
        tally.problems.append(f"dead-letter list: {listed.returncode} {listed.stderr[-300:]}")
    if any(not r["error"] for r in rows):
        tally.problems.append("dead-letter list: an entry without its reason")
    assert fleet.sim is not None
    fleet.sim.configure(models={m: {"fault": None} for m in VISION_UPSTREAMS})
    fleet.reset_live_state()
    replays: list[JobRecord] = []
    vision = sorted(
        i
        for i in dead_ids
        if (letter := fleet.client.hget("fleet:dead-letter", i))
        and json.loads(letter)["job"]["task_class"] == "vision"
    )[:3]
    for old in vision:
        entry = json.loads(fleet.client.hget("fleet:dead-letter", old) or "{}")
        done = cli("replay", old, "--json")
        if done.returncode != 0:
            tally.problems.append(f"dead-letter replay {old}: {done.stderr[-300:]}")
            continue
        new_id = json.loads(done.stdout)["job_id"]
        job = {**entry["job"], "id": new_id, "metadata": {"replay_of": old}}
        handle = JobHandle(parse_job(job), None, AsyncResult(new_id, app=get_app()))  # type: ignore[arg-type]
        replays.append(JobRecord(job, handle, answered_by(VISION_MINIMAX, ["vision"])))
    fleet.collect(replays, timeout_s=30)
    audit(fleet, replays, tally)
    left = {r["job_id"] for r in json.loads(cli("list", "--json").stdout or "[]")}
    if left != dead_ids - set(vision):
        tally.problems.append("dead-letter replay did not take exactly its entries out")
    bad = cli("replay", "no-such-job")
    if bad.returncode != 2 or "no dead letter 'no-such-job'" not in bad.stderr:
        tally.problems.append(f"replay of an unknown id: {bad.returncode} {bad.stderr[-200:]}")
    return replays


VISION_MINIMAX = "minimax/MiniMax-Vision-Video-01"


# --- 5. duplicate submissions with one idempotency key ------------------------------------


def idempotency(workdir: Path, keys: int = 120, late: int = 20) -> Tally:
    """Each key dispatched twice at the same moment, from two threads (and some a third
    time once answered): one execution, one bill, every caller the same Result."""
    from concurrent.futures import ThreadPoolExecutor

    tally = Tally("idempotency keys")
    with timed(tally), ChaosFleet("idem", workdir) as fleet:
        assert fleet.sim is not None
        fleet.start_worker("free", concurrency=8)
        fleet.wait_ready()
        tag = job_id("idem", 0)
        jobs = [
            ask(f"{tag} digest {k}", task_class="cost_free", idempotency_key=f"{tag}-key-{k}")
            for k in range(keys)
            for _ in range(2)
        ]
        with ThreadPoolExecutor(16) as pool:  # both copies of a key race each other
            records = list(pool.map(lambda job: fleet.submit(dict(job)), jobs))
        fleet.collect(records, timeout_s=60)
        again = [fleet.submit(dict(job)) for job in jobs[: 2 * late : 2]]
        fleet.collect(again, timeout_s=30)
        records += again
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        by_key: dict[str, set[str]] = {}
        for record in records:
            by_key.setdefault(record.job["idempotency_key"], set()).add(record.id)
        for key, ids in by_key.items():
            if len(ids) != 1:
                tally.problem("duplicated", key, f"one key, {len(ids)} jobs: {sorted(ids)}")
        calls = len(fleet.sim.requests())
        if calls != keys:
            tally.problem("duplicated", tag, f"{calls} provider calls for {keys} keys")
        tally.notes.append(
            f"{keys} keys x 2 racing dispatches + {late} re-sent after the answer:"
            f" {len({r.id for r in records})} executions, {calls} provider calls"
        )
    return tally


# --- 6. bad input at the door -------------------------------------------------------------


def bad_input(workdir: Path, examples: int = 200) -> Tally:
    """Malformed jobs generated by hypothesis: each is refused by dispatch() with
    InvalidJob (one line naming the field), and nothing reaches Redis."""
    from hypothesis import HealthCheck, given, settings

    from client import dispatch
    from router.errors import InvalidJob

    from .malformed import malformed_jobs

    tally = Tally("bad input (hypothesis)")
    with timed(tally), ChaosFleet("input", workdir) as fleet:
        control = fleet.submit(ask("a valid job", task_class="cost_free"))  # no worker: stays
        before = (fleet.queue_lengths(), fleet.client.dbsize())
        if sum(before[0].values()) != 1:
            tally.problems.append(f"the valid control job is not queued: {before[0]}")
        seen: list[str] = []

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(malformed_jobs())
        def refused(case: tuple[Any, str]) -> None:
            job, field = case
            seen.append(field)
            start = (fleet.queue_lengths(), fleet.client.dbsize())
            try:
                dispatch(job)
            except InvalidJob as exc:
                why = str(exc)
                assert "\n" not in why, why
                assert field in why, f"{field!r} not named in {why!r}"
            else:
                raise AssertionError(f"accepted: {field} = {str(job)[:200]}")
            after = (fleet.queue_lengths(), fleet.client.dbsize())
            assert after == start, f"Redis changed: {start} -> {after} ({field})"

        try:
            refused()
        except Exception as exc:
            for failure in getattr(exc, "exceptions", None) or [exc]:
                tally.problem("wrong", "hypothesis", f"{type(failure).__name__}: {failure}")
        if (fleet.queue_lengths(), fleet.client.dbsize()) != before:
            tally.problem("lost", "queues", "a malformed job reached Redis")
        tally.jobs = len(seen)
        tally.notes.append(
            f"{len(seen)} malformed jobs, {len(set(seen))} fields; the queues held only the"
            f" valid control job {control.id[:8]}… throughout"
        )
    return tally


# --- 7. secrets ---------------------------------------------------------------------------


def secrets(workdir: Path, jobs: int = 200) -> Tally:
    """With every provider key set to a distinctive value, jobs that succeed, escalate,
    fail with 401 (the model is unusable) or 400 (dead-lettered) leave no key anywhere:
    not in worker logs, results, the ledger, Flower's task list or the dead-letter store
    (nor anywhere else in Redis, nor in Flower's log)."""
    import uuid

    from router.catalog import load_catalog
    from router.errors import NoRouteAvailable

    tally = Tally("secrets")
    names = [p.api_key_env for p in load_catalog().providers.values() if p.api_key_env]
    keys_ = {name: f"sk-chaos-SECRET-{uuid.uuid4().hex}" for name in names}
    # A job finding every model resting (after their 401s) fails at once, not in 5 min.
    fleet_ = ChaosFleet("secrets", workdir, api_keys=keys_, max_wait_s=3)
    with timed(tally), fleet_ as fleet:
        assert fleet.sim is not None
        fleet.start_worker("subscription", concurrency=8)
        fleet.start_worker("free", concurrency=8)
        flower = fleet.start_flower()
        fleet.wait_ready()
        flower.wait_workers(2)
        records: list[JobRecord] = []
        turned_away = 0
        for n in range(jobs):  # (models resting after a 401 reroute later jobs: any end
            jid = job_id("secrets", n)  # is fine here, once; the audit checks that)
            if n % 10 == 3:  # the primary's key is refused: the next model answers
                job = ask(f"[[sim:glm-4.7=401]] {jid} key?", task_class="user_facing", id=jid)
            elif n % 10 == 7:  # every key refused: dead-lettered with every reason
                job = ask(f"[[sim:*=401]] {jid} no key", task_class="creative", id=jid)
            elif n % 10 == 9:  # a bad request: dead-lettered at once
                job = ask(f"[[sim:glm-4.7=400]] {jid} bad", task_class="user_facing", id=jid)
            else:  # (no fast_general: with its two models resting it would go local)
                job = ask(f"{jid} hi", task_class=("cost_free", "user_facing")[n % 2], id=jid)
            try:
                records.append(fleet.submit(job))
            except NoRouteAvailable:  # every model of its chain resting: refused, not queued
                turned_away += 1
            time.sleep(0.005)
        fleet.collect(records, timeout_s=90)
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        tasks = flower.tasks_when_final({r.id for r in records})
        places = hiding_places(fleet, tasks, flower.log_path)
        for place, text in places.items():
            for name, value in keys_.items():
                if value in text:
                    tally.problems.append(f"{name} found in {place}")
        finals = sum(1 for t in tasks.values() if t.get("state") in ("SUCCESS", "FAILURE"))
        calls = fleet.sim.requests()
        refused = sum(1 for c in calls if c["fault"] == "401")
        if not calls or not all(c["authorization_present"] for c in calls):
            tally.problems.append("the keys were not sent to the provider")
        tally.notes.append(
            f"{len(keys_)} keys; searched {len(places)} places (Flower saw {finals} jobs"
            f" end; {len(calls)} provider calls carried a key, {refused} were refused 401;"
            f" {turned_away} jobs refused at dispatch, every model of theirs resting)"
        )
    return tally


def hiding_places(fleet: ChaosFleet, tasks: dict[str, Any], flower_log: Path) -> dict[str, str]:
    """Everywhere a key could leak to, as text: Flower's task list and log, the ledger,
    the dead-letter store, every value in Redis, the workers' logs, the fleet's files."""
    import json

    from .harness import ledger_rows

    dead = fleet.client.hgetall("fleet:dead-letter")
    places = {
        "Flower /api/tasks": json.dumps(tasks),
        "Flower log": flower_log.read_text(errors="replace"),
        "ledger": json.dumps(list(ledger_rows(fleet.ledger_url).values()), default=str),
        "dead-letter store": json.dumps({reply_text(k): reply_text(v) for k, v in dead.items()}),
        "Redis (every key)": redis_dump(fleet),
        **{f"log of {name}": text for name, text in fleet.worker_logs().items()},
    }
    workdir = fleet.workdir
    files = [*workdir.glob("ledger.db*"), *(workdir / "redis").rglob("*")]
    for path in files + sorted((workdir / "data").rglob("*")):  # (data: a ledger spool)
        if path.is_file():
            places[f"file {path.name}"] = path.read_bytes().decode(errors="replace")
    return places


def redis_dump(fleet: ChaosFleet) -> str:
    """Every value in the fleet's Redis, as text."""
    out: list[bytes] = []
    for key in fleet.client.scan_iter("*"):
        kind = fleet.client.type(key)
        if kind == b"string":
            out.append(reply_bytes(fleet.client.get(key) or b""))
        elif kind == b"hash":
            pairs = fleet.client.hgetall(key).items()
            out += [reply_bytes(k) + b"=" + reply_bytes(v) for k, v in pairs]
        elif kind == b"list":
            out += map(reply_bytes, fleet.client.lrange(key, 0, -1))
        elif kind == b"zset":
            out += map(reply_bytes, fleet.client.zrange(key, 0, -1))
        elif kind == b"set":
            out += map(reply_bytes, fleet.client.smembers(key))
    return b"\n".join(out).decode(errors="replace")


SCENARIOS: dict[str, Callable[[Path], Tally]] = {
    "kill": worker_kill,
    "witnesses": witnesses,
    "redis": redis_restart,
    "faults": fault_matrix,
    "poison": poison,
    "idempotency": idempotency,
    "input": bad_input,
    "secrets": secrets,
}

# The test suite runs the same scenarios, the longer ones shortened (fewer jobs, strikes
# and faulted models; the report runs them in full).
QUICK: dict[str, Callable[[Path], Tally]] = {
    **SCENARIOS,
    "kill": partial(worker_kill, jobs=160, kills=3),
    "redis": partial(redis_restart, jobs=280, restarts=2, down_s=(0.5, 1.5)),
    "faults": partial(fault_matrix, per_fault=6),
}
