"""Fleet-wide live state against a real redis-server: limits, cooldowns, circuits,
budgets and the subscription quota reserve."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from router.catalog import default_catalog_path, load_catalog
from router.results import Attempt
from workers.state.limits import FleetState, Slot

if TYPE_CHECKING:  # (typing.TypeIs is Python 3.13's)
    from typing_extensions import TypeIs

ZAI = "zai/glm-4.7"
LLAMA = "openrouter/meta-llama/llama-3.1-405b-instruct:free"
KIMI = "litellm/kimi"


def catalog_with(tmp_path: Path, edit) -> Any:
    data = yaml.safe_load(default_catalog_path().read_text())
    edit(data)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_catalog(path)


def model_entry(data: dict, model_id: str) -> dict:
    return next(m for m in data["models"] if m["id"] == model_id)


@pytest.fixture
def client(fresh_redis) -> Any:
    return fresh_redis


def admitted(answer: object) -> TypeIs[Slot]:
    return isinstance(answer, Slot)


def attempt(model: str, **fields: Any) -> Attempt:
    base = {"number": 1, "model": model, "queue": "free", "tier": "free", "outcome": "ok"}
    return Attempt(**{**base, **fields, "started_at": time.time()})


def failed(model: str, kind: str, action: str = "retry", retry_after: float | None = None):
    return attempt(
        model, outcome="error", error_kind=kind, action=action, retry_after_s=retry_after
    )


def test_a_retry_after_of_30s_is_not_cut_short_by_a_later_default_cooldown(client) -> None:
    state = FleetState(client, load_catalog())
    # Given a 429 with Retry-After: 30
    state.settle(ZAI, failed(ZAI, "rate_limited", retry_after=30), 0)
    # When another worker then sees a 429 without Retry-After (default 5 s)
    state.settle(ZAI, failed(ZAI, "rate_limited"), 0)
    # Then the model stays cooled for the full 30 s, fleet-wide
    block = state.block("user_facing", ZAI)
    assert block is not None and "rate limited" in block.reason
    assert block.until == pytest.approx(time.time() + 30, abs=1.5)
    assert client.pttl(f"fleet:cooldown:{ZAI}") > 28_000
    # And a longer cooldown does extend it
    state.cool(ZAI, 60, "rate limited")
    block = state.block("user_facing", ZAI)
    assert block is not None and block.until == pytest.approx(time.time() + 60, abs=1.5)


def test_default_cooldown_for_a_429_without_retry_after(client) -> None:
    state = FleetState(client, load_catalog())
    state.settle(LLAMA, failed(LLAMA, "rate_limited"), 0)
    block = state.block("cost_free", LLAMA)
    assert block is not None and block.until == pytest.approx(time.time() + 5, abs=1.5)


def test_requests_per_minute_limit_is_shared_and_exact(client, tmp_path) -> None:
    catalog = catalog_with(
        tmp_path, lambda d: model_entry(d, LLAMA).update(limits={"requests_per_min": 5})
    )
    # Two FleetState objects = two workers; they share one window in Redis.
    one, two = FleetState(client, catalog), FleetState(client, catalog)
    admitted_ = [admitted(s.admit("cost_free", LLAMA, 10)) for s in [one, two] * 5]
    assert admitted_.count(True) == 5
    block = one.admit("cost_free", LLAMA, 10)
    assert not admitted(block) and "requests/min" in block.reason
    assert block.until == pytest.approx(time.time() + 60, abs=2)


def test_a_slot_is_free_again_only_a_window_and_the_margin_after_it_was_taken(
    client, tmp_path
) -> None:
    from workers.state import keys

    catalog = catalog_with(
        tmp_path, lambda d: model_entry(d, LLAMA).update(limits={"requests_per_min": 1})
    )
    window = keys.window("model", LLAMA, "req", "min")
    seconds, micros = client.time()
    redis_now_ms = seconds * 1000 + micros // 1000
    # Given the model's one slot a minute taken 60.5 s ago on Redis' clock
    client.zadd(window, {"earlier-call": redis_now_ms - 60_500})
    # Then, counting a margin of 1 s, the slot is still taken, for another half second
    block = FleetState(client, catalog, margin_ms=1000).admit("cost_free", LLAMA, 10)
    assert not admitted(block) and "requests/min" in block.reason
    assert block.until == pytest.approx(time.time() + 0.5, abs=0.25)
    # While counting the bare minute it would be taken again at once
    assert admitted(FleetState(client, catalog, margin_ms=0).admit("cost_free", LLAMA, 10))


def test_the_margin_comes_from_the_environment_and_bad_values_name_the_valid_ones() -> None:
    from router.errors import ConfigError
    from workers.config import DEFAULT_LIMIT_MARGIN_MS, limit_margin_ms

    assert limit_margin_ms({}) == DEFAULT_LIMIT_MARGIN_MS
    assert limit_margin_ms({"FLEET_LIMIT_MARGIN_MS": "250"}) == 250
    assert limit_margin_ms({"FLEET_LIMIT_MARGIN_MS": "0"}) == 0
    for bad in ("-1", "1.5", "soon", "60001"):
        with pytest.raises(ConfigError, match="whole number of milliseconds from 0 to 60000"):
            limit_margin_ms({"FLEET_LIMIT_MARGIN_MS": bad})


def test_provider_account_limit_spans_its_models(client) -> None:
    # OpenRouter's free models share one account: 20 requests/min across all of them.
    state = FleetState(client, load_catalog())
    hermes = "openrouter/nousresearch/hermes-3-llama-3.1-405b:free"
    results = [state.admit("cost_free", m, 10) for m in [LLAMA, hermes] * 10]
    assert all(admitted(r) for r in results)
    block = state.admit("cost_free", hermes, 10)
    assert not admitted(block) and "provider limit requests/min" in block.reason


def test_tokens_per_minute_limit(client, tmp_path) -> None:
    catalog = catalog_with(
        tmp_path, lambda d: model_entry(d, LLAMA).update(limits={"tokens_per_min": 1000})
    )
    state = FleetState(client, catalog)
    assert admitted(state.admit("cost_free", LLAMA, 600))
    state.settle(LLAMA, attempt(LLAMA, prompt_tokens=600, completion_tokens=300), 0)
    block = state.admit("cost_free", LLAMA, 200)  # 600 + 300 + 200 > 1000
    assert not admitted(block) and "tokens/min" in block.reason
    assert admitted(state.admit("cost_free", LLAMA, 50))  # 950: still fits


def test_quota_reserve_keeps_the_last_20_percent_for_user_facing(client, tmp_path) -> None:
    catalog = catalog_with(
        tmp_path,
        lambda d: model_entry(d, ZAI).update(limits={"quota": {"requests": 10, "window_h": 5}}),
    )
    state = FleetState(client, catalog)
    # Given 8 of 10 requests of the 5-hour quota used by creative jobs
    assert all(admitted(state.admit("creative", ZAI, 10)) for _ in range(8))
    # Then other classes skip the model, keeping the reserve for user-facing work
    block = state.block("creative", ZAI)
    assert block is not None and "quota reserve" in block.reason
    assert "user_facing" in block.reason
    # While user-facing jobs still reach it, up to the whole quota
    assert state.block("user_facing", ZAI) is None
    assert admitted(state.admit("user_facing", ZAI, 10))
    assert admitted(state.admit("user_facing", ZAI, 10))
    assert not admitted(state.admit("user_facing", ZAI, 10))


def test_circuit_opens_after_repeated_failures_then_one_probe_decides(client, tmp_path) -> None:
    catalog = catalog_with(
        tmp_path,
        lambda d: d["policy"].update(
            cooldowns={"circuit_failures": 3, "circuit_window_s": 60, "circuit_open_s": 1}
        ),
    )
    state = FleetState(client, catalog)
    for _ in range(2):
        state.settle(LLAMA, failed(LLAMA, "server_error"), 0)
    assert state.block("cost_free", LLAMA) is None
    state.settle(LLAMA, failed(LLAMA, "timeout"), 0)
    block = state.block("cost_free", LLAMA)
    assert block is not None and "circuit open" in block.reason
    time.sleep(1.2)
    # Half-open: exactly one caller is admitted, as the probe
    assert state.block("cost_free", LLAMA) is None
    answers = [state.admit("cost_free", LLAMA, 10) for _ in range(3)]
    assert answers[0] == Slot(probe=True)
    blocked = [a.reason for a in answers[1:] if not admitted(a)]
    assert blocked == ["circuit half-open: a probe call is deciding"] * 2
    block = state.block("cost_free", LLAMA)
    assert block is not None and "probe" in block.reason
    # A failed probe re-opens the circuit at once
    state.settle(LLAMA, failed(LLAMA, "server_error"), 0, probe=True)
    block = state.block("cost_free", LLAMA)
    assert block is not None and "circuit open" in block.reason
    time.sleep(1.2)
    assert state.admit("cost_free", LLAMA, 10) == Slot(probe=True)
    # A successful probe closes it
    state.settle(LLAMA, attempt(LLAMA), 0, probe=True)
    assert state.block("cost_free", LLAMA) is None
    assert state.admit("cost_free", LLAMA, 10) == state.admit("cost_free", LLAMA, 10) == Slot()


def test_budget_cap_skips_the_model_until_the_next_period(client, tmp_path) -> None:
    catalog = catalog_with(
        tmp_path,
        lambda d: d["policy"].update(
            budgets=[{"scope": "model", "name": KIMI, "usd_per_day": 0.01}]
        ),
    )
    state = FleetState(client, catalog)
    kimi = attempt(KIMI, prompt_tokens=10_000, completion_tokens=2_000)
    state.settle(KIMI, kimi, 0.0056 + 0.00588)  # 10K in x $0.56 + 2K out x $2.94 per 1M
    block = state.block("user_facing", KIMI)
    assert block is not None and "budget: $0.01 of $0.01 per day" in block.reason
    assert block.until is not None and block.until - time.time() <= 86_400


def test_unusable_model_is_cooled_fleet_wide(client) -> None:
    state = FleetState(client, load_catalog())
    state.settle(ZAI, failed(ZAI, "auth", action="next"), 0)
    block = state.block("user_facing", ZAI)
    assert block is not None and "auth" in block.reason


# --- rest for one capability ------------------------------------------------------------

MINIMAX = "minimax/MiniMax-M2.1"
TOOLS = frozenset({"tools"})


def test_a_capability_rest_blocks_the_model_for_jobs_needing_it_and_not_for_others(
    client,
) -> None:
    state = FleetState(client, load_catalog())
    # Given zai's provider refused tools although the catalog claims them
    state.rest_capability(ZAI, "tools")
    # Then a tool job finds the model blocked, for the policy's hour, with why
    block = state.block("user_facing", ZAI, needs=TOOLS)
    assert block is not None
    assert block.reason == "refused tools"
    assert block.until is not None and 3590 < block.until - time.time() <= 3600
    assert 3590_000 < client.pttl(f"fleet:lacks:{ZAI}:tools") <= 3600_000
    # And a job without tools, or needing something else, still gets it
    assert state.block("user_facing", ZAI) is None
    assert state.block("user_facing", ZAI, needs=frozenset({"json_object"})) is None
    # And other models are not touched
    assert state.blocks("user_facing", [ZAI, MINIMAX], needs=TOOLS).keys() == {ZAI}
    assert state.model_status(ZAI)["refused"] == ["tools"]
    assert state.model_status(MINIMAX)["refused"] == []


def test_a_capability_rest_lasts_capability_rest_s(client, tmp_path) -> None:
    def edit(data: dict) -> None:
        data["policy"]["cooldowns"]["capability_rest_s"] = 0.3

    state = FleetState(client, catalog_with(tmp_path, edit))
    state.rest_capability(ZAI, "json_schema")
    needs = frozenset({"json_schema", "tools"})
    assert state.block("user_facing", ZAI, needs=needs) is not None
    time.sleep(0.5)
    assert state.block("user_facing", ZAI, needs=needs) is None


def test_the_longer_of_a_cooldown_and_a_capability_rest_is_the_block(client) -> None:
    state = FleetState(client, load_catalog())
    state.cool(ZAI, 30, "rate limited")
    # A cooldown alone: the tool job sees it
    block = state.block("user_facing", ZAI, needs=TOOLS)
    assert block is not None and block.reason.startswith("cooldown until")
    # A rest for tools outlasts it: the tool job waits for the rest, others the cooldown
    state.rest_capability(ZAI, "tools")
    block = state.block("user_facing", ZAI, needs=TOOLS)
    assert block is not None and block.reason == "refused tools"
    plain = state.block("user_facing", ZAI)
    assert plain is not None and plain.reason.startswith("cooldown until")


def test_the_dispatchers_view_skips_a_resting_model_for_jobs_that_need_it(client) -> None:
    from workers.state.live import LiveView

    state = FleetState(client, load_catalog())
    view = LiveView(state, cache_s=60)
    assert view.blocks("user_facing", [ZAI, MINIMAX], TOOLS) == {}  # cached: not resting
    state.rest_capability(ZAI, "tools")
    # A job with other needs is looked at afresh (its own cache entry) and not blocked
    assert view.blocks("user_facing", [ZAI, MINIMAX]) == {}
    # A fresh view sees the rest for tool jobs only
    view = LiveView(state)
    assert [m for m in view.blocks("user_facing", [ZAI, MINIMAX], TOOLS)] == [ZAI]
    assert view.blocks("user_facing", [ZAI, MINIMAX]) == {}


def test_dispatch_starts_a_tool_job_past_a_model_resting_for_tools(client, monkeypatch) -> None:
    from client.dispatch import first_usable
    from router.jobs import parse_job
    from router.policy import RouteQuery, route
    from tests.fixtures import url_of
    from workers.state.live import forget_views

    monkeypatch.setenv("FLEET_STATE_URL", url_of(client))
    forget_views()
    catalog = load_catalog()
    job = parse_job({"task_class": "user_facing", "messages": [{"role": "user", "content": "hi"}]})
    tool_route = route(catalog, RouteQuery(task_class="user_facing", needs=TOOLS))
    plain_route = route(catalog, RouteQuery(task_class="user_facing"))
    FleetState(client, catalog).rest_capability(ZAI, "tools")
    try:
        assert first_usable(catalog, job, tool_route).model == MINIMAX
        assert first_usable(catalog, job, plain_route).model == ZAI
    finally:
        forget_views()
