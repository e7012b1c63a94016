"""A fleet of real processes to break, and the audit that counts what broke.

`ChaosFleet` starts its own redis-server (appendonly, on a fixed port so it can be
restarted in place), the provider simulator, worker processes (several per queue when a
scenario kills some), a SQLite ledger of its own and a short visibility timeout, so a
killed worker's jobs come back within seconds. The test process is the dispatcher.

`audit()` then checks every dispatched job, one by one:

- answered / dead-lettered: the caller's `handle.get()` returned (once) a Result that
  answers the job, or a failure that also sits in the dead-letter store with its reason;
- lost: neither (no final state in the result backend, or a failure never dead-lettered,
  or the caller never got anything);
- duplicated: the job ended more than once (two final-state publications on the result
  backend, a stored result other than the one its caller got, an answer that is also
  dead-lettered);
- unwatched: the job ended, but the final-state listener saw no publication of it (the
  duplicate check above cannot vouch for it). The listener is subscribed (Redis
  confirmed it) before any traffic and again after each Redis restart before any worker
  can reach Redis; one publication can still die with Redis, when it executed in the
  instant Redis went down: counted apart (`unwatched_at_outage`), any other is a problem;
- called twice: every call the simulator received names its job, message, delivery and
  worker process (the workers send `X-Fleet-Job`), and the harness records the
  processes it struck (`Struck`: killed -9 by `kill`, `kill_children`, `kill_pid`; cut
  off by `cut_off`; a Redis restart strikes no worker). A delivery makes at most one
  call, so a message called twice while its workers lived (two calls from processes
  neither killed nor cut, or two from one struck delivery) was run twice: a problem;
- under-billed / over-billed, against the provider's own request log, not the fleet's
  word: for each job and model the calls received must equal the ledger's rows with
  outcome ok, error or orphaned. A call with no row is under-billed (the ledger misses
  a call the provider served); a row with no call is over-billed. A missing row is
  excused only for a call whose process was killed or cut, at most one per such
  delivery, counted apart by kind (`excused`); any other is a problem. Models the
  simulator does not serve (a provider pointed at a closed port, the local MLX ones)
  have no witness and are left out;
- ledger ≠ result: the ledger's rows (orphaned rows aside) are not exactly the attempts of
  the job's final Result (rows from another execution, rows missing or extra, a
  different cost);
- wrong: ended once, but not as the scenario says it must (a fault's documented action).

A scenario also proves that its fault struck (`Tally.hit`: workers killed, messages
redelivered, Redis restarts seen by workers, faults served): a count of 0 is a problem.
Faults strike at random moments (`Strikes`) under steady traffic (`steady`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import yaml

from client import JobHandle, dispatch
from router.catalog import load_catalog
from router.errors import FleetError
from router.results import Result
from tests.fixtures import Flower, Workers, reset_live_state
from workers.ledger.rows import rows_for
from workers.ledger.schema import attempts as attempts_table
from workers.ops.redis_server import RedisServer, free_port
from workers.ops.supervisor import Child
from workers.runtime import orphans
from workers.sim.simulated import write_simulated_catalog
from workers.sim.simulator import Simulator
from workers.state import keys

if TYPE_CHECKING:
    from .recovery import Recovery

ROOT = Path(__file__).resolve().parents[2]
PROVIDER_TIMEOUT_S = 2.0  # the simulated providers' timeout: `timeout`/`stall` wait this
DISPATCHER_VARS = ("FLEET_BROKER_URL", "FLEET_STATE_URL", "FLEET_CATALOG")
FINAL = ("SUCCESS", "FAILURE")
# What Celery's consumer logs when it loses its broker, and when it has it again.
BROKER_LOST = re.compile(r"consumer: Connection to broker lost")
BROKER_CONNECTED = re.compile(r"\] Connected to \S+://")  # (any transport's URL)
BILLED = ("ok", "error", "orphaned")  # ledger outcomes that stand for a call made
# Where a message taken but not acked is kept: kombu's stock channel files it at delivery,
# the fleet's transport at publish (workers/runtime/transport.py), until its ack.
UNACKED_STORES = ("unacked", keys.BROKER_MESSAGES)

# What an attempt looks like in the ledger and in a Result, for comparing the two.
_ROW_FIELDS = (
    "model",
    "queue",
    "outcome",
    "error_kind",
    "prompt_tokens",
    "completion_tokens",
    "worker",
)


def ask(text: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **fields}


def job_id(scenario: str, n: int) -> str:
    return f"{scenario}-{n:04d}-{uuid.uuid4().hex[:8]}"


# --- processes ---------------------------------------------------------------------------


def pool_children(pid: int) -> list[int]:
    """The pool's child processes of a prefork worker whose main process is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


