"""What every benchmark needs: a private Redis, the simulator, worker processes, and
/proc readings (CPU time, peak RSS) of those processes. Everything binds to 127.0.0.1
and is stopped by `Stack.close()`, whatever happened."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from workers.ops.supervisor import Child, Supervisor

ROOT = Path(__file__).resolve().parents[1]
WORKER_READY = " ready."  # what `celery worker` logs once it consumes
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
PROVIDER_TIMEOUT_S = 30.0  # the simulated catalog's per-call timeout (1 s calls queue up)
BIG = 1_000_000_000


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q`th percentile of `values`."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return float(ordered[index])


def paired_differences(fleet: list[float], reference: list[float]) -> list[float]:
    """`fleet[i] - reference[i]` for each pair taken in the same round.

    An overhead's percentile is a percentile of these differences: the difference of two
    percentiles (p99 of one side minus p99 of the other) compares two different rounds'
    samples and can even put a p99 below the median."""
    if len(fleet) != len(reference):
        raise ValueError(f"unpaired samples: {len(fleet)} against {len(reference)}")
    return [f - r for f, r in zip(fleet, reference, strict=True)]


def paired_ratios(fleet: list[float], reference: list[float]) -> list[float]:
    """`fleet[i] / reference[i]` for each pair taken in the same round."""
    if len(fleet) != len(reference):
        raise ValueError(f"unpaired samples: {len(fleet)} against {len(reference)}")
    return [f / r for f, r in zip(fleet, reference, strict=True)]


def interleaved(runs: Mapping[str, Callable[[], Any]], n: int, warm: int) -> dict[str, list[float]]:
    """Milliseconds of each run, `n` times, taking turns (after `warm` untimed rounds):
    every side meets the same moments of a noisy machine, and the i-th sample of each
    side comes from the same round, so they pair (`paired_differences`). The order
    within a round flips every round, so no side always goes first."""
    samples: dict[str, list[float]] = {side: [] for side in runs}
    order = list(runs)
    for i in range(n + warm):
        for side in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            runs[side]()
            if i >= warm:
                samples[side].append((time.perf_counter() - start) * 1000)
    return samples


def loadavg_1min() -> float:
    """The machine's 1-minute load average (all its processes, this benchmark's too)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


class Load:
    """The 1-minute load average read as a measurement starts and as it ends:
    `with Load() as load: ...`, then `load.span` is [start, end]."""

    def __init__(self) -> None:
        self.span: list[float] = []

    def __enter__(self) -> Load:
        self.span = [loadavg_1min()]
        return self

    def __exit__(self, *exc: object) -> None:
        self.span.append(loadavg_1min())


# --- /proc ----------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set, in MiB."""
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


# --- the stack: Redis, simulator, workers ----------------------------------------------


