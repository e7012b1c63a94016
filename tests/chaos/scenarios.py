"""The chaos scenarios. Each runs a few hundred jobs through a fleet of real processes,
breaks something on the way, and returns its audit (harness.Tally). The pytest tests and
`python -m tests.chaos.report` run these same functions."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from router.results import Result

from .harness import ChaosFleet, JobRecord, Tally, ask, audit, job_id, timed

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
        if int(fleet.client.get(key) or 0) > 1
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


# --- 1. kill -9 of worker processes mid-run -----------------------------------------------


def worker_kill(workdir: Path, jobs: int = 240, slow: int = 16) -> Tally:
    """kill -9 mid-run. A prefork worker on `subscription` has its pool children killed
    twice under traffic (reject-on-worker-lost requeues their jobs at once). Both threads
    workers on `free` are killed, then restarted, while each holds 8 jobs in the middle
    of a provider call (slow ones): every job they held comes back after the visibility
    timeout and is answered once, billed once.

    The threads workers are killed while no message is on its way to them. Killed while
    Redis is handing one over (BRPOP has popped it; kombu has not yet filed it as
    unacked, a few ms later), that message is lost: the window is kombu's Redis
    transport's own (celery/celery#7950, celery/kombu#305) and no fleet code sees the
    message. A RabbitMQ broker (acks by the broker) has no such window."""
    tally = Tally("kill -9 worker")
    with timed(tally), ChaosFleet("kill", workdir, visibility_s=10, latency_ms=80) as fleet:
        assert fleet.sim is not None
        free = [fleet.start_worker("free", concurrency=8) for _ in range(2)]
        sub = fleet.start_worker("subscription", pool="prefork", concurrency=3)
        fleet.wait_ready()
        records: list[JobRecord] = []
        children = 0
        for n in range(jobs - slow):  # traffic, with pool children killed in its midst
            if n in (jobs // 4, jobs // 2):
                children += fleet.kill_children(sub)
            if n == jobs // 3:  # the free workers busy with slow calls, then killed
                fleet.collect(records, timeout_s=60)
                records += kill_busy_workers(fleet, free, slow)
            job, expect = mixed_job("kill", n)
            records.append(fleet.submit(job, expect))
            time.sleep(0.004)
        fleet.collect(records, timeout_s=90)
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        tally.notes.append(
            f"{slow} jobs in flight on 2 killed threads workers, {children} prefork children"
            f" killed under traffic; {redelivered(fleet)} messages redelivered"
        )
    return tally


def kill_busy_workers(fleet: ChaosFleet, workers: list[Any], slow: int) -> list[JobRecord]:
    """Fill the workers with slow jobs, SIGKILL them mid-call, start them again."""
    sent = fill_with_slow_jobs(fleet, slow, 0)
    for worker in workers:
        fleet.kill(worker)
    for worker in workers:
        fleet.restart(worker, wait=False)
    return sent


# --- 2. redis-server stopped and restarted mid-run ----------------------------------------


def redis_restart(workdir: Path, jobs: int = 240, down_s: float = 2.0, slow: int = 16) -> Tally:
    """The fleet's Redis (broker, results, state; append-only file on) is stopped while
    16 jobs are in the middle of their provider calls (they end while it is down), and
    started again on its port 2 s later; the dispatcher goes on dispatching through the
    outage. Workers reconnect by themselves, results stored during the outage are
    retried, a job whose ack was lost comes back and is recognised as finished.

    Redis is stopped while no message is on its way to a worker: one that BRPOP has
    popped but the worker has not yet read is dropped with the broken connection (the
    consumer discards its socket), kombu's Redis transport's window (celery/celery#4354,
    #7950), which no fleet code sees."""
    import threading

    tally = Tally("redis restart")
    with timed(tally), ChaosFleet("redis", workdir, visibility_s=10) as fleet:
        assert fleet.sim is not None
        fleet.start_worker("free", concurrency=8)
        fleet.start_worker("subscription", concurrency=8)
        fleet.wait_ready()
        records: list[JobRecord] = []
        outage: dict[str, float] = {}
        for n in range(jobs - slow):
            if n == jobs // 3:  # busy workers, then Redis goes away for down_s
                fleet.collect(records, timeout_s=60)
                records += fill_with_slow_jobs(fleet, slow // 2, slow // 2)
                outage["down"] = time.monotonic()
                fleet.stop_redis()
                threading.Timer(down_s, lambda: (fleet.start_redis(), outage.setdefault(
                    "up", time.monotonic()))).start()  # fmt: skip
            job, expect = mixed_job("redis", n)
            records.append(fleet.submit(job, expect))  # (retried through the outage)
            time.sleep(0.01)
        fleet.collect(records, timeout_s=90)
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        tally.notes.append(
            f"Redis down {outage['up'] - outage['down']:.1f} s with {slow} jobs mid-call;"
            f" dispatch retried {fleet.dispatch_retries} times, get() {fleet.get_retries}"
            f" times; {redelivered(fleet)} messages redelivered"
        )
    return tally


def fill_with_slow_jobs(fleet: ChaosFleet, free: int, sub: int) -> list[JobRecord]:
    """Slow jobs (2 s calls) on `free` and `subscription`, once every one is mid-call."""
    assert fleet.sim is not None
    slow = {m: {"latency_ms": 2000} for m in (LLAMA.split("/", 1)[1], "glm-4.7")}
    fleet.sim.configure(models=slow)
    sent = []
    for n in range(free + sub):
        jid = job_id("slow", n)
        job = ask(f"{jid} slow", task_class="cost_free" if n < free else "user_facing", id=jid)
        sent.append(fleet.submit(job))
    deadline = time.monotonic() + 10
    while sum(fleet.queue_lengths().values()) and time.monotonic() < deadline:
        time.sleep(0.05)  # every slow job taken: the workers are mid-call
    time.sleep(0.3)
    fleet.sim.configure(models={m: {"latency_ms": fleet.latency_ms} for m in slow})
    return sent


# --- 3. the provider fault matrix ---------------------------------------------------------

# fault -> (error kind, action) of the faulted model's attempt. A user_facing job's chain
# is glm-4.7, MiniMax-M2.1, kimi, qwen3-next-free: a `[[sim:glm-4.7=FAULT]]` directive
# makes the primary fail, and the job must then be answered by MiniMax-M2.1 ("retry" and
# "next"), or fail at once ("fail"). "refused" is a long_context job whose first model's
# provider listens nowhere: the job moves to the next model, on another queue.
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


def fault_job(fault: str, n: int) -> tuple[dict[str, Any], Expect, str]:
    """A job meeting `fault` on its first model, its expectation, and that model."""
    jid = job_id(f"fault-{fault.replace(':', '_')}", n)
    if fault == "refused":
        job = ask(f"{jid} long read", task_class="long_context", id=jid)
        return job, documented(fault, MOONSHOT, QWEN_NEXT, ["long-context", "free"]), MOONSHOT
    job = ask(f"[[sim:glm-4.7={fault}]] {jid} answer", task_class="user_facing", id=jid)
    return job, documented(fault, GLM, MINIMAX, ["subscription", "subscription"]), GLM


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


def fault_matrix(workdir: Path, per_fault: int = 14) -> Tally:
    """Every provider fault against the simulator, each group from a clean live state
    (a 429 or a 401 rests the model fleet-wide, which would hide the next group's)."""
    tally = Tally("provider faults")
    with timed(tally), ChaosFleet("faults", workdir, dead_providers=["moonshot"]) as fleet:
        fleet.start_worker("subscription", concurrency=16)
        fleet.start_worker("free", concurrency=8)
        fleet.start_worker("long-context", concurrency=8)
        fleet.start_worker("vision", concurrency=4)
        fleet.wait_ready()
        waiting = long_retry_after(fleet)  # they wait while the groups run
        records: list[JobRecord] = []
        met = 0
        for fault in FAULTS:
            fleet.reset_live_state()
            group = [fault_job(fault, n) for n in range(per_fault)]
            sent = [fleet.submit(job, expect) for job, expect, _ in group]
            fleet.collect(sent, timeout_s=60)
            faulty = group[0][2]
            hit = [r for r in sent if r.got and any(a.model == faulty for a in r.got.attempts)]
            if not hit:
                tally.problems.append(f"{fault}: no job ever reached {faulty}")
            met += len(hit)
            records += sent
        fleet.collect(waiting, timeout_s=60)
        records += waiting
        fleet.reset_live_state()
        audit(fleet, records, tally)
        fleet.check_workers(tally)
        tally.notes.append(
            f"{len(FAULTS)} faults x {per_fault} jobs + 2 jobs rate-limited everywhere for"
            f" 12 s (longer than the 10 s visibility timeout); {met} met their fault, the others"
            " found the model resting (cooldown after 429/401/404) and went on"
        )
    return tally


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
    """Kills the subscription worker's pool processes whenever the simulator sees a
    request of a crashing job (a `stall` fault: the call hangs until the kill), so the
    job's worker dies on each of its deliveries."""

    def __init__(self, fleet: ChaosFleet, worker: Any) -> None:
        import threading

        self.fleet, self.worker = fleet, worker
        self.kills = 0
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
            stalls = sum(1 for r in self.fleet.sim.requests() if r["fault"] == "stall")
            if stalls > seen:
                seen = stalls
                time.sleep(0.05)  # let the delivery be well inside its call
                self.fleet.kill_children(self.worker)
                self.kills += 1
            time.sleep(0.02)


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
        with Crasher(fleet, sub) as crasher:
            for n in range(jobs):
                jid = job_id("poison", n)
                if n % (jobs // crashing) == 1 and n // (jobs // crashing) < crashing:
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
        replays = dead_letter_cli(fleet, dead_ids, tally)
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

    from router.dispatcher import JobHandle
    from router.jobs import parse_job
    from workers.runtime.celery_app import get_app

    from .harness import ROOT

    fleet_cli = str(Path(sys.executable).with_name("fleet"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [fleet_cli, "dead-letter", *args], env=fleet.env, cwd=ROOT,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

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
    vision = sorted(i for i in dead_ids if fleet.client.hget("fleet:dead-letter", i) and
                    json.loads(fleet.client.hget("fleet:dead-letter", i))["job"]["task_class"]
                    == "vision")[:3]  # fmt: skip
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

    from router.dispatcher import dispatch
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
            max_examples=examples, deadline=None, database=None,
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
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
        "dead-letter store": json.dumps({k.decode(): v.decode() for k, v in dead.items()}),
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
    out = []
    for key in fleet.client.scan_iter("*"):
        kind = fleet.client.type(key)
        if kind == b"string":
            out.append(fleet.client.get(key) or b"")
        elif kind == b"hash":
            out += [k + b"=" + v for k, v in fleet.client.hgetall(key).items()]
        elif kind == b"list":
            out += fleet.client.lrange(key, 0, -1)
        elif kind == b"zset":
            out += [m for m, _ in fleet.client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"set":
            out += list(fleet.client.smembers(key))
    return b"\n".join(out).decode(errors="replace")


SCENARIOS: dict[str, Callable[[Path], Tally]] = {
    "kill": worker_kill,
    "redis": redis_restart,
    "faults": fault_matrix,
    "poison": poison,
    "idempotency": idempotency,
    "input": bad_input,
    "secrets": secrets,
}
