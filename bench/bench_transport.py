"""The broker transport's cost: the fleet's (workers/runtime/transport.py, which files each
job message at publish) against kombu's stock Redis channel, side by side on one
redis-server (a database each), one threads worker each, the same jobs, taking turns
round by round; each comparison is of the two sides' samples of the same round.

What it costs is a bigger publish (the message's text goes to Redis twice, in one
script) and a smaller delivery record (a tag, not the message again); what it buys, no
job lost at a kill and a killed worker's jobs back in seconds, is measured by
`python -m tests.chaos.report --long`."""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    ROOT,
    WORKER_READY,
    Load,
    Stack,
    cpu_s,
    interleaved,
    median,
    paired_differences,
    paired_ratios,
    percentile,
)


def transport(quick: bool) -> tuple[list[Any], dict[str, Any]]:
    from bench.runs import JOB, Row
    from client import dispatch, dispatch_many
    from workers.ops.pools import worker_argv
    from workers.ops.supervisor import Supervisor
    from workers.runtime.celery_app import get_app

    n, warm, batch, cpu_jobs = (60, 10, 100, 300) if quick else (200, 10, 100, 1000)
    with Stack("transport", latency_ms=0) as stack:
        fleet_worker = stack.worker("free", 8)
        stock_env = {
            **stack.env,
            "FLEET_BROKER_URL": stack.redis.url.rsplit("/", 1)[0] + "/1",
            "FLEET_BROKER_TRANSPORT": "kombu",
        }
        stock = Supervisor(stack.dir / "stock", stock_env)
        argv = worker_argv(["free"], pool="threads", concurrency=8, name="stock-free")
        stock_child = stock.start("stock-free", argv, WORKER_READY, cwd=ROOT)
        try:
            stack.wait_ready()
            stock.wait_ready(90)
            apps = {"fleet": get_app(stack.env), "kombu": get_app(stock_env)}
            pids = {"fleet": fleet_worker.child.pid, "kombu": stock_child.pid}

            def one(app: Any) -> Any:
                return lambda: dispatch(JOB, app=app).get(timeout=30)

            def send_many(app: Any) -> Any:
                def run() -> None:
                    for handle in dispatch_many([JOB] * batch, app=app):
                        handle.get(timeout=60)

                return run

            with Load() as one_load:
                samples = interleaved({side: one(app) for side, app in apps.items()}, n, warm)
            publish: dict[str, list[float]] = {side: [] for side in apps}
            worker_cpu: dict[str, list[float]] = {side: [] for side in apps}
            order = list(apps)
            with Load() as batch_load:
                for i in range(3 if quick else 6):
                    for side in order if i % 2 == 0 else order[::-1]:
                        app = apps[side]
                        before = cpu_s(pids[side])
                        start = time.perf_counter()
                        handles = dispatch_many([JOB] * batch, app=app)
                        publish[side].append((time.perf_counter() - start) / batch * 1e6)
                        for handle in handles:
                            handle.get(timeout=60)
                        worker_cpu[side].append((cpu_s(pids[side]) - before) / batch * 1000)
                for side, app in apps.items():  # and a longer run, for the workers' CPU
                    before = cpu_s(pids[side])
                    for _ in range(cpu_jobs // batch):
                        send_many(app)()
                    worker_cpu[side].append((cpu_s(pids[side]) - before) / cpu_jobs * 1000)
        finally:
            stock.stop(20)
    one_ms = {side: median(v) for side, v in samples.items()}
    pub_us = {side: median(v) for side, v in publish.items()}
    cpu_ms = {side: median(v) for side, v in worker_cpu.items()}
    one_extra = paired_differences(samples["fleet"], samples["kombu"])
    pub_ratio = median(paired_ratios(publish["fleet"], publish["kombu"]))
    cpu_ratio = median(paired_ratios(worker_cpu["fleet"], worker_cpu["kombu"]))
    rows = [
        Row(
            "transport",
            "one job: submit→result, median (ref: kombu's stock channel)",
            one_ms["fleet"],
            one_ms["kombu"],
            "ms",
            "overhead",
            median(one_extra),
            basis="paired",
            load=one_load.span,
        ),
        Row(
            "transport",
            "  ... p99",
            percentile(samples["fleet"], 99),
            percentile(samples["kombu"], 99),
            "ms",
            "overhead",
            percentile(one_extra, 99),
            basis="paired",
            load=one_load.span,
        ),
        Row(
            "transport",
            f"dispatch_many({batch}) publish, µs/job",
            pub_us["fleet"],
            pub_us["kombu"],
            "µs",
            "ratio",
            pub_ratio,
            basis="paired",
            load=batch_load.span,
        ),
        Row(
            "transport",
            "worker CPU per job, ms",
            cpu_ms["fleet"],
            cpu_ms["kombu"],
            "ms",
            "ratio",
            cpu_ratio,
            basis="paired",
            load=batch_load.span,
        ),
    ]
    details = {
        "jobs": n,
        "one_job_ms": one_ms,
        "publish_us_per_job": pub_us,
        "worker_cpu_ms_per_job": cpu_ms,
        "fleet_minus_kombu_one_job_ms": {
            "median": median(one_extra),
            "p90": percentile(one_extra, 90),
            "p99": percentile(one_extra, 99),
        },
        "publish_ratio_paired_median": pub_ratio,
        "worker_cpu_ratio_paired_median": cpu_ratio,
        "samples_ms": samples,
        "publish_us_rounds": publish,
        "worker_cpu_ms_rounds": worker_cpu,
        "load_1min": {"one_job": one_load.span, "batches": batch_load.span},
    }
    return rows, details