class Simulator:
    """`python -m workers.sim.simulator` in its own process (not in the driver's GIL)."""

    def __init__(self, log_path: Path, latency_ms: float = 0) -> None:
        argv = [sys.executable, "-m", "workers.sim.simulator", "--port", "0"]
        argv += ["--latency-ms", str(latency_ms)]
        self.log = open(log_path, "w+b")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, start_new_session=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        found = re.search(r"http://[\d.]+:(\d+)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"simulator did not start: {line!r}")
        self.base_url = f"http://127.0.0.1:{found.group(1)}"
        self.url = self.base_url + "/v1"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body if body is not None else {}).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def configure(self, config: dict[str, Any]) -> None:
        self._call("POST", "/_sim/config", config)

    def reset(self) -> None:
        self._call("POST", "/_sim/reset")

    def requests(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/_sim/requests"))

    def stop(self) -> None:
        stop_process(self.process)
        if self.process.stdout:
            self.process.stdout.close()
        self.log.close()


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Worker:
    """One `celery worker` process (threads pool: one process, all its threads), a child
    of the stack's Supervisor (the one `fleet up` runs its workers under)."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.name, self.log_path = child.name, child.log_path

    @property
    def pid(self) -> int:
        return self.child.pid

    def log(self) -> str:
        return self.child.log()

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.pid)


class Stack:
    """A private Redis (no persistence), the simulator, and workers, in a temp dir."""

    def __init__(self, name: str, latency_ms: float = 0) -> None:
        from workers.ops.redis_server import RedisServer
        from workers.sim.simulated import simulated_env

        self.dir = Path(tempfile.mkdtemp(prefix=f"fleet-bench-{name}-"))
        self.workers: list[Worker] = []
        self.ledger_writer: Worker | None = None  # started with the first fleet worker
        self.redis: Any = None
        self.sim: Simulator | None = None
        self.supervisor: Supervisor | None = None
        self._saved_env = dict(os.environ)
        try:
            self.redis = RedisServer(self.dir / "redis", appendonly=False).start()
            self.sim = Simulator(self.dir / "simulator.log", latency_ms)
            fleet = simulated_env(self.sim.url, self.dir / "no-local-model", self.dir, 30)
            bench_catalog(Path(fleet["FLEET_CATALOG"]))
            self.env = {
                **os.environ,
                **fleet,
                "FLEET_BROKER_URL": self.redis.url,
                "FLEET_LEDGER_URL": f"sqlite:///{self.dir / 'ledger.db'}",
                "FLEET_DATA_DIR": str(self.dir / "data"),
                "BENCH_SIM_URL": self.sim.url,
                "PYTHONPATH": str(ROOT),
            }
            self.env.pop("FLEET_STATE_URL", None)
            self.supervisor = Supervisor(self.dir, self.env)
            # This process dispatches: it sees the same FLEET_* as the workers.
            os.environ.clear()
            os.environ.update(self.env)
        except BaseException:
            self.close()
            raise

    def worker(
        self, queue: str, concurrency: int, *, raw: bool = False, pool: str = "threads"
    ) -> Worker:
        """A fleet worker on `queue`, or (raw) the bench's plain Celery app's worker."""
        from workers.ops.pools import worker_argv

        kind = "raw" if raw else "fleet"
        name = f"{kind}-{queue}-{pool}{concurrency}-{len(self.workers)}"
        argv = worker_argv(["free"], pool=pool, concurrency=concurrency, name=name)
        argv[argv.index("-Q") + 1] = queue  # the raw app has a queue of its own
        if raw:
            argv[argv.index("-A") + 1] = "bench.raw_app"
        assert self.supervisor is not None
        worker = Worker(self.supervisor.start(name, argv, WORKER_READY, cwd=ROOT))
        self.workers.append(worker)
        if not raw and self.ledger_writer is None:
            # The fleet as deployed: its finished jobs' rows go through the spool to the
            # ledger writer, a process of its own that shares this machine's cores.
            from workers.ledger.writer import READY as LEDGER_WRITER_READY
            from workers.ops.up import ledger_writer_argv

            child = self.supervisor.start(
                "ledger-writer", ledger_writer_argv(), LEDGER_WRITER_READY, cwd=ROOT
            )
            self.ledger_writer = Worker(child)
        return worker

    def wait_ready(self, timeout_s: float = 90) -> None:
        assert self.supervisor is not None
        self.supervisor.wait_ready(timeout_s)

    def stop_workers(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop(20)
        self.workers = []
        self.ledger_writer = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_workers()
        if self.sim is not None:
            self.sim.stop()
        if self.redis is not None:
            self.redis.stop()
        os.environ.clear()
        os.environ.update(self._saved_env)
        _forget_clients()
        if os.environ.get("BENCH_KEEP") is None:  # BENCH_KEEP=1 keeps logs to read
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _forget_clients() -> None:
    """This stack's Redis is gone: drop the apps and clients this process built for it."""
    from bench import raw_app
    from workers.runtime import celery_app
    from workers.state import connections, live

    for apps in (celery_app._apps, raw_app._apps):
        for app in apps.values():
            with contextlib.suppress(Exception):
                # results still pending (a failed run) must not unsubscribe from a dead Redis
                app.backend.result_consumer.subscribed_to.clear()
            with contextlib.suppress(Exception):
                app.close()
        apps.clear()
    for view in live._views.values():
        with contextlib.suppress(Exception):
            view.state.redis.close()
    live._views.clear()
    for client in connections._clients.values():
        with contextlib.suppress(Exception):
            client.close()
    connections._clients.clear()


def bench_catalog(path: Path) -> None:
    """The simulated catalog with its limits raised out of reach and the circuit breaker
    made unreachable: a benchmark sends far more calls than the real plans' limits (20 a
    minute on OpenRouter's free models) and scripts 100 failures in a row. The limit
    windows stay in place, so every admission still runs its Redis script."""
    data = yaml.safe_load(path.read_text())
    for item in [*data["providers"].values(), *data["models"]]:
        limits = item.get("limits")
        if not limits:
            continue
        for key in ("requests_per_min", "requests_per_day", "tokens_per_min"):
            if key in limits:
                limits[key] = BIG
        quota = limits.get("quota")
        for key in ("requests", "tokens"):
            if quota and quota.get(key):
                quota[key] = BIG
    data["policy"]["cooldowns"]["circuit_failures"] = BIG
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    from router.catalog import load_catalog

    load_catalog(path)  # still valid


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not done after {timeout_s} s")
        time.sleep(0.01)