class FinalMonitor:
    """Counts each job's distinct final states published on the result backend (the
    Redis backend PUBLISHes every state it stores): two for one job means it ended twice
    (the same state stored again, a backend retry, is not counted twice), none means the
    listener cannot vouch for it. Reconnects by itself across a Redis restart, to `url`
    as it is then; `subscriptions` counts the confirmations Redis sent (1 + each
    reconnection)."""

    PATTERN = "celery-task-meta-*"

    def __init__(self, url: str) -> None:
        self.url = url
        self.finals: Counter[str] = Counter()
        self.subscriptions = 0
        self._seen: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="final-monitor", daemon=True)

    def start(self, timeout_s: float = 10) -> FinalMonitor:
        """Return once Redis has confirmed the subscription: a listener that is not yet
        subscribed would miss the first jobs' endings, and call them not duplicated."""
        self._thread.start()
        if not self._subscribed.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"no psubscribe confirmation for {self.PATTERN} in {timeout_s} s")
        return self

    def wait_subscribed(self, count: int, timeout_s: float = 10) -> None:
        """Wait until Redis has confirmed `count` subscriptions in all."""
        deadline = time.monotonic() + timeout_s
        while self.subscriptions < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the listener did not subscribe again within {timeout_s} s")
            time.sleep(0.005)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except (redis.RedisError, OSError):
                time.sleep(0.01)  # Redis away: try again soon

    def _listen(self) -> None:
        # (a read timeout too: a Redis that never answers is a lost connection)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        pubsub = client.pubsub()
        try:
            pubsub.psubscribe(self.PATTERN)
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=0.2)
                if message is None:
                    continue
                if message["type"] == "psubscribe":  # Redis' confirmation
                    self.subscriptions += 1
                    self._subscribed.set()
                elif message["type"] == "pmessage":
                    self._count(message["data"])
        finally:
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.close()
                client.close()

    def _count(self, data: bytes) -> None:
        with contextlib.suppress(ValueError, TypeError):
            meta = json.loads(data)
            if meta.get("status") in FINAL:
                state = json.dumps([meta["status"], meta.get("result")], sort_keys=True)
                if (meta["task_id"], state) not in self._seen:
                    self._seen.add((meta["task_id"], state))
                    self.finals[meta["task_id"]] += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def chaos_catalog(
    sim_url: str,
    path: Path,
    *,
    dead_providers: Iterable[str] = (),
    circuit: bool = False,
    max_wait_s: float | None = None,
    timeout_s: float = PROVIDER_TIMEOUT_S,
) -> Path:
    """The default catalog aimed at the simulator, without the providers' rate limits and
    quotas (hundreds of jobs a minute would exhaust them: the limits have their own
    tests), and, unless `circuit`, with circuits that never open (so a fault injected
    into one job does not change how the next one is routed). `dead_providers` point at
    a port nobody listens on: their calls are refused."""
    write_simulated_catalog(sim_url, path.parent / "no-local-model", path, timeout_s)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for provider in data["providers"].values():
        provider.pop("limits", None)
    for model in data["models"]:
        model.pop("limits", None)
    if not circuit:
        data["policy"]["cooldowns"]["circuit_failures"] = 1_000_000
    if max_wait_s is not None:
        data["policy"]["max_wait_s"] = max_wait_s
    closed = free_port()  # bound and released: nobody listens there now
    for name in dead_providers:
        data["providers"][name]["base_url"] = f"http://127.0.0.1:{closed}/v1"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    load_catalog(path)
    return path


