"""`fleet demo`: the whole fleet end to end on one machine, with no API keys and no network.

The provider simulator stands in for every remote provider, the tiny generated MLX model
for the local ones. A private redis-server and one real worker process per queue run the
jobs; the mix covers every task class, an image, a 250K-token prompt, a cron job, and
primaries that fail (503, 429 with Retry-After, a timeout that escalates into another
queue). Prints one row per job and exits 0 when every job got an answer.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from router.catalog import QUEUES
from router.results import Result
from workers.ledger.writer import READY as LEDGER_WRITER_READY
from workers.ops.pools import worker_argv
from workers.ops.redis_server import RedisServer
from workers.ops.supervisor import Supervisor
from workers.ops.up import ledger_writer_argv

DEMO_PROVIDER_TIMEOUT_S = 3.0
# A 1x1 PNG: the vision job's image.
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
# Per-model latency of the simulated providers, so the table shows something real.
SIM_LATENCY = {"default": {"latency_ms": 40}}


def _ask(text: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **fields}


def demo_jobs() -> list[tuple[str, dict[str, Any]]]:
    """(what the job shows, the job)."""
    long_doc = "The quarterly report discusses revenue and costs. " * 31_000  # ~250K tokens
    image = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": PIXEL}},
    ]
    return [
        (
            "complex reasoning, primary 429 Retry-After",
            _ask(
                "[[sim:glm-4.7=429:1]] Plan the migration in three steps.",
                task_class="complex_reasoning",
            ),
        ),
        ("creative", _ask("Write a two-line poem about queues.", task_class="creative")),
        (
            "user facing, primary 503",
            _ask("[[sim:glm-4.7=503]] Greet the user warmly.", task_class="user_facing"),
        ),
        (
            "vision (image part)",
            {"task_class": "vision", "messages": [{"role": "user", "content": image}]},
        ),
        (
            "long context, 250K tokens",
            _ask(f"Summarise this document: {long_doc}", task_class="long_context"),
        ),
        (
            "fast general, primary timeout",
            _ask("[[sim:MiniMax-M2.1=timeout]] List three colours.", task_class="fast_general"),
        ),
        ("cost free, from cron", _ask("Digest the inbox.", task_class="cost_free", source="cron")),
        (
            "reasoning free, sub-agent",
            _ask("Check this arithmetic: 2+2=4.", task_class="reasoning_free", source="sub-agent"),
        ),
        (
            "heartbeat on local MLX",
            _ask("ping", task_class="heartbeat", source="heartbeat", max_tokens=12),
        ),
        (
            "profile code",
            _ask("Write hello world in C.", task_class="fast_general", profile="code"),
        ),
        (
            "embedding on local MLX",
            {"task_class": "embedding", "input": ["a fleet of models", "one queue each"]},
        ),
    ]


def demo_ledger_url() -> str:
    """The demo's own ledger, beside the user's (the data dir's `demo/`): its simulated
    calls and spend stay out of the user's `fleet usage` and dashboard."""
    from workers.config import data_dir

    path = data_dir() / "demo" / "ledger.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


@contextmanager
def demo_fleet(out: TextIO, workdir: Path) -> Iterator[dict[str, str]]:
    """Simulator, tiny model, private Redis and one worker per queue; yields their env."""
    from workers.sim.simulated import simulated_env
    from workers.sim.simulator import Simulator
    from workers.sim.tiny_model import build_tiny_model

    progress = _progress(out)
    sim = Simulator(config=SIM_LATENCY).start()
    redis = RedisServer(workdir / "redis", appendonly=False)
    sup = None
    try:
        model_dir = build_tiny_model(workdir / "tiny-model")
        progress(f"provider simulator on {sim.url}; tiny MLX model in {model_dir}")
        redis.start()
        env = {
            **os.environ,
            "FLEET_BROKER_URL": redis.url,
            "HF_HUB_OFFLINE": "1",
            **simulated_env(sim.url, model_dir, workdir, DEMO_PROVIDER_TIMEOUT_S),
            # Its made-up spend in a ledger of its own, never in the user's
            "FLEET_LEDGER_URL": demo_ledger_url(),
        }
        env.pop("FLEET_STATE_URL", None)
        sup = Supervisor(workdir / "logs", env)
        for queue in QUEUES:
            sup.start(f"worker-{queue}", worker_argv([queue], concurrency=8), " ready.")
        sup.start("ledger-writer", ledger_writer_argv(), LEDGER_WRITER_READY)
        progress(f"redis-server on {redis.url}; starting a worker per queue: {', '.join(QUEUES)}")
        sup.wait_ready()
        yield env
    finally:
        if sup is not None:
            sup.stop()
        redis.stop()
        sim.stop()


def run_demo(*, as_json: bool = False, out: TextIO = sys.stdout, timeout_s: float = 120) -> int:
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="fleet-demo-") as tmp,
        demo_fleet(sys.stderr if as_json else out, Path(tmp)) as env,
    ):
        for key in ("FLEET_BROKER_URL", "FLEET_CATALOG"):
            os.environ[key] = env[key]
        os.environ.pop("FLEET_STATE_URL", None)
        rows = _run_jobs(timeout_s)
    if as_json:
        for _label, result in rows:
            out.write(json.dumps(_json_row(result)) + "\n")
    else:
        _print_table(out, rows, time.perf_counter() - started)
    return 0 if all(result.ok for _, result in rows) else 1


