"""`fleet route` consults live state; `fleet status` shows queues, workers and models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import redis as redis_lib

from client import dispatch
from router import load_catalog
from router.catalog import QUEUES
from tests.fixtures import reset_live_state, url_of
from workers.ops.redis_server import free_port
from workers.state.limits import FleetState

FLEET = str(Path(sys.executable).with_name("fleet"))
VISION = "minimax/MiniMax-Vision-Video-01"


def fleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEET, *args], env=env, capture_output=True, text=True, timeout=60)


def test_route_shows_why_a_cooled_model_would_be_skipped_now(fleet_env, fleet_workers) -> None:
    client = redis_lib.Redis.from_url(fleet_env["FLEET_BROKER_URL"])
    state = FleetState(client, load_catalog(fleet_env["FLEET_CATALOG"]))
    try:
        state.cool(VISION, 120, "rate limited")
        done = fleet(fleet_env, "route", "--class", "vision", "--json")
        assert json.loads(done.stdout)["chain"][0]["model"].endswith("nemotron-nano-12b-v2-vl:free")
        human = fleet(fleet_env, "route", "--class", "vision")
        assert f"skipped {VISION}: cooldown until" in human.stdout
        assert "(rate limited)" in human.stdout
    finally:
        reset_live_state(client)
        client.close()


def test_status_lists_every_queue_with_its_worker_and_model_state(fleet_env, fleet_workers):
    client = redis_lib.Redis.from_url(fleet_env["FLEET_BROKER_URL"])
    state = FleetState(client, load_catalog(fleet_env["FLEET_CATALOG"]))
    try:
        state.cool(VISION, 120, "rate limited")
        done = fleet(fleet_env, "status", "--json")
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        queues = {q["queue"]: q for q in status["queues"]}
        assert set(queues) == {"local", "free", "subscription", "vision", "long-context"}
        for name, queue in queues.items():  # (the waiting counts: the next test)
            assert queue["workers"] == [f"test-{name}@{queue['workers'][0].split('@')[1]}"]
        models = {m["model"]: m for m in status["models"]}
        assert "rate limited" in models[VISION]["cooldown"]
        assert models["openrouter/deepseek/deepseek-chat"]["windows"]  # the account limit
        assert fleet(fleet_env, "status").returncode == 0
    finally:
        reset_live_state(client)
        client.close()


def test_status_counts_the_jobs_waiting_on_queues_nobody_consumes(
    fleet_env, fresh_redis, monkeypatch
) -> None:
    # Given a broker no worker consumes, with 3 jobs sent to the free queue and 2 to the
    # subscription queue
    env = {**fleet_env, "FLEET_BROKER_URL": url_of(fresh_redis)}
    for key in ("FLEET_BROKER_URL", "FLEET_CATALOG"):
        monkeypatch.setenv(key, env[key])
    for n in range(3):
        dispatch({"task_class": "cost_free", "messages": [{"role": "user", "content": f"f{n}"}]})
    for n in range(2):
        dispatch({"task_class": "user_facing", "messages": [{"role": "user", "content": f"s{n}"}]})
    # When the fleet's status is asked
    done = fleet(env, "status", "--json")
    assert done.returncode == 0, done.stderr
    queues = {q["queue"]: q for q in json.loads(done.stdout)["queues"]}
    # Then each queue shows exactly the jobs waiting on it, and no worker
    expected = {**dict.fromkeys(QUEUES, 0), "free": 3, "subscription": 2}
    assert {name: q["waiting"] for name, q in queues.items()} == expected
    assert all(q["workers"] == [] for q in queues.values())


def test_status_without_a_reachable_fleet_is_one_line(fleet_env, tmp_path) -> None:
    env = {**fleet_env, "FLEET_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = fleet(env, "status")
    assert done.returncode == 2
    assert "the fleet's Redis is not reachable" in done.stderr
    assert done.stderr.count("\n") == 1