def process_started(pid: int) -> float:
    """When process `pid` started, in epoch seconds (/proc: its start in clock ticks after
    boot), or now if it is gone."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, IndexError, ValueError, StopIteration):
        return time.time()
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Struck:
    """A worker process the chaos struck, and the span of its calls that were struck with
    it: `killed` (kill -9: every call it made, from its start to its death) or `cut`
    (cut off from Redis and the provider: the calls that reached the provider from one
    provider timeout before the cut, which may still have been waiting for their answer,
    up to the heal). A process is known by host and pid (workers.state.deliveries
    .this_process() names it `host:pid:tag`), within that span: a pid used again later
    is another process."""

    kind: str  # "killed" | "cut"
    host: str
    pid: int
    since: float  # epoch s
    until: float  # epoch s

    def made(
        self, call: dict[str, Any], marked: Mapping[tuple[int, int], float] | None = None
    ) -> bool:
        """Whether `call` (from the simulator's log) was made by this process in the span.

        `marked`: when each (message, delivery) of the call's job marked its call, from
        the job's orphaned rows. A request written into a cut link reaches the provider
        only when TCP sends it again, after the heal: the provider logs it late. Its
        delivery's mark, made within the span, dates it (a call of that delivery made
        after the heal would be refused its mark: mark.lua)."""
        if process_of(call.get("job_process")) != (self.host, self.pid):
            return False
        if self.since <= float(call["t"]) <= self.until:
            return True
        at = (marked or {}).get((call.get("job_message"), call.get("job_delivery")))  # type: ignore[arg-type]
        late = self.kind == "cut" and float(call["t"]) > self.until
        return late and at is not None and self.since <= at <= self.until


def process_of(process: str | None) -> tuple[str, int] | None:
    """(host, pid) of a worker process name `host:pid:tag`, or None."""
    if not process:
        return None
    host, _, rest = process.partition(":")
    pid = rest.partition(":")[0]
    return (host, int(pid)) if pid.isdigit() else None


def fate_of(
    struck: Iterable[Struck], rows: Iterable[dict[str, Any]] = ()
) -> Callable[[dict[str, Any]], str | None]:
    """The kind of strike ("killed", "cut") that took the process of a call, or None: the
    call was made while its worker lived on. `rows`: the job's ledger rows, whose
    orphaned calls say when each was marked (Struck.made)."""
    found = list(struck)
    marked = {
        orphans.delivery_of(int(row["attempt"])): _stamp(row["started_at"])
        for row in rows
        if row["outcome"] == "orphaned"
    }

    def fate(call: dict[str, Any]) -> str | None:
        return next((s.kind for s in found if s.made(call, marked)), None)

    return fate


class ChaosFleet:
    """One scenario's fleet. Use as a context manager; the test process dispatches."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        visibility_s: float | None = 10.0,
        latency_ms: float = 40.0,
        cost_usd: float = 0.001,
        api_keys: dict[str, str] | None = None,
        dead_providers: Iterable[str] = (),
        circuit: bool = False,
        max_wait_s: float | None = None,
        host: str = "127.0.0.1",
        provider_timeout_s: float = PROVIDER_TIMEOUT_S,
        broker_url: str | None = None,
    ) -> None:
        """`host`: the address Redis and the simulator serve on for the fleet (and on
        loopback): another network namespace reaches them there (tests/chaos/netns.py).
        `visibility_s` None: the fleet's default visibility timeout, as `fleet up` runs
        it (FLEET_VISIBILITY_TIMEOUT_S unset). `broker_url`: another broker (RabbitMQ);
        the fleet's Redis then holds results and fleet state only (FLEET_STATE_URL)."""
        from workers.runtime.celery_app import DEFAULT_VISIBILITY_TIMEOUT_S

        self.name = name
        self.host = host
        self.max_wait_s = max_wait_s
        self.workdir = Path(workdir)
        self.visibility_set = visibility_s is not None
        self.visibility_s = float(visibility_s or DEFAULT_VISIBILITY_TIMEOUT_S)
        self.provider_timeout_s = provider_timeout_s
        self.broker_url = broker_url
        # the worker processes the chaos killed or cut off, for the audit (Struck)
        self.struck: list[Struck] = []
        self.latency_ms = latency_ms
        self.cost_usd = cost_usd
        self.api_keys = api_keys
        self.dead_providers = tuple(dead_providers)
        self.circuit = circuit
        self.workers: list[Child] = []
        self._processes: Workers | None = None  # the workers' Supervisor
        self._flowers: list[Flower] = []
        self.redis: RedisServer | None = None
        self.sim: Simulator | None = None
        self.monitor: FinalMonitor | None = None
        self.env: dict[str, str] = {}
        self.dispatch_retries = 0
        self.get_retries = 0
        self.redis_down_at: list[float] = []  # epoch s of each stop_redis()/kill_redis()
        self._saved: dict[str, str | None] = {}
        self._client: redis.Redis | None = None

    # --- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> ChaosFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.redis = RedisServer(
            self.workdir / "redis", port=free_port(), appendonly=True, host=self.host
        )
        self.redis.start()
        self.sim = Simulator(host=self.host).start()
        self.sim.configure(default={"latency_ms": self.latency_ms, "cost": self.cost_usd})
        catalog = chaos_catalog(
            self.sim.url,
            self.workdir / "catalog.yaml",
            dead_providers=self.dead_providers,
            circuit=self.circuit,
            max_wait_s=self.max_wait_s,
            timeout_s=self.provider_timeout_s,
        )
        self.catalog = load_catalog(catalog)
        self.ledger_url = f"sqlite:///{self.workdir / 'ledger.db'}"
        unset = ("FLEET_STATE_URL", "FLEET_VISIBILITY_TIMEOUT_S")
        env = {k: v for k, v in os.environ.items() if k not in unset}
        env.update(
            {
                "FLEET_BROKER_URL": self.broker_url or self.redis.url,
                "FLEET_CATALOG": str(catalog),
                "FLEET_LEDGER_URL": self.ledger_url,
                "FLEET_DATA_DIR": str(self.workdir / "data"),
                "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(ROOT),
            }
        )
        if self.broker_url:
            env["FLEET_STATE_URL"] = self.redis.url
        if self.visibility_set:
            env["FLEET_VISIBILITY_TIMEOUT_S"] = str(int(self.visibility_s))
        keys_ = self.api_keys or {
            p.api_key_env: "sim-placeholder-key"
            for p in self.catalog.providers.values()
            if p.api_key_env
        }
        env.update(keys_)
        self.env = env
        self._processes = Workers(env, self.workdir / "logs")
        # The test process dispatches to this fleet.
        self._saved = {k: os.environ.get(k) for k in DISPATCHER_VARS}
        os.environ.pop("FLEET_STATE_URL", None)
        os.environ["FLEET_BROKER_URL"] = env["FLEET_BROKER_URL"]
        if self.broker_url:
            os.environ["FLEET_STATE_URL"] = self.redis.url
        os.environ["FLEET_CATALOG"] = str(catalog)
        self._client = redis.Redis.from_url(self.redis.url, socket_connect_timeout=2)
        self.monitor = FinalMonitor(self.redis.url).start()

    def stop(self) -> None:
        self._forget_results()
        if self._processes is not None:
            self._processes.stop(20)
        for flower in self._flowers:
            flower.stop()
        if self.monitor is not None:
            self.monitor.stop()
        if self._client is not None:
            self._client.close()
        if self.sim is not None:
            self.sim.stop()
        if self.redis is not None:
            self.redis.stop()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved = {}

    def _forget_results(self) -> None:
        """Stop following this fleet's jobs before its Redis goes: a result handle
        collected later would otherwise try (for seconds) to unsubscribe from it."""
        if self.redis is None:
            return
        with contextlib.suppress(Exception):
            from workers.runtime.celery_app import get_app

            app = get_app()  # the dispatcher's (this fleet's settings are still set)
            app.backend.result_consumer.subscribed_to.clear()

    @property
    def client(self) -> redis.Redis:
        assert self._client is not None
        return self._client

    # --- workers ---------------------------------------------------------------------

    @property
    def processes(self) -> Workers:
        assert self._processes is not None, "the fleet is not started"
        return self._processes

    def start_worker(self, queue: str, *, pool: str = "threads", concurrency: int = 8) -> Child:
        index = sum(1 for w in self.workers if w.name.startswith(f"chaos-{queue}-"))
        name = f"chaos-{queue}-{index}"
        worker = self.processes.start(queue, name=name, pool=pool, concurrency=concurrency)
        self.workers.append(worker)
        return worker

    def wait_ready(self, workers: Iterable[Child] | None = None, timeout_s: float = 60) -> None:
        self.processes.wait_ready(timeout_s, workers)

    def kill(self, worker: Child) -> None:
        """kill -9 the worker's main process (with a threads pool: every job it holds)."""
        pid, since = worker.pid, process_started(worker.pid)
        self.processes.kill(worker)
        self.struck.append(Struck("killed", socket.gethostname(), pid, since, time.time()))

    def kill_children(self, worker: Child) -> int:
        """kill -9 the pool processes of a prefork worker (its parent stays)."""
        children = pool_children(worker.pid)
        for pid in children:
            self.kill_pid(pid)
        return len(children)

    def kill_pid(self, pid: int) -> None:
        """kill -9 one worker process (a pool child), recorded for the audit."""
        since = process_started(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.struck.append(Struck("killed", socket.gethostname(), pid, since, time.time()))

    @contextlib.contextmanager
    def cut_off(
        self, worker: Child, cut: Callable[[], None], heal: Callable[[], None]
    ) -> Iterator[None]:
        """`cut()` the worker's link for the block, then `heal()` it; recorded for the
        audit: the calls it made from one provider timeout before the cut to the heal
        (a delivery in progress when the link went) died with the cut (Struck)."""
        since = time.time() - self.provider_timeout_s - 1.0
        cut()
        try:
            yield
        finally:
            heal()
            host = socket.gethostname()
            self.struck.append(Struck("cut", host, worker.pid, since, time.time()))

    def restart(self, worker: Child, wait: bool = True) -> None:
        self.processes.restart(worker, wait)

    def worker_logs(self) -> dict[str, str]:
        return {w.name: w.log() for w in self.workers}

    def check_workers(self, tally: Tally) -> None:
        """Every worker still running (a killed one was restarted): none died by itself."""
        for worker in self.workers:
            if not worker.alive():
                tally.problems.append(f"worker {worker.name} is not running")
            if "Unrecoverable error" in worker.log():
                tally.problems.append(f"worker {worker.name} hit an unrecoverable error")

    # --- Redis -------------------------------------------------------------------------

    def stop_redis(self) -> None:
        """A clean stop (SIGTERM): Redis flushes its append-only file and exits."""
        assert self.redis is not None
        self.redis_down_at.append(time.time())
        self.redis.stop()

    def kill_redis(self) -> None:
        """kill -9 redis-server: no shutdown, no last flush; what a crash leaves."""
        assert self.redis is not None and self.redis.process is not None
        process = self.redis.process
        self.redis_down_at.append(time.time())
        process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()
        self.redis.process = None

    def start_redis(self) -> None:
        """Start Redis again on its port, from what its append-only file holds. It comes
        up first on a side port, where only the final-state listener goes: once that has
        subscribed again, Redis moves to the fleet's port (CONFIG SET port keeps the
        listener's connection). So no final state can be published while the listener
        is away, and the duplicate check has no blind spot after a restart."""
        assert self.redis is not None and self.monitor is not None
        side = RedisServer(self.redis.data_dir, port=free_port(), appendonly=True, host=self.host)
        confirmed = self.monitor.subscriptions
        self.monitor.url = side.url
        side.start()
        self.monitor.wait_subscribed(confirmed + 1)
        with redis.Redis.from_url(side.url) as admin:
            admin.config_set("port", self.redis.port)
        self.redis.process = side.process  # the fleet's Redis now
        self.monitor.url = self.redis.url

    def broker_losses(self) -> dict[str, int]:
        """How many times each worker lost its broker connection, from its own log."""
        return {w.name: len(BROKER_LOST.findall(w.log())) for w in self.workers}

    def broker_connections(self) -> dict[str, int]:
        """How many times each worker connected to its broker, from its own log."""
        return {w.name: len(BROKER_CONNECTED.findall(w.log())) for w in self.workers}

    def wait_reconnected(self, before: dict[str, int], timeout_s: float = 20) -> list[str]:
        """Wait until every worker has connected again since `before` (a
        broker_connections()); the names of those that did not in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = self.broker_connections()
            late = [name for name, count in before.items() if now.get(name, 0) <= count]
            if not late or time.monotonic() > deadline:
                return late
            time.sleep(0.1)

    def wait_quiet(self, timeout_s: float) -> bool:
        """Wait until Redis holds no message: none queued, none unacked. A message left
        by a killed worker (or whose ack was lost with Redis) comes back only after the
        visibility timeout, and its redelivery may still have work to do (a stale copy
        writes what its worker had not), so the audit waits for it."""
        deadline = time.monotonic() + timeout_s
        while True:
            unacked = sum(self.client.hlen(store) for store in UNACKED_STORES)
            if not unacked and not sum(self.queue_lengths().values()):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def reset_live_state(self) -> None:
        """Forget cooldowns, circuits and windows (between fault groups)."""
        reset_live_state(self.client)

    def queue_lengths(self) -> dict[str, int]:
        """Messages waiting in each queue list (every priority sub-list included)."""
        from router.catalog import QUEUES

        found = dict.fromkeys(QUEUES, 0)
        for key in self.client.scan_iter("*"):
            name = key.decode(errors="replace")
            base = name.split("\x06\x16", 1)[0]
            if base in found and self.client.type(key) == b"list":
                found[base] += int(self.client.llen(key))
        return found

    # --- the provider's witness ---------------------------------------------------------

    def provider_calls(self) -> list[dict[str, Any]]:
        """Every completion request the simulator received, with the job it named."""
        assert self.sim is not None
        return self.sim.requests()

    def simulated_models(self) -> dict[str, str]:
        """Catalog model id -> the name the simulator logs it under, for every model the
        simulator serves (not a provider pointed elsewhere, not a local MLX model)."""
        assert self.sim is not None
        url = self.sim.url.rstrip("/")
        return {
            m.id: m.upstream
            for m in self.catalog.models
            if (self.catalog.providers[m.provider].resolved_base_url(self.env) or "").rstrip("/")
            == url
        }

    # --- dispatching and collecting ---------------------------------------------------

    def submit(
        self,
        job: dict[str, Any],
        expect: Callable[[Result, dict[str, Any] | None], str | None] | None = None,
        *,
        retry_for_s: float = 60.0,
    ) -> JobRecord:
        """dispatch(), retried as an app would (same job id) while the broker is away."""
        deadline = time.monotonic() + retry_for_s
        while True:
            try:
                handle = dispatch(job)
                break
            except FleetError:
                raise  # refused at the door: not an outage
            except Exception:
                if time.monotonic() > deadline:
                    raise
                self.dispatch_retries += 1
                time.sleep(0.2)
        return JobRecord(job, handle, expect)

    def collect(self, records: list[JobRecord], timeout_s: float = 90.0) -> None:
        """Each caller's handle.get(), once, retried on connection errors as an app would."""
        deadline = time.monotonic() + timeout_s
        for record in records:
            while record.got is None and record.error is None:
                left = max(0.1, deadline - time.monotonic())  # past it: just look
                try:
                    record.got = record.handle.get(timeout=left, propagate=False)
                    record.gets += 1
                except TimeoutError:
                    record.error = "no result before the deadline"
                except Exception as exc:  # the backend went away: ask again
                    if time.monotonic() > deadline:
                        record.error = f"{type(exc).__name__}: {exc}"
                        break
                    self.get_retries += 1
                    record.last_get_error = f"{type(exc).__name__}: {exc}"
                    time.sleep(0.2)

    # --- Flower ---------------------------------------------------------------------------

    def start_flower(self) -> Flower:
        """Flower for this fleet, as tests/test_flower.py starts it (tests/fixtures.py)."""
        flower = Flower({**self.env, "FLOWER_UNAUTHENTICATED_API": "true"}, self.workdir / "logs")
        self._flowers.append(flower)
        return flower


# --- traffic and strikes -----------------------------------------------------------------


def chaos_rng(seed: int | None = None) -> tuple[random.Random, int]:
    """A random source for a scenario's strikes, and its seed (CHAOS_SEED, or fresh):
    printed in the scenario's notes, it replays the same moments and choices."""
    if seed is None:
        seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    return random.Random(seed), seed


def steady(
    fleet: ChaosFleet,
    make: Callable[[int], tuple[dict[str, Any], Any]],
    count: int,
    rate_per_s: float,
) -> list[JobRecord]:
    """Dispatch `count` jobs, `make(n)` -> (job, expect), at a steady `rate_per_s`, as an
    app does. A dispatch that waits for the broker (retried through an outage) delays
    the next ones; they are not then sent in a burst to catch up."""
    records = []
    due = time.monotonic()
    for n in range(count):
        time.sleep(max(0.0, due - time.monotonic()))
        job, expect = make(n)
        records.append(fleet.submit(job, expect))
        due = max(due + 1 / rate_per_s, time.monotonic())
    return records


class Strikes:
    """A thread that runs `strikes` one after another at random moments of the window
    [start_s, end_s] (seconds after the thread starts): drawn uniformly, then spread to
    be at least `gap_s` apart (a restarted worker or Redis comes back in between). Used
    around `steady()` traffic, a strike meets whatever the fleet happens to be doing.
    `log` says what each strike did and when."""

    def __init__(
        self,
        rng: random.Random,
        strikes: list[Callable[[], str]],
        window: tuple[float, float],
        gap_s: float = 0.0,
    ) -> None:
        start, end = window
        room = end - start - gap_s * (len(strikes) - 1)
        if room < 0:  # they would run past the window, after the traffic
            raise ValueError(f"{len(strikes)} strikes {gap_s} s apart do not fit in {window}")
        draws = sorted(rng.uniform(0, room) for _ in strikes)
        self.at = [start + d + i * gap_s for i, d in enumerate(draws)]
        self.strikes = strikes
        self.log: list[str] = []
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="strikes", daemon=True)

    def __enter__(self) -> Strikes:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()
        if self.failure is not None:
            raise RuntimeError(f"a strike failed: {self.failure!r}") from self.failure

    def _run(self) -> None:
        try:
            for at, strike in zip(self.at, self.strikes, strict=True):
                time.sleep(max(0.0, self._started + at - time.monotonic()))
                done = strike()
                self.log.append(f"{time.monotonic() - self._started:.2f} s {done}")
        except BaseException as exc:  # reported by __exit__, never lost in the thread
            self.failure = exc


