"""Workers announce what they can serve (workers/runtime/serving.py), and live state skips
what no live worker of a queue can serve (workers/state/serving.py): dispatch starts a job
at a model that can answer it, a chain with none fails at dispatch with every model's fix,
`fleet status` says why, and a queue nobody announced on blocks nothing.

The first tests drive the announcer in this process against a real Redis; the last ones
run real worker processes, each with its own environment (a key unset, a local model
missing), against the simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from client import dispatch
from client.dispatch import first_usable
from gateway.metrics import LiveStateCollector
from router import NoRouteAvailable, load_catalog
from router.catalog import Catalog
from router.jobs import parse_job
from router.policy import route_job
from tests.fixtures import Databases, url_of, wait_until
from tests.test_metrics import scrape
from tests.test_models_cli import lay_out_in_hub_cache
from workers.ops.pools import worker_argv
from workers.ops.supervisor import Supervisor
from workers.runtime.celery_app import create_app
from workers.runtime.serving import Announcer
from workers.sim.simulated import PLACEHOLDER_KEY, simulated_env
from workers.sim.simulator import Simulator
from workers.state import keys
from workers.state.limits import FleetState

FLEET = str(Path(sys.executable).with_name("fleet"))
ROOT = Path(__file__).resolve().parents[1]
READY = " ready."
ZAI, MINIMAX = "zai/glm-4.7", "minimax/MiniMax-M2.1"
LLAMA = "openrouter/meta-llama/llama-3.1-405b-instruct:free"
VISION = ("minimax/MiniMax-Vision-Video-01", "openrouter/nvidia/nemotron-nano-12b-v2-vl:free")
QWEN_MLX = "local/qwen3-mlx"
NO_ZAI_KEY = "no key: set ZAI_API_KEY on the subscription workers"
QWEN_MISSING = "model missing: run `fleet models pull local/qwen3-mlx` on the local workers"


def ask(task_class: str) -> dict[str, Any]:
    return {"task_class": task_class, "messages": [{"role": "user", "content": "hello"}]}


def keys_env(catalog: Catalog, *unset: str, **extra: str) -> dict[str, str]:
    """Every provider's key set (placeholders) but `unset`; no HF_ setting but `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    for provider in catalog.providers.values():
        if provider.api_key_env:
            env[provider.api_key_env] = PLACEHOLDER_KEY
    for name in unset:
        env.pop(name, None)
    return {**env, **extra}


def announcer(
    client: Any, catalog: Catalog, queue: str, env: dict[str, str], name: str, lapse_s: float = 4
) -> Announcer:
    found = Announcer(catalog, [queue], client, lapse_s, env)
    found.process = name  # as another process would
    return found


# --- the announcement and live state, in this process -----------------------------------


def test_a_model_no_live_worker_can_serve_is_blocked_until_one_can(fresh_redis) -> None:
    catalog = load_catalog()
    state = FleetState(fresh_redis, catalog)
    models = [ZAI, MINIMAX]
    # Given no worker has announced: nothing is blocked (jobs wait on their queue)
    assert state.blocks("user_facing", models) == {}
    # When the only worker of the subscription queue lacks ZAI_API_KEY
    keyless = announcer(fresh_redis, catalog, "subscription", keys_env(catalog, "ZAI_API_KEY"), "a")
    keyless.announce()
    # Then zai is blocked for good (no wait frees it), with the fix; minimax is not
    found = state.blocks("user_facing", models)
    assert set(found) == {ZAI}
    assert (found[ZAI].reason, found[ZAI].until) == (NO_ZAI_KEY, None)
    assert state.model_status(ZAI)["unservable"] == {"kind": "no_key", "reason": NO_ZAI_KEY}
    assert state.model_status(MINIMAX)["unservable"] is None
    # and once a worker that has the key joins, zai can be served again
    announcer(fresh_redis, catalog, "subscription", keys_env(catalog), "b").announce()
    assert state.blocks("user_facing", models) == {}
    assert state.model_status(ZAI)["unservable"] is None


