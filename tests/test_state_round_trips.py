"""The live-state checks of one delivery cost one Redis round trip (admit.lua looks at
cooldown, circuit, budgets and windows, and takes the slot and any probe), and settling
costs one write-only pipeline; the circuit rule stays: one probe decides an open circuit."""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml

from router.catalog import default_catalog_path, load_catalog
from router.results import Attempt
from router.slots import Block
from workers.state.limits import FleetState, Slot

LLAMA = "openrouter/meta-llama/llama-3.1-405b-instruct:free"  # provider request windows
KIMI = "litellm/kimi"  # paid, under a budget


@pytest.fixture
def client(fresh_redis) -> Any:
    return fresh_redis


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
    return Attempt(
        number=1,
        model=model,
        queue="free",
        tier="free",
        outcome="ok",
        started_at=time.time(),
        prompt_tokens=10,
        completion_tokens=5,
    )


def test_a_delivery_costs_one_round_trip_to_check_and_take_and_one_to_count(client) -> None:
    state = FleetState(client, load_catalog())
    # LLAMA: two request windows (one atomic admission), nothing to count after a free
    # call; KIMI: no window, spend counters to add to after a paid one
    for model, cost, after in ((LLAMA, 0.0, 1), (KIMI, 0.01, 2)):
        state.admit("cost_free", model, 10)  # the script loaded
        count = trips(client)
        assert state.admit("cost_free", model, 10) == Slot()
        assert count[0] == 1  # cooldown, circuit, probe, budgets, windows, the slot: one
        state.settle(model, ok(model), cost)
        assert count[0] == after, model  # + the counts, write-only, when there are any


def test_a_redis_that_lost_its_scripts_is_sent_them_again(client) -> None:
    state = FleetState(client, load_catalog())
    assert state.admit("cost_free", LLAMA, 10) == Slot()
    client.script_flush()  # as after a restart
    assert state.admit("cost_free", LLAMA, 10) == Slot()
    assert state.block("cost_free", LLAMA) is None


def test_a_plain_success_leaves_a_circuit_opened_meanwhile_to_its_probe(client, tmp_path) -> None:
    data = yaml.safe_load(default_catalog_path().read_text())
    data["policy"]["cooldowns"] = {
        "rate_limited_s": 5,
        "circuit_failures": 2,
        "circuit_window_s": 60,
        "circuit_open_s": 1,
    }
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    state, other = FleetState(client, load_catalog(path)), FleetState(client, load_catalog(path))
    failed = Attempt(
        number=1,
        model=LLAMA,
        queue="free",
        tier="free",
        outcome="error",
        error_kind="server_error",
        action="retry",
        started_at=time.time(),
    )
    # Given a call let through while the circuit was closed
    assert state.admit("cost_free", LLAMA, 10) == Slot(probe=False)
    # When other workers' failures open the circuit during that call
    other.settle(LLAMA, failed, 0)
    other.settle(LLAMA, failed, 0)
    # Then its success does not close the circuit: the probe will decide
    state.settle(LLAMA, ok(LLAMA), 0)
    block = state.block("cost_free", LLAMA)
    assert block is not None and "circuit open" in block.reason
    time.sleep(1.2)
    assert state.block("cost_free", LLAMA) is None  # half-open, nobody probing yet
    probe = state.admit("cost_free", LLAMA, 10)
    assert probe == Slot(probe=True) and isinstance(other.admit("cost_free", LLAMA, 10), Block)
    state.settle(LLAMA, ok(LLAMA), 0, probe=True)  # the probe's success closes it
    assert state.block("cost_free", LLAMA) is None
    assert not client.exists(f"fleet:circuit:open:{LLAMA}")


def test_a_delivery_starts_with_one_round_trip_that_counts_it_and_takes_its_slot(client) -> None:
    from workers.state import deliveries, keys

    state = FleetState(client, load_catalog())
    deliveries.begin(client, "warm", 0, state.admit_call("cost_free", LLAMA, 10))  # loaded
    window = keys.window("provider", "openrouter", "req", "min")  # OpenRouter's account
    taken = client.zcard(window)
    count = trips(client)
    delivery = deliveries.begin(client, "job-1", 0, state.admit_call("cost_free", LLAMA, 10))
    assert count[0] == 1
    assert (delivery.count, delivery.finished, delivery.admitted) == (1, False, Slot())
    assert client.zcard(window) == taken + 1
    # A stale copy of a finished job takes no slot
    client.set(keys.result("job-2"), '{"status": "SUCCESS", "result": {}}')
    stale = deliveries.begin(client, "job-2", 0, state.admit_call("cost_free", LLAMA, 10))
    assert stale.finished and stale.admitted is None
    assert client.zcard(window) == taken + 1