# --- the audit ---------------------------------------------------------------------------


@dataclass
class JobRecord:
    """One caller's dispatch: what it sent, its handle, what its get() returned."""

    job: dict[str, Any]
    handle: JobHandle
    expect: Callable[[Result, dict[str, Any] | None], str | None] | None = None
    got: Result | None = None
    gets: int = 0
    error: str | None = None
    last_get_error: str | None = None

    @property
    def id(self) -> str:
        return self.handle.id


EXCUSED = "excused: "  # the note that lists the excused calls by kind


@dataclass
class Tally:
    """A scenario's counts.

    Jobs: answered, dead_lettered, lost, duplicated, unwatched (unwatched_at_outage of
    them stored as Redis went down), ledger_vs_result, wrong, called_twice (a message
    called more than once while its workers lived), and the jobs whose billing nothing
    explains: under_billed (a provider call with no ledger row, its process neither
    killed nor cut) and over_billed (a ledger row with no call, not an orphan).
    Calls and rows, from the provider's log against the ledger: provider_calls received
    for the audited jobs; unbilled_calls with no ledger row (excused_unbilled of them
    made by deliveries a strike took, one each: `excused` counts them by kind, killed
    or cut); uncalled_rows with no call (uncalled_orphans of them orphaned rows).
    `hits`: what the fault struck. `recovery`: a recovery scenario's figures
    (recovery.py)."""

    scenario: str
    jobs: int = 0
    answered: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicated: int = 0
    unwatched: int = 0
    unwatched_at_outage: int = 0
    under_billed: int = 0
    over_billed: int = 0
    ledger_vs_result: int = 0
    wrong: int = 0
    called_twice: int = 0
    provider_calls: int = 0
    unbilled_calls: int = 0
    excused_unbilled: int = 0
    excused: Counter[str] = field(default_factory=Counter)
    uncalled_rows: int = 0
    uncalled_orphans: int = 0
    seconds: float = 0.0
    hits: dict[str, int] = field(default_factory=dict)
    # a baseline run (kombu's stock broker channel): its losses are the measure, reported
    # beside the fleet's, not a failure of the run
    reference: bool = False
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    recovery: Recovery | None = None  # a recovery scenario's figures, for the report

    @property
    def double_billed(self) -> int:
        """Jobs billed for calls the provider never received, orphans aside (was: the
        ledger against the fleet's own Result, now `ledger_vs_result`)."""
        return self.over_billed

    @property
    def clean(self) -> bool:
        """Nothing wrong, the known gaps included: a call the ledger misses, a row for a
        call never made, an ending nobody saw published, whatever explains them."""
        counts = (
            self.lost,
            self.duplicated,
            self.unwatched,
            self.under_billed,
            self.over_billed,
            self.ledger_vs_result,
            self.wrong,
            self.called_twice,
            self.unbilled_calls,
            self.uncalled_rows,
        )
        return not self.problems and not any(counts)

    def excuses(self) -> str:
        """The calls with no ledger row excused, by kind: "excused: killed 7, cut 3"."""
        return EXCUSED + ", ".join(f"{kind} {n}" for kind, n in sorted(self.excused.items()))

    def problem(self, kind: str, job: str, why: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.problems.append(f"{kind}: {job}: {why}")

    def hit(self, what: str, count: int) -> None:
        """Evidence that the scenario's fault struck something: 0 is a problem (a fault
        that met nothing proves nothing)."""
        self.hits[what] = self.hits.get(what, 0) + count
        if count <= 0:
            self.problems.append(f"missed: {what} = 0: the fault struck nothing")


def backend_meta(client: redis.Redis, job: str) -> dict[str, Any] | None:
    raw = client.get(f"celery-task-meta-{job}")
    return json.loads(raw) if raw else None


def final_result(meta: dict[str, Any] | None) -> Result | None:
    """The Result a final state in the backend holds (a JobFailed carries it)."""
    if not meta or meta.get("status") not in FINAL:
        return None
    if meta["status"] == "SUCCESS":
        return Result.model_validate(meta["result"])
    exc = meta.get("result") or {}
    args = exc.get("exc_message") or []
    if exc.get("exc_type") == "JobFailed" and len(args) == 2 and args[1]:
        return Result.model_validate(args[1])
    return None


def ledger_rows(url: str) -> dict[str, list[dict[str, Any]]]:
    from sqlalchemy import create_engine, select

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(attempts_table))]
    except Exception:  # no job ever finished: no table yet
        rows = []
    finally:
        engine.dispose()
    by_job: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_job.setdefault(row["job_id"], []).append(row)
    return by_job