def test_a_local_model_is_missing_unless_at_its_path_or_in_the_hub_cache(
    fresh_redis, tiny_model_dir: Path, tmp_path: Path
) -> None:
    catalog = load_catalog()  # the shipped catalog: its local models are hub ids
    state = FleetState(fresh_redis, catalog)
    hf_home = tmp_path / "hf"
    env = keys_env(catalog, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    local = [m.id for m in catalog.models if m.queue == "local"]
    # Given a local worker with an empty hub cache
    announcer(fresh_redis, catalog, "local", env, "a").announce()
    found = state.blocks("heartbeat", local)
    # Then every MLX model is missing, with the command that fetches it; the Ollama model,
    # which needs no key and no file, is not
    mlx = {m.id for m in catalog.models if catalog.providers[m.provider].kind == "mlx"}
    assert set(found) == mlx and "ollama/nomic-embed-text" in local
    assert found[QWEN_MLX].reason == QWEN_MISSING
    assert state.model_status(QWEN_MLX)["unservable"]["kind"] == "model_missing"
    gauge = scrape(
        LiveStateCollector(create_app({"FLEET_BROKER_URL": url_of(fresh_redis)}), state, catalog)
    )
    assert gauge["fleet_model_state"][(("model", QWEN_MLX), ("state", "model_missing"))] == 1
    assert gauge["fleet_model_state"][(("model", QWEN_MLX), ("state", "ok"))] == 0
    # When the model is laid out in the hub cache, as `fleet models pull` leaves it
    lay_out_in_hub_cache(tiny_model_dir, hf_home, catalog.model(QWEN_MLX).upstream)
    announcer(fresh_redis, catalog, "local", env, "a").announce()  # a fresh check
    # Then it is served again
    assert QWEN_MLX not in state.blocks("heartbeat", local)


def test_an_announcement_ends_a_lapse_after_its_last_beat(fresh_redis) -> None:
    catalog = load_catalog()
    state = FleetState(fresh_redis, catalog)
    env = keys_env(catalog, "ZAI_API_KEY")
    announcer(fresh_redis, catalog, "subscription", env, "dead", lapse_s=0.5).announce()
    assert ZAI in state.blocks("user_facing", [ZAI])
    time.sleep(0.6)
    assert state.blocks("user_facing", [ZAI]) == {}
    # and the next worker's announcement drops the lapsed one
    announcer(fresh_redis, catalog, "subscription", keys_env(catalog), "live").announce()
    assert fresh_redis.hkeys(keys.serving("subscription")) == [b"live"]
    assert fresh_redis.pttl(keys.serving("subscription")) > 0


def test_a_look_at_live_state_stays_one_round_trip(fresh_redis) -> None:
    from tests.test_state_round_trips import trips

    catalog = load_catalog()
    state = FleetState(fresh_redis, catalog)
    env = keys_env(catalog, "ZAI_API_KEY")
    announcer(fresh_redis, catalog, "subscription", env, "a").announce()
    models = [h.model for h in route_job(catalog, parse_job(ask("user_facing"))).chain]
    state.blocks("user_facing", models, needs=frozenset({"tools"}))  # the scripts loaded
    count = trips(fresh_redis)
    found = state.blocks("user_facing", models, needs=frozenset({"tools"}))
    assert count[0] == 1 and set(found) == {ZAI}


@pytest.fixture
def dispatcher(fresh_redis, monkeypatch: pytest.MonkeyPatch) -> Any:
    """This process as a dispatcher on a Redis of its own, its live view starting empty."""
    from workers.state.live import forget_views

    forget_views()
    monkeypatch.setenv("FLEET_BROKER_URL", url_of(fresh_redis))
    monkeypatch.delenv("FLEET_STATE_URL", raising=False)
    monkeypatch.delenv("FLEET_CATALOG", raising=False)
    yield fresh_redis
    forget_views()


def test_dispatch_starts_a_job_past_a_model_nobody_can_serve(dispatcher) -> None:
    catalog = load_catalog()
    job = parse_job(ask("user_facing"))
    decision = route_job(catalog, job)
    assert first_usable(catalog, job, decision).model == ZAI  # nobody announced yet
    env = keys_env(catalog, "ZAI_API_KEY")
    announcer(dispatcher, catalog, "subscription", env, "a").announce()
    time.sleep(1.05)  # the dispatcher's view is a second old at most
    assert first_usable(catalog, job, decision).model == MINIMAX


def test_a_chain_nobody_can_serve_fails_at_dispatch_with_each_fix(dispatcher) -> None:
    catalog = load_catalog()
    env = keys_env(catalog, "MINIMAX_API_KEY", "OPENROUTER_API_KEY")
    announcer(dispatcher, catalog, "vision", env, "a").announce()
    started = time.monotonic()
    with pytest.raises(NoRouteAvailable) as refused:
        dispatch(ask("vision"))
    assert time.monotonic() - started < 1.0  # no wait for a slot that never comes
    message = str(refused.value)
    assert "no key: set MINIMAX_API_KEY on the vision workers" in message
    assert "no key: set OPENROUTER_API_KEY on the vision workers" in message
    assert all(model in message for model in VISION)
    assert not [k for k in dispatcher.keys("vision*")]  # nothing queued


# --- real worker processes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(
    _databases: Databases,
    module_simulator: Simulator,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, str], Any, Simulator]]:
    """Real workers on a Redis database of their own, all but the free one missing
    something: the subscription worker ZAI_API_KEY and MINIMAX_API_KEY, the vision worker
    both of its providers' keys, the local worker local/qwen3-mlx (a hub id its empty hub
    cache lacks)."""
    data = tmp_path_factory.mktemp("serving")
    database = _databases.fresh()
    client = next(database)
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "HF_"))},
        **simulated_env(module_simulator.url, tiny_model_dir, data / "data"),
        "FLEET_BROKER_URL": url_of(client),
        "FLEET_LEDGER_URL": f"sqlite:///{data / 'ledger.db'}",
        "FLEET_WORKER_LAPSE_S": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(data / "hf"),
        "PYTHONPATH": str(ROOT),
    }
    path = Path(base["FLEET_CATALOG"])
    shaped = yaml.safe_load(path.read_text())
    for model in shaped["models"]:
        if model["id"] == QWEN_MLX:
            model["upstream"] = load_catalog().model(QWEN_MLX).upstream  # not in the cache
    path.write_text(yaml.safe_dump(shaped, sort_keys=False))
    without = {
        "subscription": ("ZAI_API_KEY", "MINIMAX_API_KEY"),
        "vision": ("MINIMAX_API_KEY", "OPENROUTER_API_KEY"),
        "local": (),
        "free": (),
    }
    sups = []
    try:
        for queue, unset in without.items():
            env = {k: v for k, v in base.items() if k not in unset}
            sup = Supervisor(data / f"logs-{queue}", env)
            sups.append(sup)
            argv = worker_argv([queue], pool="threads", concurrency=2, name=f"serving-{queue}")
            sup.start(queue, argv, READY, cwd=ROOT)
        for sup in sups:
            sup.wait_ready(90)
        yield base, client, module_simulator
    finally:
        for sup in sups:
            sup.stop(20)
        next(database, None)  # the database emptied and handed back


