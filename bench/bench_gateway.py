"""The gateway's cost: one request at a time through `fleet serve`, against `dispatch()`
and against a direct call to the provider, taking turns (median and p99 of each round's
difference); the same for a request carrying 20 tool definitions, beside the plain one's;
then 500 requests at once against a 1 s provider, against Little's law for the fleet's
concurrency."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from typing import Any

from bench.common import ROOT, Load, Stack, interleaved, median, paired_differences, percentile

# The LiteLLM proxy's median overhead per call over a direct call, measured elsewhere on
# this kind of machine: quoted, not run beside the fleet.
LITELLM_PROXY_MS = 21.0
N_TOOLS = 20  # an agent's tool belt: what an orchestrator or a coding agent sends each turn


def tools(n: int) -> list[dict[str, Any]]:
    """`n` function definitions, each with a JSON schema of a few typed parameters."""
    return [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": f"Tool number {i}: looks a thing up and returns what it found.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "query": {"type": "string", "description": "what to look for"},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                        "kind": {"type": "string", "enum": ["news", "docs", "code"]},
                    },
                    "required": ["query"],
                    "additionalProperties": False,
                },
            },
        }
        for i in range(n)
    ]


def _gateway(stack: Stack) -> tuple[str, str]:
    """Start `fleet serve` in the stack; its URL and an app key."""
    fleet = [sys.executable, "-m", "workers.cli"]
    made = subprocess.run(
        [*fleet, "keys", "create", "bench"],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert stack.supervisor is not None
    child = stack.supervisor.start(
        "gateway", [*fleet, "serve", "--port", "0"], "gateway: serving on", cwd=ROOT
    )
    stack.supervisor.wait_ready(60, [child])
    found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", child.log())
    assert found, child.log()
    return found.group(1), made.stdout.strip()


def gateway(quick: bool) -> tuple[list[Any], dict[str, Any]]:
    import httpx

    from bench.runs import JOB, UPSTREAM, Row, _fleet_batch

    n, warm, burst = (60, 10, 500) if quick else (200, 10, 500)
    body = {"model": "focus/journalist", "messages": JOB["messages"], "task_class": "cost_free"}
    tool_body = {**body, "tools": tools(N_TOOLS)}
    with Stack("gateway", latency_ms=0) as stack:
        # the fleet's 100 calls at a time as two worker processes of 50 threads (one per
        # core of this machine: one process's GIL would hold a wave's CPU to one core)
        stack.worker("free", 50)
        stack.worker("free", 50)
        stack.wait_ready()
        url, key = _gateway(stack)
        assert stack.sim is not None
        headers = {"Authorization": f"Bearer {key}"}
        sim_url = stack.sim.url + "/chat/completions"
        sim_body = {"model": UPSTREAM, "messages": JOB["messages"]}
        sim_tool_body = {**sim_body, "tools": tool_body["tools"]}
        with httpx.Client(timeout=60) as client:

            def post(target: str, payload: dict[str, Any]) -> Any:
                def run() -> None:
                    client.post(target, json=payload, headers=headers).raise_for_status()

                return run

            one = {
                "direct": post(sim_url, sim_body),
                "dispatch": _fleet_batch(1),
                "gateway": post(f"{url}/chat/completions", body),
                "direct_tools": post(sim_url, sim_tool_body),
                "gateway_tools": post(f"{url}/chat/completions", tool_body),
            }
            with Load() as one_load:
                samples = interleaved(one, n, warm)
        # 500 at once against a 1 s provider: the fleet holds 100 calls at a time (two
        # workers, -c 50 each), so Little's law bounds the burst at 500 x 1 s / 100 = 5 s
        stack.sim.configure({"default": {"latency_ms": 1000}})
        with Load() as burst_load:
            seconds, failed = asyncio.run(_burst(url, headers, body, burst))
        with Load() as dispatch_load:  # the same jobs without the gateway, for its share
            start = time.perf_counter()
            _fleet_batch(burst)()
            direct_s = time.perf_counter() - start
    bound = burst * 1.0 / 100
    med = {k: median(v) for k, v in samples.items()}
    p99 = {k: percentile(v, 99) for k, v in samples.items()}
    over = {
        ref: paired_differences(samples["gateway"], samples[ref]) for ref in ("direct", "dispatch")
    }
    over_direct = median(over["direct"])
    # A request with tools: its overhead over the same request sent to the provider, and
    # what the tools add to the plain request's overhead, round by round
    over_tools = paired_differences(samples["gateway_tools"], samples["direct_tools"])
    tools_extra = paired_differences(over_tools, over["direct"])

    def overhead(ref: str, what: str, q: float) -> Row:
        """The gateway's q-th percentile, the reference's, and that of their per-round
        differences (q = 50: the medians)."""
        if q == 50:
            figures = med["gateway"], med[ref], median(over[ref])
            measure = f"one request through the gateway, ref: {what}, median"
        else:
            figures = (
                percentile(samples["gateway"], q),
                percentile(samples[ref], q),
                percentile(over[ref], q),
            )
            measure = f"  ... p{q:g}"
        fleet, reference, value = figures
        return Row(
            "gateway",
            measure,
            fleet,
            reference,
            "ms",
            "overhead",
            value,
            basis="paired",
            load=one_load.span,
        )

    rows = [
        overhead("direct", "a direct provider call", 50),
        overhead("direct", "a direct provider call", 99),
        overhead("dispatch", "dispatch()+get()", 50),
        overhead("dispatch", "dispatch()+get()", 99),
        Row(
            "gateway",
            f"one request with {N_TOOLS} tool definitions, ref: it sent to the provider, median",
            med["gateway_tools"],
            med["direct_tools"],
            "ms",
            "overhead",
            median(over_tools),
            basis="paired",
            load=one_load.span,
        ),
        Row(
            "gateway",
            "  ... its overhead, ref: the plain request's overhead, median",
            median(over_tools),
            median(over["direct"]),
            "ms",
            "overhead",
            median(tools_extra),
            basis="paired",
            load=one_load.span,
        ),
        Row(
            "gateway",
            f"{burst} requests at once × 1 s provider (fleet 2 × -c 50): seconds",
            seconds,
            None,
            "s",
            "",
            None,
            "≤ 1.25× Little's law",
            seconds <= 1.25 * bound,
            load=burst_load.span,
        ),
        Row(
            "gateway",
            f"  ... × Little's-law bound ({bound:g} s)",
            seconds / bound,
            None,
            "×",
            load=burst_load.span,
        ),
        Row("gateway", "  ... failed requests", failed, None, "count", load=burst_load.span),
        Row(
            "gateway",
            f"  the same {burst} jobs by dispatch() from one process: seconds",
            direct_s,
            None,
            "s",
            "",
            None,
            f"{direct_s / bound:.2f}× the bound",
            load=dispatch_load.span,
        ),
    ]
    rows[0].target = f"< LiteLLM proxy's {LITELLM_PROXY_MS:g} ms"
    rows[0].met = over_direct < LITELLM_PROXY_MS
    details = {
        "sequential": n,
        "burst": burst,
        "medians_ms": med,
        "p99_ms": p99,
        "gateway_minus_ms": {
            ref: {"median": median(v), "p90": percentile(v, 90), "p99": percentile(v, 99)}
            for ref, v in over.items()
        },
        "tools": {
            "definitions": N_TOOLS,
            "overhead_ms": {"median": median(over_tools), "p99": percentile(over_tools, 99)},
            "over_plain_ms": {"median": median(tools_extra), "p99": percentile(tools_extra, 99)},
        },
        "samples_ms": samples,
        "load_1min": {
            "one_at_a_time": one_load.span,
            "burst": burst_load.span,
            "burst_by_dispatch": dispatch_load.span,
        },
        "burst_s": seconds,
        "burst_failed": failed,
        "bound_s": bound,
        "burst_by_dispatch_s": direct_s,
        "litellm_proxy_ms_quoted": LITELLM_PROXY_MS,
    }
    return rows, details


async def _burst(
    url: str, headers: dict[str, str], body: dict[str, Any], n: int
) -> tuple[float, int]:
    """`n` requests at once, each on a connection of its own, with a bare HTTP/1.1 client:
    httpx's async pool, with 500 requests in flight, spends enough CPU per request to be
    the bottleneck of this measure on the same cores as the fleet."""
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {parts.path}/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "Connection: close\r\n\r\n"
    ).encode()

    async def one() -> bool:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(head + payload)
            status = await reader.readline()
            await reader.read()  # the rest, until the server closes
            ok = status.split()[1:2] == [b"200"]
            if not ok:
                print(f"  gateway burst: {status!r}", file=sys.stderr)
            return ok
        finally:
            writer.close()

    start = time.perf_counter()
    done = await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - start, done.count(False)