def _stamp(value: Any) -> float:
    """Epoch seconds of a datetime or ISO string, naive ones read as UTC."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def billing_mismatch(rows: list[dict[str, Any]], expected: list[dict[str, Any]]) -> str | None:
    """Why the ledger's rows are not exactly the final Result's attempts (or None).
    Orphaned rows (calls in flight when a worker died) are in no Result: left out."""
    rows = [r for r in rows if r["outcome"] != "orphaned"]
    have = {r["attempt"]: r for r in rows}
    want = {r["attempt"]: r for r in expected}
    if sorted(have) != sorted(want):
        return f"ledger attempts {sorted(have)} != result attempts {sorted(want)}"
    for number, row in want.items():
        got = have[number]
        for name in _ROW_FIELDS:
            if got[name] != row[name]:
                return f"attempt {number}: ledger {name}={got[name]!r}, result {row[name]!r}"
        if abs(_stamp(got["started_at"]) - _stamp(row["started_at"])) > 0.002:
            return f"attempt {number}: ledger row from another execution (started_at differs)"
    cost_have = sum(r["cost_usd"] for r in rows)
    cost_want = sum(r["cost_usd"] for r in expected)
    if abs(cost_have - cost_want) > 1e-9:
        return f"ledger cost {cost_have} != result cost {cost_want}"
    return None


def audit(
    fleet: ChaosFleet, records: list[JobRecord], tally: Tally, quiet_s: float | None = None
) -> Tally:
    """Check every job of `records`, one by one, and count what went wrong. First wait up
    to `quiet_s` (3 visibility timeouts unless given) for Redis to hold no message."""
    from workers.ledger.store import Ledger

    if not fleet.wait_quiet(3 * fleet.visibility_s if quiet_s is None else quiet_s):
        tally.problems.append("messages still queued or unacked long after the run")
    time.sleep(0.5)  # let late duplicates (if any) publish before counting
    ledger = Ledger(
        fleet.ledger_url,
        redis_url=fleet.redis.url if fleet.redis else None,
        spool_dir=fleet.workdir / "data",
    )
    try:
        drained = ledger.drain()  # what the fleet's ledger writer would write: every row
    finally:
        ledger.close()
    if drained:
        tally.notes.append(f"the audit wrote {drained} ledger rows from the spool")
    rows = ledger_rows(fleet.ledger_url)
    calls = _calls_by_job(fleet, tally)
    served = fleet.simulated_models()
    finals = fleet.monitor.finals if fleet.monitor else Counter()
    tally.jobs += len(records)
    by_id: dict[str, list[JobRecord]] = {}
    for record in records:
        by_id.setdefault(record.id, []).append(record)
    for jid, callers in by_id.items():
        fate = fate_of(fleet.struck, rows.get(jid, []))
        meta = backend_meta(fleet.client, jid)
        final = final_result(meta)
        raw_dead = fleet.client.hget(keys.DEAD_LETTER, jid)
        dead = json.loads(raw_dead) if raw_dead else None
        _audit_job(tally, jid, callers, meta, final, dead, finals[jid], rows.get(jid, []), fleet)
        _audit_billing(tally, jid, calls.get(jid, []), rows.get(jid, []), served, fate)
    # (a scenario may audit twice, into one tally: one line, with the counts so far)
    tally.notes = [n for n in tally.notes if not n.startswith(EXCUSED)]
    if tally.excused:
        tally.notes.append(tally.excuses())
    return tally


def _calls_by_job(fleet: ChaosFleet, tally: Tally) -> dict[str, list[dict[str, Any]]]:
    """The simulator's request log by the job each call named. A call naming no job
    would escape the billing check: it is a problem."""
    by_job: dict[str, list[dict[str, Any]]] = {}
    anonymous = 0
    for call in fleet.provider_calls():
        if call.get("job"):
            by_job.setdefault(call["job"], []).append(call)
        else:
            anonymous += 1
    why = f"untagged: {anonymous} provider calls named no job (no X-Fleet-Job header)"
    if anonymous and why not in tally.problems:
        tally.problems.append(why)
    return by_job


@dataclass
class Billing:
    """One job's provider calls against its ledger rows, by model (the simulator's name)."""

    unbilled: Counter[str]  # calls the provider received with no ledger row
    excused: Counter[str]  # of those, by kind: made by a delivery a strike took (killed, cut)
    uncalled: Counter[str]  # ledger rows for calls the provider never received
    orphans: int  # of those, orphaned rows: their worker died before the call left
    twice: int  # calls beyond one per message made while their workers lived

    def unexplained(self) -> int:
        return sum(self.unbilled.values()) - sum(self.excused.values())

    def overbilled(self) -> int:
        return sum(self.uncalled.values()) - self.orphans


def billing(
    calls: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    served: dict[str, str],
    fate: Callable[[dict[str, Any]], str | None],
) -> Billing:
    """Hold a job's calls, from the provider's log, against its ledger rows (outcome ok,
    error or orphaned; rows of models the simulator does not serve have no witness).

    `fate(call)`: the strike ("killed", "cut") that took the process which made the call,
    or None. A delivery makes at most one call (workers/runtime/step.py), and only a
    delivery that dies leaves its message to be delivered again: so a message has at
    most one call made while its worker lived, and at most one per delivery a strike
    took; any call beyond is `twice`. A missing row is excused only for a call a strike
    took, at most one per such delivery (job message, delivery, process). A row with no
    call is explained when it is an orphan (its worker died after marking the call, in
    the instant before its first byte left: the fleet bills such a call on estimate, not
    knowing)."""
    mine = [r for r in rows if r["outcome"] in BILLED and r["model"] in served]
    billed = Counter(served[r["model"]] for r in mine)
    orphaned = Counter(served[r["model"]] for r in mine if r["outcome"] == "orphaned")
    received = Counter(c["model"] for c in calls)
    unbilled, uncalled = received - billed, billed - received
    # the deliveries strikes took, once each, with their kind and model
    taken: dict[tuple[Any, ...], tuple[str, str]] = {}
    twice = 0
    live: Counter[Any] = Counter()
    for call in sorted(calls, key=lambda c: float(c.get("t") or 0)):
        kind = fate(call)
        if kind is None:
            live[call.get("job_message")] += 1
            continue
        delivery = (call.get("job_message"), call.get("job_delivery"), call.get("job_process"))
        if delivery in taken:
            twice += 1
        else:
            taken[delivery] = (kind, call["model"])
    twice += sum(n - 1 for n in live.values() if n > 1)
    excused: Counter[str] = Counter()
    for model, missing in unbilled.items():
        kinds = [kind for kind, on in taken.values() if on == model][:missing]
        excused.update(kinds)
    orphans = sum(min(extra, orphaned[model]) for model, extra in uncalled.items())
    return Billing(unbilled, excused, uncalled, orphans, twice)


def _audit_billing(
    tally: Tally,
    jid: str,
    calls: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    served: dict[str, str],
    fate: Callable[[dict[str, Any]], str | None],
) -> None:
    """Count the job's calls and rows; a discrepancy nothing explains is a problem."""
    found = billing(calls, rows, served, fate)
    tally.provider_calls += len(calls)
    tally.unbilled_calls += sum(found.unbilled.values())
    tally.excused_unbilled += sum(found.excused.values())
    tally.excused.update(found.excused)
    tally.uncalled_rows += sum(found.uncalled.values())
    tally.uncalled_orphans += found.orphans
    if found.twice:
        per = Counter(c.get("job_message") for c in calls)
        tally.problem(
            "called_twice",
            jid,
            f"{found.twice} provider calls beyond one per message made while their worker"
            f" lived (calls per message {dict(per)}; killed or cut processes aside)",
        )
    if found.unexplained():
        why = f"{found.unexplained()} provider calls with no ledger row, their worker alive"
        tally.problem("under_billed", jid, f"{why} (missing: {dict(found.unbilled)})")
    if found.overbilled():
        why = f"{found.overbilled()} ledger rows with no provider call, not orphans"
        tally.problem("over_billed", jid, f"{why} (rows without a call: {dict(found.uncalled)})")