@pytest.fixture
def as_dispatcher(
    fleet: tuple[dict[str, str], Any, Simulator], monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, str], Any, Simulator]:
    """This process as the fleet's dispatcher, once every worker has announced."""
    from workers.state.live import forget_views

    env, client, sim = fleet
    for key in ("FLEET_BROKER_URL", "FLEET_CATALOG"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("FLEET_STATE_URL", raising=False)
    forget_views()
    sim.reset()
    state = FleetState(client, load_catalog(env["FLEET_CATALOG"]))
    watched = [ZAI, MINIMAX, *VISION, QWEN_MLX]
    wait_until(
        lambda: set(state.blocks("user_facing", watched)) == set(watched),
        10,
        "every worker's announcement",
    )
    return fleet


def catalog_of(fleet: tuple[dict[str, str], Any, Simulator]) -> Catalog:
    return load_catalog(fleet[0]["FLEET_CATALOG"])


@pytest.mark.slow
def test_a_job_goes_straight_to_a_model_its_workers_can_serve(as_dispatcher) -> None:
    from workers.runtime.celery_app import get_app

    _, _, sim = as_dispatcher
    # fast_general's chain: minimax (subscription: no worker there has its key), then
    # OpenRouter's llama on the free queue
    result = dispatch(ask("fast_general"), app=get_app()).get(timeout=30)
    assert result.ok and result.model == LLAMA
    assert [(a.model, a.outcome) for a in result.attempts] == [(LLAMA, "ok")]  # none on minimax
    asked = {r["model"] for r in sim.requests()}
    assert asked == {catalog_of(as_dispatcher).model(LLAMA).upstream}


@pytest.mark.slow
def test_a_chain_no_live_worker_can_serve_fails_at_once(as_dispatcher) -> None:
    started = time.monotonic()
    with pytest.raises(NoRouteAvailable) as refused:
        dispatch(ask("vision"))
    assert time.monotonic() - started < 1.0
    assert "no key: set MINIMAX_API_KEY on the vision workers" in str(refused.value)
    assert "no key: set OPENROUTER_API_KEY on the vision workers" in str(refused.value)


@pytest.mark.slow
def test_status_says_no_key_and_model_missing_where_it_said_ok(as_dispatcher) -> None:
    env, _, _ = as_dispatcher
    done = subprocess.run(
        [FLEET, "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    models = {m["model"]: m for m in json.loads(done.stdout)["models"]}
    assert models[ZAI]["unservable"] == {"kind": "no_key", "reason": NO_ZAI_KEY}
    assert models[QWEN_MLX]["unservable"] == {"kind": "model_missing", "reason": QWEN_MISSING}
    assert models[LLAMA]["unservable"] is None
    assert models["local/phi4-mini-local"]["unservable"] is None  # at its path
    human = subprocess.run([FLEET, "status"], env=env, capture_output=True, text=True).stdout
    # (each as the start of its state cell: the table wraps what follows)
    assert "no key: set ZAI_API_KEY" in human and "model missing: run `fleet models" in human


@pytest.mark.slow
def test_a_worker_that_stops_beating_stops_blocking(
    fresh_redis, sim: Simulator, tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "HF_"))},
        **simulated_env(sim.url, tiny_model_dir, tmp_path / "data"),
        "FLEET_BROKER_URL": url_of(fresh_redis),
        "FLEET_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "FLEET_WORKER_LAPSE_S": "1",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("ZAI_API_KEY")
    state = FleetState(fresh_redis, load_catalog(env["FLEET_CATALOG"]))
    sup = Supervisor(tmp_path / "logs", env)
    worker = sup.start("keyless", worker_argv(["subscription"], pool="threads", name="k"), READY)
    try:
        sup.wait_ready(90)
        # Given the only subscription worker, without ZAI_API_KEY: zai is blocked
        wait_until(lambda: state.block("user_facing", ZAI), 10, "the announcement")
        # When it is killed (no clean exit withdraws its word)
        sup.kill(worker)
        killed = time.monotonic()
        # Then zai is no longer blocked once its lapse (1 s) has passed
        wait_until(lambda: state.block("user_facing", ZAI) is None, 5, "the lapse")
        assert time.monotonic() - killed < 2.5
    finally:
        sup.stop(20)
