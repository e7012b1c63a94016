"""The benchmarks. Each returns `Row`s (what the table prints) and a dict of details (what
the JSON keeps); each starts its own Redis, simulator and workers and stops them.

Fleet and raw Celery run side by side in one process tree, taking turns round by round,
so a noisy neighbour on this shared machine hits both. Each side's figure is its median
over rounds; a comparison (an overhead, a ratio) is taken round by round, the fleet's
sample against the reference's of the same round, and its median or percentile is of
those per-round values (`Row.basis` says where it is not). "Raw" is bench/raw_app.py:
the fleet's own Celery settings, none of the fleet's logic."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.common import (
    Load,
    Stack,
    cpu_s,
    interleaved,
    median,
    paired_differences,
    paired_ratios,
    percentile,
)

# A realistic small job: routed by focus to a free model without rate limits (raw Celery
# has none either), so both sides make exactly one HTTP call per job.
PROMPT = "Summarise this morning's three headlines in one sentence each, plainly. " * 4
JOB: dict[str, Any] = {
    "task_class": "cost_free",
    "focus": "journalist",
    "messages": [
        {"role": "system", "content": "You are a concise news assistant."},
        {"role": "user", "content": PROMPT},
    ],
}
UPSTREAM = "qwen3-next-free"  # what the fleet sends the simulator for that job
ESCALATING_JOB: dict[str, Any] = {
    "task_class": "fast_general",
    "messages": [{"role": "user", "content": "[[sim:MiniMax-M2.1=503]] a quick one"}],
}
PRIMARY, SECOND = "MiniMax-M2.1", "meta-llama/llama-3.1-405b-instruct:free"
GET_TIMEOUT_S = 120


@dataclass
class Row:
    """One figure. `fleet` and `ref` are each side's own figure (usually a median);
    `value` compares them as `basis` says: "paired" is the median (or the percentile the
    measure names) of the per-round differences or ratios of samples taken in turns;
    anything else ("of best tries", "of peaks") names the two figures it compares, and the
    table prints it beside the value. `load` is the 1-minute load average as the figure's
    measurement started and as it ended."""

    bench: str
    measure: str
    fleet: float | None
    ref: float | None = None
    unit: str = ""  # "ms", "µs", "/s", "×", "count" (an integer, printed bare), ...
    compare: str = ""  # "ratio" (fleet / ref), "overhead" (fleet - ref), or ""
    value: float | None = None  # the ratio or overhead
    target: str = "info"
    met: bool | None = None
    basis: str = ""  # "paired", "of best tries", "of peaks" (how `value` is taken), or ""
    load: list[float] | None = None


Result = tuple[list[Row], dict[str, Any]]


def _payload() -> dict[str, Any]:
    from router.jobs import parse_job

    return parse_job(JOB).model_dump(mode="json", exclude_none=True)


def _fleet_batch(n: int) -> Callable[[], None]:
    """Dispatch `n` jobs, then wait for every result."""
    from client import dispatch

    def run() -> None:
        handles = [dispatch(JOB) for _ in range(n)]
        for handle in handles:
            result = handle.get(timeout=GET_TIMEOUT_S)
            assert result.ok, result.error

    return run


def _raw_batch(n: int) -> Callable[[], None]:
    """Send `n` raw tasks making the same HTTP call, then wait for every result."""
    from bench.raw_app import RAW_CALL, RAW_QUEUE, get_raw_app

    task = get_raw_app().tasks[RAW_CALL]
    payload = _payload()

    def run() -> None:
        pending = [
            task.apply_async(kwargs={"job": payload, "model": UPSTREAM}, queue=RAW_QUEUE)
            for _ in range(n)
        ]
        for result in pending:
            result.get(timeout=GET_TIMEOUT_S)

    return run


# --- 1. router ---------------------------------------------------------------------------


def router(quick: bool) -> Result:
    from bench.bench_router import measure

    with Load() as load:
        figures = measure(quick)
    rows = [
        Row("router", "route() decisions/s (pure policy)", figures["decisions_per_s"], unit="/s"),
        Row("router", "parse_job + route_job, µs/job", figures["validate_route_us"], unit="µs"),
    ]
    for row in rows:
        row.load = load.span
    return rows, {**figures, "load_1min": load.span}


# --- 2. enqueue --------------------------------------------------------------------------


def _senders() -> dict[str, Callable[[int], None]]:
    from bench.raw_app import NOOP, get_raw_app
    from client import dispatch, dispatch_many
    from client.dispatch import current_catalog, first_usable
    from router.jobs import parse_job
    from router.policy import route_job

    noop = get_raw_app().tasks[NOOP]
    payload = _payload()

    def fleet(k: int) -> None:
        for _ in range(k):
            dispatch(JOB)

    def raw(k: int) -> None:
        for _ in range(k):
            noop.apply_async(kwargs={"job": payload}, queue="free")

    def batch(k: int) -> None:  # one dispatch_many of k jobs
        dispatch_many([JOB] * k)

    def decide(k: int) -> None:  # what dispatch() does before it sends
        catalog = current_catalog()
        for _ in range(k):
            job = parse_job(JOB)
            first_usable(catalog, job, route_job(catalog, job))

    return {"fleet": fleet, "raw": raw, "batch": batch, "decide": decide}


def enqueue(quick: bool) -> Result:
    """dispatch() vs raw apply_async of a no-op task, same broker and app settings, no
    worker consuming; many short rounds from this one process, each side once a round,
    the order flipping every round (the queue is emptied before each, untimed), so
    drift and noise hit both sides alike and each round's figures pair."""
    import redis

    n, rounds = (100, 8) if quick else (100, 30)
    per_job: dict[str, list[float]] = {"fleet": [], "raw": [], "batch": [], "decide": []}
    with Stack("enqueue") as stack:
        broker = redis.Redis.from_url(stack.redis.url)
        senders = _senders()
        for send in senders.values():
            send(50)  # warm: connections, caches, imports
        with Load() as load:
            for i in range(rounds):
                order = ("fleet", "raw", "batch", "decide")
                for name in order if i % 2 == 0 else order[::-1]:
                    queued = broker.keys("free*")
                    if queued:
                        broker.delete(*queued)
                    start = time.perf_counter()
                    senders[name](n)
                    per_job[name].append((time.perf_counter() - start) / n * 1e6)
        broker.close()
    fleet_us, raw_us, batch_us, decide_us = (
        median(per_job[k]) for k in ("fleet", "raw", "batch", "decide")
    )
    # rates: raw's µs over the fleet's in each round, then the median
    ratio = median(paired_ratios(per_job["raw"], per_job["fleet"]))
    batch_ratio = median(paired_ratios(per_job["raw"], per_job["batch"]))
    extra_us = median(paired_differences(per_job["fleet"], per_job["raw"]))
    rows = [
        Row(
            "enqueue",
            "enqueue rate, jobs/s (1 process, no consumer), vs raw apply_async",
            1e6 / fleet_us,
            1e6 / raw_us,
            "/s",
            "ratio",
            ratio,
            "≥ 0.9× raw",
            ratio >= 0.9,
            "paired",
        ),
        Row(
            "enqueue",
            "dispatch() µs/job (validate+route+enqueue), vs raw apply_async",
            fleet_us,
            raw_us,
            "µs",
            "overhead",
            extra_us,
            "< 500 µs",
            fleet_us < 500,
            "paired",
        ),
        Row("enqueue", "  of which validate+route+live check, µs/job", decide_us, unit="µs"),
        Row(
            "enqueue",
            f"dispatch_many({n}) rate, jobs/s, vs raw apply_async",
            1e6 / batch_us,
            1e6 / raw_us,
            "/s",
            "ratio",
            batch_ratio,
            "≥ 5× raw",
            batch_ratio >= 5,
            "paired",
        ),
    ]
    for row in rows:
        row.load = load.span
    details = {
        "jobs_per_round": n,
        "rounds": rounds,
        "fleet_jobs_per_s": 1e6 / fleet_us,
        "raw_jobs_per_s": 1e6 / raw_us,
        "ratio": ratio,
        "dispatch_us": fleet_us,
        "raw_apply_async_us": raw_us,
        "dispatch_minus_raw_us_paired_median": extra_us,
        "validate_route_first_usable_us": decide_us,
        "dispatch_many_us": batch_us,
        "dispatch_many_ratio": batch_ratio,
        "rounds_us": per_job,
        "load_1min": load.span,
    }
    return rows, details


