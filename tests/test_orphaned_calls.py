"""A call in flight when its worker is killed -9 is billed: the job's redelivery writes it
to the ledger as `orphaned` (tokens and cost estimated) beside the call that answers, so
the ledger holds as many calls as the provider received for the job, and `fleet usage`
shows them apart. Real worker processes, a real simulator (which logs each call's job
and delivery from X-Fleet-Job), a real Redis and a SQLite ledger."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from client import dispatch
from tests.fixtures import Workers, ledger_rows, url_of, wait_until
from workers.runtime.orphans import ORPHAN_ATTEMPTS_FROM
from workers.state import keys

KIMI = "litellm/kimi"  # paid: $0.56 in, $2.94 out per 1M tokens; on the subscription queue
UPSTREAM = "kimi"  # its name at the provider
VISIBILITY_S = 8  # a killed worker's job comes back this long after its delivery
MAX_TOKENS = 100
FLEET = str(Path(sys.executable).with_name("fleet"))


def aimed_at(sim_url: str, base: Path, path: Path) -> Path:
    """The test fleet's catalog with every HTTP provider pointed at `sim_url`, and a
    timeout long enough for a slow call to be killed mid-way."""
    data = yaml.safe_load(base.read_text())
    for provider in data["providers"].values():
        if provider["kind"] == "openai":
            provider["base_url"] = sim_url
            provider["timeout_s"] = 60
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def fleet(fleet_env, fresh_redis, sim, tmp_path, monkeypatch) -> Any:
    """One worker on the subscription queue, on a Redis database of its own, calling a
    simulator of its own, with a short visibility timeout; its ledger in tmp_path."""
    url = url_of(fresh_redis)
    catalog = aimed_at(sim.url, Path(fleet_env["FLEET_CATALOG"]), tmp_path / "catalog.yaml")
    env = {
        **fleet_env,
        "FLEET_BROKER_URL": url,
        "FLEET_CATALOG": str(catalog),
        "FLEET_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
        "FLEET_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
    }
    monkeypatch.setenv("FLEET_BROKER_URL", url)
    monkeypatch.setenv("FLEET_CATALOG", str(catalog))
    workers = Workers(env, tmp_path / "logs")
    try:
        workers.start("subscription", name="orphans", concurrency=2)
        workers.wait_ready()
        yield workers, env
    finally:
        workers.stop()


def calls_for(sim: Any, job_id: str) -> list[dict[str, Any]]:
    """The calls the provider received for the job, from its own log."""
    return [r for r in sim.requests() if r["job"] == job_id]


def test_calls_in_flight_when_their_worker_is_killed_are_billed_as_orphaned(
    fleet, sim, fresh_redis
) -> None:
    workers, env = fleet
    worker = workers.by_label["orphans"]
    # Given a provider that is slow to answer, and a job on the paid model
    sim.configure(models={UPSTREAM: {"latency_ms": 60_000}})
    handle = dispatch(
        {
            "task_class": "user_facing",
            "model": KIMI,
            "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "Summarise the quarter"}],
        }
    )
    # When its worker is killed -9 in the middle of the call, twice (the first redelivery
    # is killed mid-call too), and the next redelivery's call answers at once
    for delivery in (1, 2):

        def called(n: int = delivery) -> bool:
            return len(calls_for(sim, handle.id)) == n

        wait_until(called, 30, "the call")
        workers.kill(worker)
        if delivery == 2:
            sim.configure(models={UPSTREAM: {"latency_ms": 0}})
        workers.restart(worker)
    result = handle.get(timeout=VISIBILITY_S * 4)
    assert result.ok and result.model == KIMI
    # Then the provider received three calls for the job, from deliveries 1, 2 and 3
    calls = calls_for(sim, handle.id)
    assert [c["job_delivery"] for c in calls] == [1, 2, 3]
    # And the ledger holds three rows for it: the two killed calls, orphaned and
    # estimated, numbered apart from the answer's attempt 1 (1000 + 10 x message +
    # delivery), and the answer, as the Result has it
    rows = ledger_rows(env, handle.id)
    assert sorted(rows) == [1, ORPHAN_ATTEMPTS_FROM + 1, ORPHAN_ATTEMPTS_FROM + 2]
    assert [a.number for a in result.attempts] == [1]  # an orphan is in no Result
    billed = [r for r in rows.values() if r["outcome"] in ("ok", "error", "orphaned")]
    assert len(billed) == len(calls)
    assert rows[1]["outcome"] == "ok" and not rows[1]["tokens_estimated"]
    for number in (ORPHAN_ATTEMPTS_FROM + 1, ORPHAN_ATTEMPTS_FROM + 2):
        orphan = rows[number]
        assert (orphan["outcome"], orphan["model"], orphan["error_kind"]) == (
            "orphaned",
            KIMI,
            "worker_lost",
        )
        assert orphan["tokens_estimated"] and orphan["cost_source"] == "estimated"
        assert orphan["completion_tokens"] == MAX_TOKENS and orphan["prompt_tokens"] > 0
        expected = (orphan["prompt_tokens"] * 0.56 + MAX_TOKENS * 2.94) / 1e6
        assert orphan["cost_usd"] == pytest.approx(expected)
    # And no mark is left behind
    assert not fresh_redis.exists(keys.inflight(handle.id))
    # And `fleet usage` shows the orphaned calls apart, their cost labelled estimated
    usage_env = {
        "FLEET_LEDGER_URL": env["FLEET_LEDGER_URL"],
        "FLEET_BROKER_URL": env["FLEET_BROKER_URL"],
    }
    done = subprocess.run(
        [FLEET, "usage"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**{k: v for k, v in env.items() if not k.startswith("FLEET_")}, **usage_env},
    )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("orphaned calls"))
    orphan_cost = sum(rows[n]["cost_usd"] for n in rows if n > ORPHAN_ATTEMPTS_FROM)
    assert ": 2," in line and f"estimated cost ${orphan_cost:.6f}" in line


def test_a_worker_killed_mid_stream_ends_the_stream_and_its_call_is_billed(
    fleet, sim, fresh_redis
) -> None:
    import threading

    from router.errors import StreamInterrupted
    from router.results import Delta
    from workers.state import streams

    workers, env = fleet
    worker = workers.by_label["orphans"]
    # Given a streaming job whose provider writes a chunk every half second
    sim.configure(models={UPSTREAM: {"chunk_ms": 500}})
    handle = dispatch(
        {
            "task_class": "user_facing",
            "model": KIMI,
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "messages": [{"role": "user", "content": "Summarise the quarter in a few words"}],
        }
    )
    seen: list[Delta] = []
    stopped: list[StreamInterrupted] = []

    def read() -> None:
        try:
            seen.extend(p for p in handle.stream(timeout=60) if isinstance(p, Delta))
        except StreamInterrupted as exc:
            stopped.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    # When its worker is killed -9 once text has gone out, and comes back
    wait_until(lambda: len(seen) >= 2, 30, "the first deltas")
    workers.kill(worker)
    sim.configure(models={UPSTREAM: {"chunk_ms": 0}})
    workers.restart(worker)
    reader.join(60)
    # Then the reader is told the stream stopped, naming the job, and sees no text again
    assert stopped and stopped[0].result["kind"] == "worker_lost"
    assert stopped[0].result["job_id"] == handle.id
    records = streams.read(fresh_redis, handle.id, block_ms=None)
    written = "".join(r.delta.text for r in records if r.delta)
    assert written == "".join(d.text for d in seen) and records[-1].error is not None
    # And the job went on, unstreamed, to its Result
    result = handle.get(timeout=VISIBILITY_S * 4)
    assert result.ok and result.text and result.text.startswith(written)
    assert [c["stream"] for c in calls_for(sim, handle.id)] == [True, False]
    # And the killed call is billed, estimated, beside the call that answered
    rows = ledger_rows(env, handle.id)
    assert sorted(rows) == [1, ORPHAN_ATTEMPTS_FROM + 1]
    orphan = rows[ORPHAN_ATTEMPTS_FROM + 1]
    assert (orphan["outcome"], orphan["error_kind"]) == ("orphaned", "worker_lost")
    assert orphan["tokens_estimated"] and orphan["completion_tokens"] > 0