def _audit_job(
    tally: Tally,
    jid: str,
    callers: list[JobRecord],
    meta: dict[str, Any] | None,
    final: Result | None,
    dead: dict[str, Any] | None,
    publications: int,
    rows: list[dict[str, Any]],
    fleet: ChaosFleet,
) -> None:
    kind, why = _ending(callers, meta, final, dead, publications)
    if final is not None and not kind:  # ended once: its ledger rows are its attempts?
        why = billing_mismatch(rows, rows_for(final, callers[0].job, fleet.catalog))
        kind = "ledger_vs_result" if why else ""
    if final is not None and not kind:  # as the scenario says it must?
        why = next((w for c in callers if c.expect and (w := c.expect(final, dead))), None)
        kind = "wrong" if why else ""
    if kind == "lost":  # where its traces end says where it was lost
        why = f"{why}; {trail(fleet, jid, meta)}"
    if final is not None and publications == 0:  # the duplicate check could not fail
        _unwatched(tally, jid, meta, fleet)
    if kind:
        tally.problem(kind, jid, why or "")
    elif final is not None and final.ok:
        tally.answered += len(callers)
    else:
        tally.dead_lettered += len(callers)


# A final state stored this close before Redis went down may have been published to
# nobody: Redis had not yet written the message to the listener when it died (or shut
# down), and the store's retry, finding the job final, publishes nothing.
DIED_WITH_REDIS_S = (0.5, 0.05)  # before, after the moment it went down


