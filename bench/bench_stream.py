"""Streaming's cost (docs/streaming.md): `fleet serve` in front of two threads workers.

1. Time to first token, one request at a time, taking turns: a direct streaming call to
   the simulator, the same prompt through the gateway (`stream: true`), and dispatch() +
   handle.stream(); each fleet side's overhead over the direct call of its round.
2. Many streams at once on one gateway process (1,000; `--quick` 200), from a bare asyncio
   client, with a worker thread for each stream's call: each content event's arrival,
   the gap between two tokens at the client against the provider's (chunk_ms), and the
   gateway process's threads and Redis connections meanwhile. Then fewer streams at a
   model's pace (100 ms a token), the same tokens a second in all.
3. Redis commands per 1,000 completion tokens (INFO commandstats), streamed jobs against
   the same jobs not streamed, through the gateway and through dispatch(), taking turns.

1 and 3 run first, on two workers of -c 50 (as the gateway benchmark's); 2 on workers
with a thread for every stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.bench_gateway import _gateway
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

FIRST_CHUNK_MS = 0  # 1: the provider's answer at once: the first token is not waited for
# 2: the tokens a second all streams make together. The whole path costs this machine
# 1.5-4 ms of CPU per token (workers, gateway, Redis, simulator, client; more the more
# streams are open), so 1,000 streams at a model's 10 tokens/s (10,000 a second) would
# measure only the machine's queue: each of 1,000 streams makes a token every 2 s
# instead, and the model's pace is measured with as many streams as make the same rate.
TOKENS_PER_S = 500
PACE_CHUNK_MS = 100  # 2: a model's pace, 10 tokens/s
COUNT_CHUNK_MS = 20  # 3: ~50 tokens/s, a hosted model's pace: a few tokens to a batch
COUNT_JOBS = 10  # 3: jobs at once in a round
TTFT_TARGET_MS = 15.0
GAP_TARGET_MS = 50.0  # streams.BATCH_S: the most a batch may hold a token back
COUNTED = ("xadd", "xread", "evalsha")  # commandstats broken down; the rest is "other"


# --- a bare asyncio HTTP/1.1 client for server-sent events ----------------------------------


@dataclass
class Stream:
    """One request's answer as the client met it. Content events only (the chunks that
    carry text); times from time.perf_counter(), and the wall clock for comparing with
    the record ids (Redis's clock at the XADD that wrote each record, in ms)."""

    started: float
    status: int = 0
    arrivals: list[float] = field(default_factory=list)  # each content event's arrival (s)
    arrived_ms: list[float] = field(default_factory=list)  # the same, wall clock (epoch ms)
    written_ms: list[int] = field(default_factory=list)  # its record id's ms part (epoch ms)
    ended_at: float | None = None  # [DONE] or the body's end
    done: bool = False  # [DONE] seen
    usage: dict[str, Any] | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.error and bool(self.arrivals)

    def event(self, raw: bytes, now: float, wall_ms: float) -> None:
        record_id, data = b"", b""
        for line in raw.split(b"\n"):
            if line.startswith(b"id: "):
                record_id = line[4:]
            elif line.startswith(b"data: "):
                data = line[6:]
        if data == b"[DONE]":
            self.done = True
        elif b'"content":' in data:  # the gateway's chunks: compact JSON, text escaped
            self.arrivals.append(now)
            self.arrived_ms.append(wall_ms)
            if record_id:
                self.written_ms.append(int(record_id.split(b"-")[0]))
        elif b'"usage":{' in data:
            self.usage = json.loads(data)["usage"]
        elif data.startswith(b'{"error":'):
            self.error = data[:300].decode(errors="replace")


def request_bytes(url: str, key: str, body: dict[str, Any]) -> bytes:
    """A POST to the gateway's chat completions, on a connection of its own."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {parts.path}/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        f"Authorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload


async def sse(host: str, port: int, request: bytes) -> Stream:
    """Send `request`; read its answer: an event stream, each event as the HTTP chunk that
    completes it arrives, or a whole body (a request that does not stream: its usage).
    httpx's async client spends enough CPU per event to be the bottleneck of a thousand
    streams on the gateway's own cores."""
    out = Stream(started=time.perf_counter())
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        out.status = int((await reader.readline()).split()[1])
        chunked, length = await _headers(reader)
        if chunked:
            await _events(reader, out)
        else:
            _whole(await (reader.readexactly(length) if length >= 0 else reader.read()), out)
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
        out.error = repr(exc)
    finally:
        out.ended_at = time.perf_counter()
        if writer is not None:
            writer.close()
    return out


async def _headers(reader: asyncio.StreamReader) -> tuple[bool, int]:
    """Whether the body is chunked, and its Content-Length (-1: none given)."""
    chunked, length = False, -1
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"content-length":
            length = int(value)
    return chunked, length


async def _events(reader: asyncio.StreamReader, out: Stream) -> None:
    pending = b""
    while size := int((await reader.readline()).split(b";")[0], 16):
        pending += (await reader.readexactly(size + 2))[:-2]
        *events, pending = pending.split(b"\n\n")
        if events:
            now, wall_ms = time.perf_counter(), time.time() * 1000
            for raw in events:
                out.event(raw, now, wall_ms)


def _whole(body: bytes, out: Stream) -> None:
    if out.status != 200:
        out.error = body[:300].decode(errors="replace")
        return
    out.usage, out.done = json.loads(body).get("usage"), True
    out.arrivals.append(time.perf_counter())


# --- the gateway process, from /proc -------------------------------------------------------


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise ValueError(f"/proc/{pid}/status has no Threads line")


def connections_to(pid: int, port: int) -> int:
    """How many of `pid`'s TCP sockets are connected to `port` (Redis's): its sockets'
    inodes (/proc/PID/fd) found in the TCP table."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                count += 1
    return count


@dataclass
class Sample:
    t: float  # since the streams were opened, s
    threads: int  # the gateway's
    redis_connections: int  # the gateway's
    redis_clients: int  # every process's (INFO clients): the workers' grow with their threads


def watcher(gateway_pid: int, redis_port: int, redis: Any) -> Callable[[], Sample]:
    def watch() -> Sample:
        clients = int(redis.info("clients")["connected_clients"])
        return Sample(0.0, threads(gateway_pid), connections_to(gateway_pid, redis_port), clients)

    return watch


# --- 1. time to first token ----------------------------------------------------------------


def _first_token(
    stack: Stack, url: str, key: str, quick: bool
) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """Each side's time to first token (ms) round by round; each side's whole stream (ms);
    the load."""
    import httpx

    from bench.runs import GET_TIMEOUT_S, JOB, UPSTREAM
    from client import dispatch
    from router.results import Delta

    n, warm = (40, 5) if quick else (200, 10)
    assert stack.sim is not None
    stack.sim.configure({"default": {"chunk_ms": FIRST_CHUNK_MS}})
    options = {"stream": True, "stream_options": {"include_usage": True}}
    # what the fleet's call sends the simulator (workers/providers/openai_compat.py)
    direct_body = {"model": UPSTREAM, "messages": JOB["messages"], **options}
    gateway_body = {**_chat_body(), "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    ttft: dict[str, list[float]] = {"direct": [], "gateway": [], "dispatch": []}

    def first_content(lines: Iterator[str], start: float) -> float:
        """ms from `start` to the first event carrying text; the rest read to the end (a
        client of the gateway that leaves would revoke its job)."""
        first = None
        for line in lines:
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    first = (time.perf_counter() - start) * 1000
        assert first is not None, "the stream carried no text"
        return first

    with httpx.Client(timeout=60) as client:

        def over_http(side: str, target: str, body: dict[str, Any]) -> Callable[[], None]:
            def run() -> None:
                start = time.perf_counter()
                with client.stream("POST", target, json=body, headers=headers) as response:
                    response.raise_for_status()
                    ttft[side].append(first_content(response.iter_lines(), start))

            return run

        def by_dispatch() -> None:
            start, first = time.perf_counter(), None
            handle = dispatch({**JOB, "stream": True})
            for piece in handle.stream(timeout=GET_TIMEOUT_S):
                if first is None and isinstance(piece, Delta) and piece.text:
                    first = (time.perf_counter() - start) * 1000
            assert first is not None, "the stream carried no text"
            ttft["dispatch"].append(first)

        runs = {
            "direct": over_http("direct", stack.sim.url + "/chat/completions", direct_body),
            "gateway": over_http("gateway", f"{url}/chat/completions", gateway_body),
            "dispatch": by_dispatch,
        }
        with Load() as load:
            whole = interleaved(runs, n, warm)
    return {side: v[warm:] for side, v in ttft.items()}, whole, load.span


def _chat_body() -> dict[str, Any]:
    """bench/runs.py's JOB as a chat request to the gateway (the same route and model)."""
    from bench.runs import JOB

    return {"model": "focus/journalist", "messages": JOB["messages"], "task_class": "cost_free"}


# --- 2. many streams at once ---------------------------------------------------------------


@dataclass
class Many:
    """One burst of streams and what was read around it."""

    n: int
    chunk_ms: int
    streams: list[Stream]
    samples: list[Sample]
    seconds: float
    idle: Sample  # the gateway before the burst
    cpu_s: dict[str, float]  # each process's CPU over the burst
    commands: dict[str, dict[str, int]]  # commandstats over the burst (calls, usec)
    load: list[float]

    @property
    def done(self) -> list[Stream]:
        return [s for s in self.streams if s.ok]

    @property
    def failed(self) -> list[Stream]:
        return [s for s in self.streams if not s.ok]

    @property
    def tokens(self) -> int:
        return sum(len(s.arrivals) for s in self.done)

    @property
    def opened_at(self) -> float:
        """When the last stream's first token arrived (s after the burst began)."""
        start = min(s.started for s in self.streams)
        return max(s.arrivals[0] for s in self.done) - start if self.done else float("nan")

    def gaps(self, after: float = 0.0) -> dict[str, list[float]]:
        """Between two content events of a stream (the later arriving `after` s or more
        into the burst): the gap at the client; that minus the provider's (chunk_ms);
        the gap between the XADDs that wrote their records (Redis's clock, ms); the
        client's gap minus that; and each event's XADD to its arrival at the client."""
        out: dict[str, list[float]] = {
            k: [] for k in ("client", "over", "written", "after_written", "delivery")
        }
        since = min(s.started for s in self.streams) + after
        for s in self.done:
            paired = len(s.written_ms) == len(s.arrivals)
            for i, arrived in enumerate(s.arrivals):
                if arrived < since:
                    continue
                if paired:
                    out["delivery"].append(s.arrived_ms[i] - s.written_ms[i])
                if i == 0:
                    continue
                gap = (arrived - s.arrivals[i - 1]) * 1000
                out["client"].append(gap)
                out["over"].append(gap - self.chunk_ms)
                if paired:
                    written = float(s.written_ms[i] - s.written_ms[i - 1])
                    out["written"].append(written)
                    out["after_written"].append(gap - written)
        return out

    def open_at_once(self) -> int:
        """The most streams open at one moment: from their first token to their end."""
        edges: list[tuple[float, int]] = []
        for s in self.done:
            assert s.ended_at is not None
            edges += [(s.arrivals[0], 1), (s.ended_at, -1)]
        peak = current = 0
        for _, step in sorted(edges):
            current += step
            peak = max(peak, current)
        return peak


async def _open(
    url: str, key: str, body: dict[str, Any], n: int, watch: Callable[[], Sample]
) -> tuple[list[Stream], list[Sample], float]:
    """`n` streams at once, each on a connection of its own; the gateway watched every
    second meanwhile, from a thread (reading /proc's TCP table takes ms, in a syscall
    that lets this loop run)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    request = request_bytes(url, key, body)
    samples: list[Sample] = []
    stop = threading.Event()
    start = time.perf_counter()

    def watching() -> None:
        while not stop.is_set():
            sample = watch()
            sample.t = time.perf_counter() - start
            samples.append(sample)
            stop.wait(1.0)

    thread = threading.Thread(target=watching, name="gateway-watch", daemon=True)
    thread.start()
    try:
        streams = await asyncio.gather(
            *(sse(parts.hostname, parts.port, request) for _ in range(n))
        )
    finally:
        stop.set()
        thread.join()
    return list(streams), samples, time.perf_counter() - start


def _many(stack: Stack, url: str, key: str, n: int, chunk_ms: int, pids: dict[str, int]) -> Many:
    import redis as redis_py

    assert stack.sim is not None
    stack.sim.configure({"default": {"chunk_ms": chunk_ms}})
    body = {**_chat_body(), "stream": True}
    redis = redis_py.Redis.from_url(stack.redis.url)
    watch = watcher(pids["gateway"], int(stack.redis.port), redis)
    try:
        idle = watch()
        cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
        bench0, commands0 = time.process_time(), commandstats(redis)
        with Load() as load:
            streams, samples, seconds = asyncio.run(_open(url, key, body, n, watch))
        cpu = {name: cpu_s(pid) - cpu0[name] for name, pid in pids.items()}
        cpu["bench client"] = time.process_time() - bench0
        after = commandstats(redis)
    finally:
        redis.close()
    commands = {
        k: {f: v[f] - commands0.get(k, {}).get(f, 0) for f in ("calls", "usec")}
        for k, v in after.items()
    }
    commands = {k: v for k, v in commands.items() if v["calls"]}
    return Many(n, chunk_ms, streams, samples, seconds, idle, cpu, commands, load.span)


# --- 3. Redis commands per 1,000 tokens ----------------------------------------------------


def commandstats(client: Any) -> dict[str, dict[str, int]]:
    """Calls and µs per command since the server started (a script's own commands
    included), the bench's own INFO left out."""
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): {"calls": int(value["calls"]), "usec": int(value["usec"])}
        for name, value in stats.items()
        if not name.startswith("cmdstat_info")
    }


