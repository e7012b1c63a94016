"""The live-state checks of one delivery cost one Redis round trip in the common case
(block() pipelines its reads; take_probe() and settle() reuse what block() saw), and
the circuit rule stays: one probe decides an open circuit."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis as redis_lib
import yaml

from router.catalog import default_catalog_path, load_catalog
from router.results import Attempt
from workers.state import FleetState

LLAMA = "openrouter/meta-llama/llama-3.1-405b-instruct:free"  # provider request windows
KIMI = "litellm/kimi"  # paid, under a budget


@pytest.fixture
def client(redis_server) -> Any:
    client = redis_lib.Redis.from_url(redis_server.url.replace("/0", "/6"))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def trips(client: Any) -> list[int]:
    """Counts connection checkouts: one per command or pipeline sent."""
    count = [0]
    pool = client.connection_pool
    get = pool.get_connection

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return get(*args, **kwargs)

    pool.get_connection = counted
    return count


def ok(model: str) -> Attempt:
    return Attempt(number=1, model=model, queue="free", tier="free", outcome="ok",
                   started_at=time.time(), prompt_tokens=10, completion_tokens=5)  # fmt: skip


def test_a_delivery_costs_one_round_trip_to_check_and_one_to_count(client) -> None:
    state = FleetState(client, load_catalog())
    # LLAMA: two request windows (one atomic admission); KIMI: no window, a budget to count
    for model, cost in ((LLAMA, 0.0), (KIMI, 0.01)):
        state.block("cost_free", model, 10)  # scripts loaded
        count = trips(client)
        assert state.block("cost_free", model, 10) is None
        assert count[0] == 1  # cooldown, circuit, probe, budgets, windows: one pipeline
        assert state.admit("cost_free", model, 10) is None
        assert state.take_probe(model)  # block() just saw the circuit closed
        state.settle(model, ok(model), cost)
        assert count[0] == 2, model  # + the admission script, or + the spend counters


def test_a_plain_success_leaves_a_circuit_opened_meanwhile_to_its_probe(client, tmp_path) -> None:
    data = yaml.safe_load(default_catalog_path().read_text())
    data["policy"]["cooldowns"] = {
        "rate_limited_s": 5, "circuit_failures": 2, "circuit_window_s": 60, "circuit_open_s": 1,
    }  # fmt: skip
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    state, other = FleetState(client, load_catalog(path)), FleetState(client, load_catalog(path))
    failed = Attempt(number=1, model=LLAMA, queue="free", tier="free", outcome="error",
                     error_kind="server_error", action="retry", started_at=time.time())  # fmt: skip
    # Given a call let through while the circuit was closed
    assert state.block("cost_free", LLAMA) is None and state.take_probe(LLAMA)
    # When other workers' failures open the circuit during that call
    other.settle(LLAMA, failed, 0)
    other.settle(LLAMA, failed, 0)
    # Then its success does not close the circuit: the probe will decide
    state.settle(LLAMA, ok(LLAMA), 0)
    block = state.block("cost_free", LLAMA)
    assert block is not None and "circuit open" in block.reason
    time.sleep(1.2)
    assert state.block("cost_free", LLAMA) is None  # half-open, nobody probing yet
    assert state.take_probe(LLAMA) and not other.take_probe(LLAMA)
    state.settle(LLAMA, ok(LLAMA), 0)  # the probe's success closes it
    assert state.block("cost_free", LLAMA) is None
    assert not client.exists(f"fleet:circuit:open:{LLAMA}")