def _unwatched(tally: Tally, jid: str, meta: dict[str, Any] | None, fleet: ChaosFleet) -> None:
    """A job that ended with no final-state publication seen: the listener cannot vouch
    that it ended only once. Counted; a problem unless its final state was stored in the
    instant Redis went down (`unwatched_at_outage`)."""
    tally.unwatched += 1
    done = (meta or {}).get("date_done")
    when = _stamp(done) if done else None
    before, after = DIED_WITH_REDIS_S
    if when is not None and any(
        down - before <= when <= down + after for down in fleet.redis_down_at
    ):
        tally.unwatched_at_outage += 1
        return
    tally.problems.append(
        f"unwatched: {jid}: ended (at {done}) with no final-state publication seen"
    )


def trail(fleet: ChaosFleet, jid: str, meta: dict[str, Any] | None) -> str:
    """A lost job's traces: its state in the backend, each message's deliveries (the
    fleet's counters), the calls the provider received for it, and whether a message of
    it still waits in Redis. No delivery and no call: the message vanished between
    Redis and a worker."""
    prefix = keys.deliveries(jid, 0).rsplit(":", 1)[0]
    counts = {
        key.decode().rsplit(":", 1)[1]: int(fleet.client.hget(key, "n") or 0)
        for key in fleet.client.scan_iter(f"{prefix}:*")
    }
    calls = [
        (c["job_message"], c["job_delivery"], c["fault"])
        for c in fleet.provider_calls()
        if c.get("job") == jid
    ]
    waiting = any(
        jid.encode() in raw for store in UNACKED_STORES for raw in fleet.client.hvals(store)
    )
    result = (meta or {}).get("result")
    state = meta and (meta.get("status"), isinstance(result, dict) and result.get("exc_type"))
    found = (
        f"backend {state}, deliveries per message {counts}, provider calls (message,"
        f" delivery, fault) {calls}, {'still unacked' if waiting else 'not unacked'}"
    )
    if not (meta or counts or calls or waiting):
        found += ": it vanished between Redis and a worker (popped, never filed as unacked)"
    return found


def _ending(
    callers: list[JobRecord],
    meta: dict[str, Any] | None,
    final: Result | None,
    dead: dict[str, Any] | None,
    publications: int,
) -> tuple[str, str | None]:
    """("lost" | "duplicated" | "", why): did the job end, and only once?"""
    for caller in callers:  # every caller got one answer
        if caller.got is None or caller.gets != 1:
            return "lost", caller.error or caller.last_get_error or "no answer"
    if final is None:
        return "lost", f"no final state in the backend (meta {meta and meta.get('status')})"
    if publications > 1:
        return "duplicated", f"{publications} different final states published"
    if any(c.got != final for c in callers):
        return "duplicated", "the stored result is not the one its caller got"
    if final.ok and dead is not None:
        return "duplicated", "answered and dead-lettered"
    if not final.ok and dead is None:
        return "lost", "failed but not dead-lettered"
    if dead is not None and (Result.model_validate(dead["result"]) != final or not final.error):
        return "duplicated", "the dead letter is not the final result (or has no reason)"
    return "", None


@contextlib.contextmanager
def timed(tally: Tally) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        tally.seconds = time.monotonic() - started
