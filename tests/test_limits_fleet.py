"""Live state end to end: real worker processes share one limit; a blocked chain waits or
fails fast with every reason."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis as redis_lib
import yaml

from client import dispatch
from router import NoRouteAvailable, load_catalog
from router.jobs import parse_job
from tests.fixtures import reset_live_state, running_workers, url_of
from workers.providers.registry import ProviderRegistry
from workers.runtime.step import Failed, Forward, advance
from workers.state.limits import FleetState, Slot

LLAMA = "openrouter/meta-llama/llama-3.1-405b-instruct:free"


def write_catalog(base: Path, tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(base.read_text())
    edit(data)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    load_catalog(path)
    return path


def limit_llama(rpm: int):
    def edit(data: dict) -> None:
        next(m for m in data["models"] if m["id"] == LLAMA)["limits"] = {"requests_per_min": rpm}

    return edit


@pytest.fixture
def limited_fleet(fleet_env, fresh_redis, tmp_path, monkeypatch):
    """Two worker processes on the free queue, on a broker database of their own, with
    llama limited to 5 requests a minute."""
    url = url_of(fresh_redis)
    catalog = write_catalog(Path(fleet_env["FLEET_CATALOG"]), tmp_path, limit_llama(5))
    env = {**fleet_env, "FLEET_BROKER_URL": url, "FLEET_CATALOG": str(catalog)}
    with running_workers(env, tmp_path / "logs", "free", ["limited0", "limited1"], 4):
        monkeypatch.setenv("FLEET_BROKER_URL", url)
        monkeypatch.setenv("FLEET_CATALOG", str(catalog))
        yield


def test_two_workers_never_exceed_a_models_requests_per_minute(limited_fleet, simulator) -> None:
    # Given two worker processes consuming the free queue and llama limited to 5/min
    started = time.time()
    # When 16 cost-free jobs (llama first) arrive at once
    handles = [
        dispatch({"task_class": "cost_free", "messages": [{"role": "user", "content": f"n{i}"}]})
        for i in range(16)
    ]
    results = [h.get(timeout=60) for h in handles]
    # Then the simulator saw at most 5 llama requests in the minute, and every job was
    # answered, the others by the next model of the chain
    llama_calls = [
        r
        for r in simulator.requests()
        if r["t"] >= started and r["model"] == "meta-llama/llama-3.1-405b-instruct:free"
    ]
    assert len(llama_calls) == 5
    assert all(r.ok for r in results)
    assert sum(r.model == LLAMA for r in results) == 5
    assert {r.model for r in results} - {LLAMA}
    assert time.time() - started < 60  # the whole test stayed inside one window


def test_a_fully_limited_chain_waits_for_the_earliest_slot_or_fails(
    fleet_env, fresh_redis, tmp_path
) -> None:
    client = fresh_redis

    def one_model_chain(max_wait: float):
        def edit(data: dict) -> None:
            limit_llama(1)(data)
            data["policy"]["chains"]["cost_free"] = [LLAMA]
            data["policy"]["max_wait_s"] = max_wait

        return edit

    job = {
        "id": "wait-1",
        "task_class": "cost_free",
        "messages": [{"role": "user", "content": "x"}],
    }
    for max_wait, expect in ((600, Forward), (10, Failed)):
        path = write_catalog(Path(fleet_env["FLEET_CATALOG"]), tmp_path, one_model_chain(max_wait))
        catalog = load_catalog(path)
        state = FleetState(client, catalog)
        client.flushdb()
        assert isinstance(state.admit("cost_free", LLAMA, 5), Slot)  # another worker took it
        registry = ProviderRegistry(catalog, 2, environ=fleet_env)
        step = advance(
            catalog,
            parse_job(job).model_dump(mode="json"),
            None,
            here="free",
            providers=registry,
            gate=state,
        )
        registry.close()
        assert isinstance(step, expect)
        if isinstance(step, Forward):
            # The job comes back when the window frees a slot, not before, not busy-looping
            assert step.queue == "free"
            margin_s = state.margin_ms / 1000  # a slot frees a window + margin after it
            assert 55 + margin_s < step.countdown_s < 61 + margin_s
            assert step.state.attempts == ()
        else:
            assert "no usable model" in (step.result.error or "")
            assert "requests/min" in (step.result.error or "")


def test_dispatch_fails_fast_when_every_model_is_cooled(fleet_app) -> None:
    catalog = load_catalog()
    client = redis_lib.Redis.from_url(fleet_app.conf.broker_url)
    state = FleetState(client, catalog)
    vision = catalog.policy.chains["vision"]
    try:
        for model in vision:
            state.cool(model, 3600, "circuit open")
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
        with pytest.raises(NoRouteAvailable) as caught:
            dispatch({"task_class": "vision", "messages": [{"role": "user", "content": [image]}]})
        assert [m for m, _ in caught.value.reasons] == vision
        assert all("cooldown until" in why for _, why in caught.value.reasons)
    finally:
        reset_live_state(client)
        client.close()