# --- 3. end-to-end throughput --------------------------------------------------------------


def throughput(quick: bool) -> Result:
    """N jobs dispatched, then every result awaited, instant provider; both workers up
    (threads, same -c), one idle while the other runs; rounds taking turns to go first,
    each round's pair compared as a ratio, then the median."""
    n, rounds, concurrency = (300, 2, 100) if quick else (1000, 4, 100)
    figures: dict[str, dict[str, list[float]]] = {
        side: {
            "jobs_per_s": [],
            "worker_cpu_ms_per_job": [],
            "redis_cpu_ms_per_job": [],
            "ledger_writer_cpu_ms_per_job": [],
        }
        for side in ("fleet", "raw")
    }
    with Stack("e2e", latency_ms=0) as stack:
        workers = {
            "fleet": stack.worker("free", concurrency),
            "raw": stack.worker("raw", concurrency, raw=True),
        }
        stack.wait_ready()
        redis_pid = stack.redis.process.pid
        batches = {"fleet": _fleet_batch(n), "raw": _raw_batch(n)}
        _fleet_batch(30)()
        _raw_batch(30)()
        with Load() as load:
            for i in range(rounds):
                for side in ("fleet", "raw") if i % 2 == 0 else ("raw", "fleet"):
                    worker, out = workers[side], figures[side]
                    writer = stack.ledger_writer
                    writer0 = writer.cpu_s() if writer else 0.0
                    cpu0, redis0, start = worker.cpu_s(), cpu_s(redis_pid), time.perf_counter()
                    batches[side]()
                    out["jobs_per_s"].append(n / (time.perf_counter() - start))
                    out["worker_cpu_ms_per_job"].append((worker.cpu_s() - cpu0) / n * 1000)
                    out["redis_cpu_ms_per_job"].append((cpu_s(redis_pid) - redis0) / n * 1000)
                    if side == "fleet" and writer is not None:
                        spent = writer.cpu_s() - writer0
                        out["ledger_writer_cpu_ms_per_job"].append(spent / n * 1000)
    f = {k: median(v) if v else float("nan") for k, v in figures["fleet"].items()}
    r = {k: median(v) if v else float("nan") for k, v in figures["raw"].items()}

    def ratio(key: str) -> float:
        return median(paired_ratios(figures["fleet"][key], figures["raw"][key]))

    cpu, rcpu = "worker_cpu_ms_per_job", "redis_cpu_ms_per_job"
    rate_ratio, cpu_ratio, redis_ratio = ratio("jobs_per_s"), ratio(cpu), ratio(rcpu)
    rows = [
        Row(
            "e2e",
            f"throughput, jobs/s (threads -c {concurrency}, 0 ms provider), vs raw",
            f["jobs_per_s"],
            r["jobs_per_s"],
            "/s",
            "ratio",
            rate_ratio,
            "≥ 0.9× raw",
            rate_ratio >= 0.9,
            "paired",
        ),
        Row(
            "e2e",
            "  worker CPU per job",
            f[cpu],
            r[cpu],
            "ms",
            "ratio",
            cpu_ratio,
            "≤ 1.2× raw",
            cpu_ratio <= 1.2,
            "paired",
        ),
        Row(
            "e2e",
            "  redis-server CPU per job",
            f[rcpu],
            r[rcpu],
            "ms",
            "ratio",
            redis_ratio,
            basis="paired",
        ),
        Row(
            "e2e",
            "  ledger writer process CPU per job (spool → database)",
            f["ledger_writer_cpu_ms_per_job"],
            None,
            "ms",
        ),
    ]
    for row in rows:
        row.load = load.span
    details = {
        "jobs_per_round": n,
        "rounds": rounds,
        "concurrency": concurrency,
        **figures,
        "paired_ratios_median": {"jobs_per_s": rate_ratio, cpu: cpu_ratio, rcpu: redis_ratio},
        "load_1min": load.span,
    }
    return rows, details


