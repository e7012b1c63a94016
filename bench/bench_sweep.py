"""The broker's recovery work against a backlog, and Redis memory per waiting message.

A backlog of N job messages waits in `free` (no worker consumes it) longer than the
visibility timeout; one idle fleet worker on another queue (`subscription`) runs the
transport's recovery: its beat (workers/runtime/liveness.py; before it, a visibility
sweep that ran an LPOS per filed message, whichever queue it waited in). For
`observe_s` this measures what that costs every other client of
Redis: its longest commands (SLOWLOG, those over 100 µs) and the round trip of a PING
every 10 ms from a probe client (as `redis-cli --latency` takes it).

Black-box: the jobs are published through the fleet's own producer (`dispatch_many`),
the worker is a real `celery worker`, and only Redis is observed, so the measure runs
unchanged on any version of workers/runtime/transport.py.

Memory: INFO's used_memory before and after publishing the N messages, divided by N, on
the fleet's transport and on kombu's stock channel (FLEET_BROKER_TRANSPORT=kombu), each
on a redis-server of its own, the same jobs, published in turns batch by batch."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from typing import Any

from bench.common import Load, Stack, cpu_s, median, percentile

VISIBILITY_TIMEOUT_S = 5  # every message of the backlog is older than this when observed
SLOWLOG_US = 100  # log every command of 100 µs or more (0 would log every PING)
SLOWLOG_LEN = 100_000  # room for every such command of the window
PROBE_EVERY_S = 0.010  # redis-cli --latency's sample rate
BATCH = 1000  # jobs per dispatch_many: one MULTI/EXEC each
IDLE_QUEUE = "subscription"  # the idle worker's queue; the backlog waits in `free`
SCRIPT_CLIENT = b"?:0"  # the slowlog's client address of a command run by a Lua script


class PingProbe(threading.Thread):
    """PING, wait for +PONG, sleep 10 ms, again: each round trip's milliseconds. A raw
    socket, so the figure is Redis' answer time plus loopback, not a client library's.
    A script past lua-time-limit makes Redis answer -BUSY: that is no answer, so the
    PING is sent again until a +PONG comes, and the round trip runs to it."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(name="ping-probe", daemon=True)
        self.sock = socket.create_connection((host, port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.samples_ms: list[float] = []
        self.refused = 0  # replies other than +PONG (-BUSY)
        self.halt = threading.Event()

    def _ping(self) -> bool:
        self.sock.sendall(b"PING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = self.sock.recv(256)
            if not chunk:
                raise ConnectionError("redis closed the probe's connection")
            reply += chunk
        return reply.startswith(b"+PONG")

    def run(self) -> None:
        while not self.halt.is_set():
            start = time.perf_counter()
            while not self._ping():
                self.refused += 1
                time.sleep(0.001)  # Redis is busy: no tight loop on the shared cores
            self.samples_ms.append((time.perf_counter() - start) * 1000)
            self.halt.wait(PROBE_EVERY_S)

    def stop(self) -> list[float]:
        self.halt.set()
        self.join(30)
        self.sock.close()
        return self.samples_ms


def _script_names() -> dict[str, str]:
    """SHA1 -> the fleet's Lua script name, to name EVALSHA entries of the slowlog (only a
    label: an unknown SHA is shown as it is)."""
    from workers.state.connections import SCRIPTS, source

    return {
        hashlib.sha1(source(path.stem).encode()).hexdigest(): path.stem
        for path in sorted(SCRIPTS.glob("*.lua"))
    }


def _label(command: bytes, names: dict[str, str]) -> str:
    words = command.split()
    name = words[0].decode(errors="replace").upper() if words else "?"
    if name in ("EVALSHA", "EVALSHA_RO", "FCALL", "FCALL_RO") and len(words) > 1:
        target = words[1].decode(errors="replace")
        return f"{name} {names.get(target.lower(), target[:12])}"
    return name


def _by_command(entries: list[dict[str, Any]], names: dict[str, str]) -> dict[str, Any]:
    out: dict[str, dict[str, float]] = {}
    for entry in entries:
        slot = out.setdefault(
            _label(entry["command"], names), {"count": 0, "total_ms": 0.0, "max_ms": 0.0}
        )
        ms = entry["duration"] / 1000
        slot["count"] += 1
        slot["total_ms"] += ms
        slot["max_ms"] = max(slot["max_ms"], ms)
    return out


def _slowlog_summary(entries: list[dict[str, Any]], window_s: float) -> dict[str, Any]:
    """The window's slowlog. Redis 7 also logs each command a Lua script runs, from the
    script's own client (address "?:0"), inside the script's entry: those are counted
    apart, not again in the time Redis was busy."""
    names = _script_names()
    inside = [e for e in entries if e.get("client_address") == SCRIPT_CLIENT]
    # the bench's own SLOWLOG RESET is logged too (into the log it emptied): not the fleet's
    top = [
        e
        for e in entries
        if e.get("client_address") != SCRIPT_CLIENT and not e["command"].startswith(b"SLOWLOG")
    ]
    durations_ms = [e["duration"] / 1000 for e in top]
    longest = sorted(top, key=lambda e: -int(e["duration"]))[:10]
    return {
        "logged": len(entries),  # commands of SLOWLOG_US or more, scripts' own included
        "truncated": len(entries) >= SLOWLOG_LEN,  # the slowlog was full: some are missing
        "max_ms": max(durations_ms, default=None),
        "over_1ms": sum(d > 1 for d in durations_ms),
        "over_100ms": sum(d > 100 for d in durations_ms),
        "blocked_s": sum(durations_ms) / 1000,
        "blocked_fraction": sum(durations_ms) / 1000 / window_s,
        "median_ms": median(durations_ms) if durations_ms else None,
        "by_command": _by_command(top, names),
        "inside_scripts": _by_command(inside, names),
        "longest": [
            {
                "ms": e["duration"] / 1000,
                "at": e["start_time"],
                "command": _label(e["command"], names),
            }
            for e in longest
        ],
    }


def _probe_summary(samples: list[float]) -> dict[str, Any]:
    return {
        "pings": len(samples),
        "median_ms": median(samples),
        "p99_ms": percentile(samples, 99),
        "max_ms": max(samples),
        "over_1ms": sum(s > 1 for s in samples),
        "over_10ms": sum(s > 10 for s in samples),
        "over_100ms": sum(s > 100 for s in samples),
    }


def _waiting(client: Any, queue: str) -> int:
    """Messages waiting in `queue`: its list of each priority (kombu names them `queue`,
    then `queue` + "\\x06\\x16" + the priority step)."""
    lists = [queue, *client.scan_iter(match=f"{queue}\x06\x16*", _type="list")]
    return sum(int(client.llen(key)) for key in lists)


def _memory(client: Any) -> dict[str, int]:
    info = client.info("memory")
    return {k: int(info[k]) for k in ("used_memory", "used_memory_dataset")}


def sweep(quick: bool) -> tuple[list[Any], dict[str, Any]]:
    from bench.runs import JOB, Row
    from client import dispatch_many
    from workers.ops.redis_server import RedisServer
    from workers.runtime.celery_app import get_app
    from workers.state.connections import new_client

    n, observe_s = (20_000, 20.0) if quick else (100_000, 60.0)
    with Stack("sweep", latency_ms=0) as stack:
        stack.env["FLEET_VISIBILITY_TIMEOUT_S"] = str(VISIBILITY_TIMEOUT_S)  # the worker's
        stock_redis = RedisServer(stack.dir / "stock-redis", appendonly=False).start()
        try:
            stock_env = {
                **stack.env,
                "FLEET_BROKER_URL": stock_redis.url,
                "FLEET_BROKER_TRANSPORT": "kombu",
            }
            apps = {"fleet": get_app(stack.env), "kombu": get_app(stock_env)}
            clients = {"fleet": new_client(stack.redis.url), "kombu": new_client(stock_redis.url)}
            before = {side: _memory(c) for side, c in clients.items()}
            publish_s = {side: 0.0 for side in apps}
            order = list(apps)
            with Load() as publish_load:
                for i in range(n // BATCH):  # batches in turns, the order flipped each time
                    for side in order if i % 2 == 0 else order[::-1]:
                        start = time.perf_counter()
                        dispatch_many([JOB] * BATCH, app=apps[side])
                        publish_s[side] += time.perf_counter() - start
            published_at = time.time()
            after = {side: _memory(c) for side, c in clients.items()}
            waiting = {side: _waiting(c, "free") for side, c in clients.items()}
            per_message = {
                side: (after[side]["used_memory"] - before[side]["used_memory"]) / n
                for side in apps
            }
            clients["kombu"].close()
            stock_redis.stop()  # only its memory was wanted

            redis = clients["fleet"]
            redis.config_set("slowlog-max-len", SLOWLOG_LEN)
            redis.config_set("slowlog-log-slower-than", SLOWLOG_US)
            worker = stack.worker(IDLE_QUEUE, 8)
            stack.wait_ready()
            # the newest message too is past the visibility timeout (a worker takes longer
            # than that to start, so this hardly ever waits)
            time.sleep(max(0.0, published_at + VISIBILITY_TIMEOUT_S + 0.5 - time.time()))
            redis_pid = stack.redis.process.pid
            with Load() as observe_load:
                redis.slowlog_reset()
                probe = PingProbe(stack.redis.host, stack.redis.port)
                cpu0, worker_cpu0 = cpu_s(redis_pid), worker.cpu_s()
                start = time.perf_counter()
                probe.start()
                time.sleep(observe_s)
                entries = redis.slowlog_get(SLOWLOG_LEN)  # after any command running now
                window_s = time.perf_counter() - start
                samples = probe.stop()
                redis_cpu_s, worker_cpu_s = cpu_s(redis_pid) - cpu0, worker.cpu_s() - worker_cpu0
            still_waiting = _waiting(redis, "free")
            redis.close()
        finally:
            stock_redis.stop()
    slow = _slowlog_summary(entries, window_s)
    probe_stats = {**_probe_summary(samples), "refused": probe.refused}
    # no command reached the slowlog's threshold: the longest was under it (an upper bound)
    longest_ms = slow["max_ms"] if slow["max_ms"] is not None else SLOWLOG_US / 1000
    obs = observe_load.span
    what = f"{n:,} jobs waiting, 1 idle worker, {observe_s:.0f} s"
    rows = [
        Row(
            "sweep",
            f"longest Redis command ({what})",
            longest_ms,
            unit="ms",
            target="< 1 ms",
            met=longest_ms < 1,
            load=obs,
        ),
        Row("sweep", "  ... commands over 1 ms", slow["over_1ms"], unit="count", load=obs),
        Row(
            "sweep",
            f"  ... Redis busy in commands over {SLOWLOG_US} µs, s of {window_s:.0f} s",
            slow["blocked_s"],
            unit="s",
            load=obs,
        ),
        Row(
            "sweep",
            "  ... PING every 10 ms: round trip, max",
            probe_stats["max_ms"],
            unit="ms",
            load=obs,
        ),
        Row("sweep", "  ... p99", probe_stats["p99_ms"], unit="ms", load=obs),
        Row(
            "sweep",
            "Redis memory per waiting job message (used_memory), ref: kombu's stock channel",
            per_message["fleet"],
            per_message["kombu"],
            "B",
            "ratio",
            per_message["fleet"] / per_message["kombu"],
            basis="of totals",
            load=publish_load.span,
        ),
    ]
    details = {
        "jobs": n,
        "observe_s": observe_s,
        "window_s": window_s,
        "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
        "slowlog_threshold_us": SLOWLOG_US,
        "slowlog": slow,
        "probe": probe_stats,
        "redis_cpu_s": redis_cpu_s,
        "idle_worker_cpu_s": worker_cpu_s,
        "waiting_in_free": {"published": waiting, "after_observing": still_waiting},
        "memory_before": before,
        "memory_after": after,
        "memory_per_message_bytes": per_message,
        "memory_ratio": per_message["fleet"] / per_message["kombu"],
        "publish_s": publish_s,
        "publish_us_per_job": {side: s / n * 1e6 for side, s in publish_s.items()},
        "probe_samples_ms": samples,
        "load_1min": {"publish": publish_load.span, "observe": obs},
    }
    return rows, details
