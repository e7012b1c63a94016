"""A fleet-wide limit holds on the provider's clock, not only on Redis': two worker processes
saturate a model limited to 10 requests a minute, and no 60 s window of the requests the
provider (the simulator, a real HTTP server, stamping each on its arrival) received holds
more than 10, while the first minute's 10 slots are all used.

Slots are taken on Redis' clock and calls arrive later, by a time that varies: here the
first minute's calls carry 100K-token prompts and the next minute's short ones. Counted
on Redis' clock alone (FLEET_LIMIT_MARGIN_MS=0) this test fails: the provider saw more
than 10 calls within 60 s, the second minute's calls arriving as little as 59.9 s (quiet
machine) or 59.6 s (loaded) after the first minute's. The margin workers/state/limits.py
keeps is what holds it. The test runs a little over a minute.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from client import dispatch
from tests.fixtures import running_workers, url_of, wait_until
from tests.test_limits_fleet import LLAMA, write_catalog

UPSTREAM = LLAMA.split("/", 1)[1]  # the name the simulator sees
LIMIT = 10  # requests a minute
WINDOW_S = 60.0
JOBS = 2 * LIMIT  # the first minute's slots, and the next minute's


def only_llama(data: dict) -> None:
    """llama limited to LIMIT a minute and alone in the cost_free chain, so every job waits
    for its slot instead of moving on to another model."""
    next(m for m in data["models"] if m["id"] == LLAMA)["limits"] = {"requests_per_min": LIMIT}
    data["policy"]["chains"]["cost_free"] = [LLAMA]
    data["policy"]["max_wait_s"] = 300


@pytest.fixture
def two_workers(fleet_env, fresh_redis, tmp_path, monkeypatch):
    """Two worker processes on the free queue, on a broker database of their own."""
    url = url_of(fresh_redis)
    catalog = write_catalog(Path(fleet_env["FLEET_CATALOG"]), tmp_path, only_llama)
    env = {**fleet_env, "FLEET_BROKER_URL": url, "FLEET_CATALOG": str(catalog)}
    with running_workers(env, tmp_path / "logs", "free", ["clock0", "clock1"], 8):
        monkeypatch.setenv("FLEET_BROKER_URL", url)
        monkeypatch.setenv("FLEET_CATALOG", str(catalog))
        yield


def most_in_any_window(arrivals: list[float], window_s: float) -> int:
    """The most arrivals any window of `window_s` holds (a sliding window starting at each
    arrival is enough: the fullest window can always be moved to start at one)."""
    ordered = sorted(arrivals)
    return max(
        sum(1 for t in ordered[i:] if t < start + window_s) for i, start in enumerate(ordered)
    )


def job(text: str) -> dict:
    return {"task_class": "cost_free", "messages": [{"role": "user", "content": text}]}


def test_no_provider_minute_sees_more_than_the_limit(two_workers, simulator) -> None:
    started = time.time()
    # Given two workers and llama limited to 10 requests a minute, when the first minute's
    # 10 jobs carry long prompts (100K tokens: longer from their slot to the provider than
    # short ones, as in a fleet busy then quiet) and 10 short jobs follow, which wait for
    # the next minute's slots
    long = [dispatch(job(f"c{i} " + "lorem ipsum dolor sit amet " * 20_000)) for i in range(LIMIT)]
    wait_until(lambda: len(arrivals_since(simulator, started)) >= LIMIT, 30, "the long calls")
    short = [dispatch(job(f"c{i}")) for i in range(LIMIT, JOBS)]
    results = [h.get(timeout=WINDOW_S + 60) for h in long + short]
    assert all(r.ok and r.model == LLAMA for r in results), [r.error for r in results]
    arrivals = arrivals_since(simulator, started)
    assert len(arrivals) == JOBS  # one call each: none refused, none repeated
    # Then no 60 s of the provider's clock saw more than the limit
    gaps = [round(b - a, 3) for a, b in zip(arrivals, arrivals[LIMIT:], strict=False)]
    assert most_in_any_window(arrivals, WINDOW_S) <= LIMIT, f"call i to i+10, s apart: {gaps}"
    # And the limit was used: the first minute's slots were taken
    assert sum(1 for t in arrivals if t < arrivals[0] + WINDOW_S) >= LIMIT - 2


def arrivals_since(simulator, started: float) -> list[float]:
    """When llama's requests reached the simulator (its clock), in order."""
    return sorted(
        r["t"] for r in simulator.requests() if r["t"] >= started and r["model"] == UPSTREAM
    )


def test_the_window_count_is_right_on_its_own() -> None:
    # The check above, on known arrival times
    assert most_in_any_window([0, 1, 2, 59.9, 60, 61], 60) == 4
    assert most_in_any_window([0, 60, 120], 60) == 1
    assert most_in_any_window([0.0] * 3 + [59.999], 60) == 4