# --- 4. one job at a time ------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": median(values),
        "p90_ms": percentile(values, 90),
        "p99_ms": percentile(values, 99),
    }


def latency(quick: bool) -> Result:
    """Sequential jobs, instant provider: submit-to-result, against a direct httpx call to
    the same simulator from this process; the three take turns, job by job, and each
    round's fleet job, raw job and direct call make one triple for the overheads."""
    import httpx

    n, warm = (60, 10) if quick else (200, 10)
    with Stack("latency", latency_ms=0) as stack:
        stack.worker("free", 100)
        stack.worker("raw", 100, raw=True)
        stack.wait_ready()
        assert stack.sim is not None
        url = stack.sim.url + "/chat/completions"
        body = {"model": UPSTREAM, "messages": JOB["messages"]}
        headers = {"Authorization": "Bearer sim-placeholder-key"}
        with httpx.Client(timeout=30) as client:

            def direct() -> None:
                client.post(url, json=body, headers=headers).raise_for_status()

            one = {"direct": direct, "fleet": _fleet_batch(1), "raw": _raw_batch(1)}
            with Load() as load:
                samples = interleaved(one, n, warm)
    fleet, raw, direct_ms = (median(samples[k]) for k in ("fleet", "raw", "direct"))
    fleet_over = paired_differences(samples["fleet"], samples["direct"])
    raw_over = paired_differences(samples["raw"], samples["direct"])
    # (fleet - direct) - (raw - direct) of one round is fleet - raw of that round
    extra = paired_differences(samples["fleet"], samples["raw"])
    rows = [
        Row("latency", "one job: submit→result, median (ref: raw Celery)", fleet, raw, "ms"),
        Row("latency", "  direct httpx call to the simulator, median", direct_ms, direct_ms, "ms"),
        Row(
            "latency",
            "  overhead over the direct call, median",
            median(fleet_over),
            median(raw_over),
            "ms",
            "overhead",
            median(extra),
            "≤ raw + 1 ms",
            median(extra) <= 1,
            "paired",
        ),
        Row(
            "latency",
            "  overhead over the direct call, p99",
            percentile(fleet_over, 99),
            percentile(raw_over, 99),
            "ms",
            "overhead",
            percentile(extra, 99),
            basis="paired",
        ),
    ]
    for row in rows:
        row.load = load.span
    details: dict[str, Any] = {"jobs": n, "load_1min": load.span}
    for side, values in samples.items():
        details[side] = _spread(values)
    details["fleet_overhead_ms"] = _spread(fleet_over)
    details["raw_overhead_ms"] = _spread(raw_over)
    details["fleet_minus_raw_ms"] = _spread(extra)
    details["samples_ms"] = samples
    return rows, details


