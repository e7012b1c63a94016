"""`fleet doctor` run as a user runs it: a subprocess, on a machine with nothing set up, and
on the session fleet (the simulator's URLs and keys, the tiny local model, live workers)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from router.catalog import TASK_CLASSES, load_catalog
from workers.ops.redis_server import free_port
from workers.sim.simulator import Simulator

FLEET = str(Path(sys.executable).with_name("fleet"))


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEET, "doctor", *args], capture_output=True, text=True, timeout=60, env=env
    )


def bare_env(tmp_path: Path) -> dict[str, str]:
    """No provider key, no base URL override, an empty hub cache, offline, and a broker
    nobody listens on (nor an Ollama: none runs here)."""
    catalog = load_catalog()
    drop = {p.api_key_env for p in catalog.providers.values()}
    drop |= {p.base_url_env for p in catalog.providers.values()}
    env = {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("FLEET_", "HF_"))
    }
    (tmp_path / "hf").mkdir()
    return {
        **env,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "FLEET_DATA_DIR": str(tmp_path / "data"),
        "FLEET_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
    }


def test_nothing_set_up_names_every_missing_key_and_model_with_its_fix(tmp_path: Path) -> None:
    # Given a machine with no provider key and no local model
    env = bare_env(tmp_path)
    catalog = load_catalog()
    keys = {p.api_key_env for p in catalog.providers.values() if p.api_key_env}
    local = [m for m in catalog.models if catalog.providers[m.provider].kind == "mlx"]
    # When `fleet doctor` runs
    table = doctor(env)
    # Then it exits 1, and names every key to set and every model to fetch
    assert table.returncode == 1, table.stderr
    for key in keys:
        assert f"export {key}=" in table.stdout
    for model in local:  # its id is never cut; its fix may fold at a space in its cell
        assert model.id in table.stdout
    assert "fleet models pull" in table.stdout
    # every class, the embedding class (the tenth) included
    assert f"0 of {len(TASK_CLASSES)} task classes have a usable model." in table.stdout
    # And --json says the same as data
    done = doctor(env, "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert [c["task_class"] for c in report["classes"]] == list(TASK_CLASSES)
    assert not any(c["usable"] for c in report["classes"])
    models = {m["model"]: m for m in report["models"]}
    assert set(models) == {m.id for m in catalog.models}
    for model in catalog.models:
        fixes = [p["fix"] for p in models[model.id]["problems"]]
        provider = catalog.providers[model.provider]
        if provider.kind == "mlx":
            assert fixes == [f"fleet models pull {model.id}"]
        elif provider.api_key_env is None:  # a server of this machine, Ollama: none runs
            assert fixes == [f"set {provider.base_url_env} to a reachable server"]
            assert models[model.id]["key_set"] is None
        else:
            assert f"export {provider.api_key_env}=<your key>" in fixes
            assert models[model.id]["key_set"] is False
    # And the broker nobody listens on is named, with what starts it
    services = {s["service"]: s for s in report["services"]}
    assert services["broker"]["ok"] is False and "fleet up" in services["broker"]["fix"]
    assert all(not q["ok"] and q["fix"] for q in report["queues"])


def test_the_simulated_fleet_serves_every_class_and_probe_calls_each_model_once(
    fleet_env: dict[str, str], fleet_workers: object, simulator: Simulator
) -> None:
    # Given the simulator's URLs and keys, the tiny local model and a worker per queue
    catalog = load_catalog(Path(fleet_env["FLEET_CATALOG"]))
    remote = [m for m in catalog.models if catalog.providers[m.provider].kind == "openai"]
    # When `fleet doctor` runs, every class is usable and it exits 0
    table = doctor(fleet_env)
    assert table.returncode == 0, table.stdout + table.stderr
    classes = len(TASK_CLASSES)  # the embedding class (the tenth) included
    assert f"{classes} of {classes} task classes have a usable model." in table.stdout
    # and, without loading them, the local models read as loadable: this leans on mlx-lm's
    # private _get_classes (workers/ops/doctor.py), and fails if mlx-lm changes it
    plain = json.loads(doctor(fleet_env, "--json").stdout)
    assert all(m["usable"] for m in plain["models"]), plain["models"]
    # And with --probe --json, one call per model reaches its provider
    done = doctor(fleet_env, "--probe", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and all(c["usable"] for c in report["classes"])
    assert all(m["usable"] and m["probe"]["outcome"] == "ok" for m in report["models"])
    assert all(q["ok"] for q in report["queues"])
    assert all(s["ok"] for s in report["services"])
    job = report["probe_job"]
    calls = [r for r in simulator.requests() if r["job"] == job]
    assert sorted(r["model"] for r in calls) == sorted(m.upstream for m in remote)
    # an embedding model is probed with an embedding call, a chat model with a chat
    embeds = {m.upstream for m in remote if m.supports("embedding")}
    assert embeds, "the catalog has remote embedding models"
    for call in calls:
        if call["model"] in embeds:
            assert (call["endpoint"], call["input"]) == ("embeddings", ["ping"])
        else:
            assert call["endpoint"] == "chat/completions"
    # And the ledger holds every probe call, local ones too, as one job's attempts
    database = fleet_env["FLEET_LEDGER_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT model, outcome, task_class FROM attempts WHERE job_id = ?", (job,)
        ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(m.id for m in catalog.models)
    assert {(r[1], r[2]) for r in rows} == {("ok", "doctor")}


def test_bad_input_exits_2() -> None:
    done = subprocess.run([FLEET, "doctor", "--bogus"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