def _run_jobs(timeout_s: float) -> list[tuple[str, Result]]:
    from client import dispatch

    sent = [(label, dispatch(job)) for label, job in demo_jobs()]
    return [(label, handle.get(timeout=timeout_s, propagate=False)) for label, handle in sent]


def _json_row(result: Result) -> dict[str, Any]:
    return {
        "job_id": result.job_id,
        "task_class": result.task_class,
        "source": result.source,
        "queue_path": result.queue_path,
        "model": result.model,
        "attempts": len([a for a in result.attempts if a.outcome != "skipped"]),
        "ok": result.ok,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
    }


def _print_table(out: TextIO, rows: list[tuple[str, Result]], elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fleet demo: every job, the queues it travelled, who answered")
    for col in (
        "job",
        "class",
        "queues travelled",
        "answered by",
        "attempts",
        "tokens in/out",
        "latency",
    ):
        table.add_column(col)
    for label, result in rows:
        tried = [a for a in result.attempts if a.outcome != "skipped"]
        failures = ", ".join(f"{a.error_kind}" for a in tried if a.outcome == "error")
        table.add_row(
            label,
            result.task_class,
            " → ".join(result.queue_path),
            result.model or f"FAILED: {result.error}",
            f"{len(tried)}" + (f" ({failures})" if failures else ""),
            f"{result.prompt_tokens:,}/{result.completion_tokens:,}",
            f"{result.latency_ms or 0:,.0f} ms",
        )
    console = Console(file=out, highlight=False, width=None if out.isatty() else 200)
    console.print(table)
    answered = sum(r.ok for _, r in rows)
    attempts = sum(len([a for a in r.attempts if a.outcome != "skipped"]) for _, r in rows)
    tokens_in = sum(r.prompt_tokens for _, r in rows)
    tokens_out = sum(r.completion_tokens for _, r in rows)
    console.print(f"{answered}/{len(rows)} jobs answered in {elapsed:.1f} s (start-up included)")
    console.print(
        f"{attempts} attempts, {tokens_in:,} tokens in, {tokens_out:,} out: in the demo's own"
        " ledger, apart from yours; to see them:"
    )
    console.print(f"  FLEET_LEDGER_URL={demo_ledger_url()} .venv/bin/fleet usage", soft_wrap=True)


def _progress(out: TextIO) -> Callable[[str], None]:
    def say(line: str) -> None:
        print(f"demo: {line}", file=out, flush=True)

    return say