# --- 5. I/O concurrency --------------------------------------------------------------------


def _io_level(stack: Stack, c: int, n: int, tries: int) -> dict[str, dict[str, Any]]:
    """Both sides at concurrency `c`: `tries` runs each (alternating), best kept."""
    workers = {"fleet": stack.worker("free", c), "raw": stack.worker("raw", c, raw=True)}
    stack.wait_ready()
    _fleet_batch(1)()  # each side's first job loads its adapters
    _raw_batch(1)()
    batches = {"fleet": _fleet_batch(n), "raw": _raw_batch(n)}
    seconds: dict[str, list[float]] = {"fleet": [], "raw": []}
    cpu_ms: dict[str, list[float]] = {"fleet": [], "raw": []}
    with Load() as load:
        for attempt in range(tries):
            for side in ("fleet", "raw") if attempt % 2 == 0 else ("raw", "fleet"):
                worker = workers[side]
                cpu0, start = worker.cpu_s(), time.perf_counter()
                batches[side]()
                seconds[side].append(time.perf_counter() - start)
                cpu_ms[side].append((worker.cpu_s() - cpu0) / n * 1000)
    out = {
        side: {
            "seconds": min(seconds[side]),
            "tries_s": seconds[side],
            "bound_s": n / c,
            "x_bound": min(seconds[side]) / (n / c),
            "peak_rss_mb": worker.peak_rss_mb(),
            "worker_cpu_ms_per_job": cpu_ms[side],
            "load_1min": load.span,
        }
        for side, worker in workers.items()
    }
    stack.stop_workers()
    return out