def spent(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Commands between two readings: xadd, xread, evalsha, other, total, and each other
    command's calls."""
    calls = {k: v["calls"] - before.get(k, {}).get("calls", 0) for k, v in after.items()}
    out: dict[str, Any] = {k: calls.get(k, 0) for k in COUNTED}
    out["other"] = sum(v for k, v in calls.items() if k not in COUNTED)
    out["total"] = sum(calls.values())
    ranked = sorted(calls.items(), key=lambda kv: -kv[1])
    out["other_by_command"] = {k: v for k, v in ranked if v and k not in COUNTED}
    return out


def _counted_rounds(
    redis: Any, sides: dict[str, Callable[[], int]], rounds: int
) -> dict[str, list[dict[str, Any]]]:
    """Each side's commands and completion tokens, round by round, taking turns (the
    order flips every round)."""
    out: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    order = list(sides)
    for i in range(rounds):
        for side in order if i % 2 == 0 else order[::-1]:
            before, start = commandstats(redis), time.perf_counter()
            tokens = sides[side]()
            seconds = time.perf_counter() - start
            out[side].append(
                {"tokens": tokens, "seconds": seconds, **spent(before, commandstats(redis))}
            )
    return out


def per_1k(rounds: list[dict[str, Any]], what: str) -> list[float]:
    """Each round's `what` commands per 1,000 completion tokens."""
    return [r[what] / r["tokens"] * 1000 for r in rounds]


def _commands(
    stack: Stack, url: str, key: str, quick: bool
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], dict[str, Any], list[float]]:
    """Per path (gateway, dispatch), per side (streamed, whole): each round's counts; what
    the idle fleet spends in a second; the load."""
    import redis as redis_py

    from bench.runs import GET_TIMEOUT_S, JOB
    from client import dispatch
    from router.results import Result

    rounds = 4 if quick else 12
    assert stack.sim is not None
    stack.sim.configure({"default": {"chunk_ms": COUNT_CHUNK_MS}})
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    host, port = parts.hostname, parts.port
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    streamed = request_bytes(url, key, {**_chat_body(), **usage})
    whole = request_bytes(url, key, _chat_body())

    def over_gateway(request: bytes) -> Callable[[], int]:
        async def burst() -> list[Stream]:
            return list(
                await asyncio.gather(*(sse(host, port, request) for _ in range(COUNT_JOBS)))
            )

        def run() -> int:
            answers = asyncio.run(burst())
            assert all(a.ok and a.usage for a in answers), [a.error for a in answers]
            return sum(int(a.usage["completion_tokens"]) for a in answers if a.usage)

        return run

    pool = ThreadPoolExecutor(COUNT_JOBS)

    def by_dispatch(stream: bool) -> Callable[[], int]:
        def one(_: int) -> int:
            if not stream:
                return dispatch(JOB).get(timeout=GET_TIMEOUT_S).completion_tokens
            last = list(dispatch({**JOB, "stream": True}).stream(timeout=GET_TIMEOUT_S))[-1]
            assert isinstance(last, Result), last  # the Result comes last
            return last.completion_tokens

        def run() -> int:
            return sum(pool.map(one, range(COUNT_JOBS)))

        return run

    sides = {
        "gateway": {"streamed": over_gateway(streamed), "whole": over_gateway(whole)},
        "dispatch": {"streamed": by_dispatch(True), "whole": by_dispatch(False)},
    }
    redis = redis_py.Redis.from_url(stack.redis.url)
    try:
        for path in sides.values():  # warm: each path's connections and adapters
            for run in path.values():
                run()
        before = commandstats(redis)  # what the idle fleet spends (polls, beats), for scale
        time.sleep(2.0)
        idle = spent(before, commandstats(redis))
        background = {"seconds": 2.0, "per_s": idle["total"] / 2.0, **idle}
        with Load() as load:
            found = {path: _counted_rounds(redis, runs, rounds) for path, runs in sides.items()}
    finally:
        redis.close()
        pool.shutdown()
    return found, background, load.span


# --- the benchmark -------------------------------------------------------------------------


def stream(quick: bool) -> tuple[list[Any], dict[str, Any]]:
    """The three measures on one stack; workers sized for each (see the module's doc)."""
    n_streams = 200 if quick else 1000
    slow_ms = round(n_streams / TOKENS_PER_S * 1000)  # the same tokens a second in all
    n_paced = TOKENS_PER_S * PACE_CHUNK_MS // 1000
    with Stack("stream", latency_ms=0) as stack:
        stack.worker("free", 50)  # one request at a time: as the gateway benchmark's fleet
        stack.worker("free", 50)
        stack.wait_ready()
        url, key = _gateway(stack)
        ttft, whole_ms, ttft_load = _first_token(stack, url, key, quick)
        counts, background, count_load = _commands(stack, url, key, quick)
        stack.stop_workers()  # (and the gateway)

        # a worker thread for every stream's call: two processes, one per core
        stack.worker("free", n_streams // 2)
        stack.worker("free", n_streams // 2)
        stack.wait_ready()
        url, key = _gateway(stack)
        assert stack.supervisor is not None and stack.sim is not None
        pids = {child.name: child.pid for child in stack.supervisor.children}
        assert stack.redis.process is not None
        pids |= {"redis-server": stack.redis.process.pid, "simulator": stack.sim.process.pid}
        _many(stack, url, key, 20, PACE_CHUNK_MS, pids)  # warm: the workers' threads, pools
        stack.sim.reset()
        many = _many(stack, url, key, n_streams, slow_ms, pids)
        paced = _many(stack, url, key, n_paced, PACE_CHUNK_MS, pids)
        log = stack.sim.requests()

    rows = _ttft_rows(ttft, ttft_load)
    rows += _many_rows(many, f"{n_streams:,} streams at once on one gateway")
    rows += _many_rows(paced, f"{n_paced} streams at once")
    rows += _command_rows(counts, count_load)
    details: dict[str, Any] = {
        "first_token": {
            "rounds": len(ttft["direct"]),
            "workers": "2 × threads -c 50",
            "chunk_ms": FIRST_CHUNK_MS,
            "ttft_ms": ttft,
            "over_direct_ms": {
                side: _spread(paired_differences(ttft[side], ttft["direct"]))
                for side in ("gateway", "dispatch")
            },
            "whole_stream_ms": whole_ms,
            "load_1min": ttft_load,
        },
        "commands": {
            "jobs_per_round": COUNT_JOBS,
            "workers": "2 × threads -c 50",
            "chunk_ms": COUNT_CHUNK_MS,
            "idle_background": background,
            "per_1k_tokens": {
                path: {side: per_1k(r, "total") for side, r in sides.items()}
                for path, sides in counts.items()
            },
            "rounds": counts,
            "load_1min": count_load,
        },
        "many": _many_details(many, f"2 × threads -c {n_streams // 2}"),
        "paced": _many_details(paced, f"2 × threads -c {n_streams // 2}"),
        "simulator_stream_ends": _count(str(e.get("stream_end")) for e in log),
    }
    return rows, details


def _ttft_rows(ttft: dict[str, list[float]], load: list[float]) -> list[Any]:
    from bench.runs import Row

    rows = []
    for side, what in (("gateway", "through the gateway"), ("dispatch", "by dispatch()+stream()")):
        mine, ref = ttft[side], ttft["direct"]
        over = paired_differences(mine, ref)
        gateway = side == "gateway"
        rows += [
            Row(
                "stream",
                f"time to first token {what}, ref: a direct streaming call, median",
                median(mine),
                median(ref),
                "ms",
                "overhead",
                median(over),
                f"< {TTFT_TARGET_MS:g} ms" if gateway else "info",
                median(over) < TTFT_TARGET_MS if gateway else None,
                "paired",
                load,
            ),
            Row(
                "stream",
                "  ... p99",
                percentile(mine, 99),
                percentile(ref, 99),
                "ms",
                "overhead",
                percentile(over, 99),
                basis="paired",
                load=load,
            ),
        ]
    return rows


def _many_rows(many: Many, title: str) -> list[Any]:
    from bench.runs import Row
    from gateway.app import SEND_THREADS
    from gateway.waiter import CONNECTIONS

    gaps, steady = many.gaps(), many.gaps(after=many.opened_at)
    over_p99 = percentile(gaps["over"], 99)
    peak_threads = max(s.threads for s in many.samples)
    peak_conns = max(s.redis_connections for s in many.samples)
    idle = many.idle
    load = many.load
    gateway_cpu_us = many.cpu_s["gateway"] / max(many.tokens, 1) * 1e6
    whole_cpu_us = sum(many.cpu_s.values()) / max(many.tokens, 1) * 1e6
    xread = many.commands.get("xread", {"calls": 0, "usec": 0})
    rows = [
        Row(
            "stream",
            f"{title}, a token every {many.chunk_ms:,} ms each: the client's gap between"
            " tokens, ref: the provider's, p50",
            percentile(gaps["client"], 50),
            float(many.chunk_ms),
            "ms",
            "overhead",
            percentile(gaps["over"], 50),
            load=load,
        ),
        Row(
            "stream",
            "  ... p99",
            percentile(gaps["client"], 99),
            float(many.chunk_ms),
            "ms",
            "overhead",
            over_p99,
            f"< +{GAP_TARGET_MS:g} ms",
            over_p99 < GAP_TARGET_MS,
            load=load,
        ),
        Row(
            "stream",
            "  ... p99 once every stream was open",
            percentile(steady["client"], 99),
            float(many.chunk_ms),
            "ms",
            "overhead",
            percentile(steady["over"], 99),
            load=load,
        ),
        Row(
            "stream",
            "  ... p99, ref: the gap between the two records' XADDs",
            percentile(gaps["client"], 99),
            percentile(gaps["written"], 99),
            "ms",
            "overhead",
            percentile(gaps["after_written"], 99),
            load=load,
        ),
        Row(
            "stream",
            "  ... a token's XADD to its arrival at the client, p50",
            percentile(gaps["delivery"], 50),
            unit="ms",
            load=load,
        ),
        Row("stream", "  ... p99", percentile(gaps["delivery"], 99), unit="ms", load=load),
        Row(
            "stream",
            "  ... streams completed",
            len(many.done),
            unit="count",
            target=f"all {many.n:,}",
            met=len(many.done) == many.n,
            load=load,
        ),
        Row("stream", "  ... streams failed", len(many.failed), unit="count", load=load),
        Row(
            "stream",
            "  ... most streams open at one moment",
            many.open_at_once(),
            unit="count",
            load=load,
        ),
        Row(
            "stream",
            "  ... s until every stream had its first token",
            many.opened_at,
            unit="s",
            load=load,
        ),
        Row(
            "stream",
            "  ... gateway threads, peak, ref: idle before",
            peak_threads,
            idle.threads,
            "count",
            target=f"≤ idle + {SEND_THREADS}",
            met=peak_threads <= idle.threads + SEND_THREADS,
            load=load,
        ),
        Row(
            "stream",
            "  ... gateway's Redis connections, peak, ref: idle before",
            peak_conns,
            idle.redis_connections,
            "count",
            target=f"≤ idle + {CONNECTIONS + SEND_THREADS}",
            met=peak_conns <= idle.redis_connections + CONNECTIONS + SEND_THREADS,
            load=load,
        ),
        Row(
            "stream",
            "  ... Redis's time per XREAD (a round of one gateway reader, over up to 100 streams)",
            xread["usec"] / max(xread["calls"], 1),
            unit="µs",
            load=load,
        ),
        Row(
            "stream",
            "  ... CPU per token: the gateway, ref: every process",
            gateway_cpu_us,
            whole_cpu_us,
            "µs",
            load=load,
        ),
    ]
    return rows


def _command_rows(
    counts: dict[str, dict[str, list[dict[str, Any]]]], load: list[float]
) -> list[Any]:
    from bench.runs import Row

    rows = []
    for path, label in (("gateway", "through the gateway"), ("dispatch", "by dispatch()")):
        streamed, whole = counts[path]["streamed"], counts[path]["whole"]
        totals = per_1k(streamed, "total"), per_1k(whole, "total")
        rows.append(
            Row(
                "stream",
                f"Redis commands per 1,000 tokens {label}, streamed ({COUNT_CHUNK_MS} ms a"
                " token), ref: not streamed",
                median(totals[0]),
                median(totals[1]),
                "count",
                "ratio",
                median(paired_ratios(*totals)),
                basis="paired",
                load=load,
            )
        )
        for what in (*COUNTED, "other"):
            rows.append(
                Row(
                    "stream",
                    f"  ... {what.upper() if what in COUNTED else 'other commands'}",
                    median(per_1k(streamed, what)),
                    median(per_1k(whole, what)),
                    "count",
                    load=load,
                )
            )
    return rows


def _many_details(many: Many, workers: str) -> dict[str, Any]:
    gaps, steady = many.gaps(), many.gaps(after=many.opened_at)
    return {
        "streams": many.n,
        "workers": workers,
        "chunk_ms": many.chunk_ms,
        "seconds": many.seconds,
        "completed": len(many.done),
        "failed": len(many.failed),
        "failures": sorted({f"{s.status} {s.error[:200]}" for s in many.failed})[:20],
        "tokens": many.tokens,
        "open_at_once": many.open_at_once(),
        "all_open_after_s": many.opened_at,
        "ms": {k: _spread(v) for k, v in gaps.items()},
        "ms_once_all_open": {k: _spread(v) for k, v in steady.items()},
        "cpu_s": many.cpu_s,
        "cpu_us_per_token": {k: v / max(many.tokens, 1) * 1e6 for k, v in many.cpu_s.items()},
        "redis_commands": many.commands,
        "gateway": {
            "idle": vars(many.idle),
            "samples": [vars(s) for s in many.samples],
        },
        "load_1min": many.load,
    }


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
    }