def concurrency(quick: bool) -> Result:
    """1,000 jobs against a 1 s provider, one worker process of -c N threads (fresh workers
    at each N); completion time against Little's law (jobs x latency / concurrency); peak
    RSS (VmHWM). The sides compare by their best try each (a burst of 1,000 jobs is too
    long a measure for many rounds to pair)."""
    n, levels = (1000, (100, 500)) if quick else (1000, (100, 500, 1000))
    runs: dict[str, dict[int, dict[str, Any]]] = {"fleet": {}, "raw": {}}
    with Stack("concurrency", latency_ms=1000) as stack, Load() as whole:
        for c in levels:
            level = _io_level(stack, c, n, tries=1 if quick else 2)
            for side in runs:
                runs[side][c] = level[side]
    rows = []
    for c in levels:
        f, r = runs["fleet"][c], runs["raw"][c]
        span = f["load_1min"]
        rows += [
            Row(
                "io",
                f"1,000 jobs × 1 s, threads -c {c}: seconds, vs raw",
                f["seconds"],
                r["seconds"],
                "s",
                "ratio",
                f["seconds"] / r["seconds"],
                "≤ 1.25× bound" if c == 100 else "info",
                f["x_bound"] <= 1.25 if c == 100 else None,
                "of best tries",
                span,
            ),
            Row(
                "io",
                f"  ... × Little's-law bound ({f['bound_s']:g} s)",
                f["x_bound"],
                r["x_bound"],
                "×",
                load=span,
            ),
            Row(
                "io",
                "  ... peak RSS per worker (VmHWM)",
                f["peak_rss_mb"],
                r["peak_rss_mb"],
                "MiB",
                "ratio",
                f["peak_rss_mb"] / r["peak_rss_mb"],
                basis="of peaks",
                load=span,
            ),
        ]
    top = max(levels)
    raw_best = min(v["seconds"] for v in runs["raw"].values())
    fleet_top = runs["fleet"][top]["seconds"]
    full = top == 1000
    rows += [
        Row(
            "io",
            f"fleet at -c {top} vs raw's best at any -c",
            fleet_top,
            raw_best,
            "s",
            "ratio",
            fleet_top / raw_best,
            "≤ raw best" if full else "info (no c=1000)",
            fleet_top <= raw_best if full else None,
            "of best tries",
            whole.span,
        ),
    ]
    details: dict[str, Any] = {"jobs": n, "latency_s": 1.0, "pool": "threads", **runs}
    details["gevent"] = "not measured: gevent is not installed in the project's venv"
    details["load_1min"] = whole.span
    return rows, details


# --- 6. escalation -------------------------------------------------------------------------


def escalation(quick: bool) -> Result:
    """A primary's scripted 503 on the subscription queue; the next model is on the free
    queue with an idle worker. From the simulator's log: the 503'd request's arrival to
    the next model's request's arrival (the 503 itself takes no time to answer), job by
    job, so each gap is a difference within one job."""
    from client import dispatch

    n = 30 if quick else 100
    with Stack("escalation", latency_ms=0) as stack:
        stack.worker("subscription", 100)
        stack.worker("free", 100)
        stack.wait_ready()
        assert stack.sim is not None
        for _ in range(3):  # warm both workers' adapters
            dispatch(ESCALATING_JOB).get(timeout=GET_TIMEOUT_S)
        stack.sim.reset()
        with Load() as load:
            paths = [
                tuple(dispatch(ESCALATING_JOB).get(timeout=GET_TIMEOUT_S).queue_path)
                for _ in range(n)
            ]
        log = stack.sim.requests()
    assert all(p == ("subscription", "free") for p in paths), set(paths)
    firsts = [e["t"] for e in log if e["model"] == PRIMARY]
    seconds = [e["t"] for e in log if e["model"] == SECOND]
    assert len(firsts) == len(seconds) == n, (len(firsts), len(seconds))
    gaps = [(b - a) * 1000 for a, b in zip(firsts, seconds, strict=True)]
    med, p99 = median(gaps), percentile(gaps, 99)
    rows = [
        Row(
            "escalation",
            "503 → next model's request (other queue), median",
            med,
            unit="ms",
            target="< 20 ms",
            met=med < 20,
            load=load.span,
        ),
        Row("escalation", "  ... p99", p99, unit="ms", load=load.span),
    ]
    details = {
        "jobs": n,
        "median_ms": med,
        "p99_ms": p99,
        "max_ms": max(gaps),
        "gaps_ms": gaps,
        "load_1min": load.span,
    }
    return rows, details


def _gateway_bench(quick: bool) -> Result:
    from bench.bench_gateway import gateway

    return gateway(quick)


def _transport_bench(quick: bool) -> Result:
    from bench.bench_transport import transport

    return transport(quick)


def _sweep_bench(quick: bool) -> Result:
    from bench.bench_sweep import sweep

    return sweep(quick)


def _stream_bench(quick: bool) -> Result:
    from bench.bench_stream import stream

    return stream(quick)


BENCHES: dict[str, Callable[[bool], Result]] = {
    "router": router,
    "enqueue": enqueue,
    "e2e": throughput,
    "latency": latency,
    "io": concurrency,
    "escalation": escalation,
    "gateway": _gateway_bench,
    "transport": _transport_bench,
    "sweep": _sweep_bench,
    "stream": _stream_bench,
}
