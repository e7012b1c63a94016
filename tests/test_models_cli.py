"""`fleet models list|pull` run as a user runs them: a subprocess, with its own empty or
prepared hub cache (HF_HOME), and nothing ever fetched from the real Hub."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from router.catalog import Model, load_catalog
from tests.hub_stand_in import HubStandIn
from workers.ops.models import local_models
from workers.ops.redis_server import free_port

FLEET = str(Path(sys.executable).with_name("fleet"))
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot's (made-up) commit hash


def fleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEET, "models", *args], capture_output=True, text=True, timeout=60, env=env
    )


def hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The shipped catalog, an empty hub cache of its own, no HF_ or FLEET_ setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "HF_"))}
    (tmp_path / "hf").mkdir(exist_ok=True)
    return {**env, "HF_HOME": str(tmp_path / "hf"), **extra}


def lay_out_in_hub_cache(model_dir: Path, hf_home: Path, repo_id: str) -> int:
    """Put `model_dir`'s files in the hub cache as huggingface_hub does: blobs named by
    their hash, a snapshot of links to them, refs/main naming the snapshot. Returns the
    blobs' total size."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    total = 0
    for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        total += len(data)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    return total


def files_in(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() or p.is_symlink()]


def test_offline_pull_names_each_model_in_a_line_and_writes_nothing(tmp_path: Path) -> None:
    local = local_models(load_catalog())
    for setting in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}):
        # Given an empty hub cache, offline or with the hub unreachable
        env = hub_env(tmp_path, **setting)
        # When `fleet models pull` runs with no ID
        done = fleet(env, "pull")
        # Then it exits 1 with one line per local model, naming it and what was not reached
        assert done.returncode == 1, done.stdout + done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == len(local), done.stderr
        for line, model in zip(lines, local, strict=True):
            assert line.startswith(f"fleet: {model.id}: could not reach {model.upstream}")
        expected = "offline" if "HF_HUB_OFFLINE" in setting else setting["HF_ENDPOINT"]
        assert all(expected in line for line in lines), lines
        # And nothing, half-written or whole, is in the cache
        assert files_in(tmp_path / "hf") == []
    # And --json says the same per model
    done = fleet(hub_env(tmp_path, HF_HUB_OFFLINE="1"), "pull", local[0].id, "--json")
    assert done.returncode == 1
    [row] = json.loads(done.stdout)
    assert row["model"] == local[0].id and row["ok"] is False and row["path"] is None


def test_pull_of_an_id_not_a_local_model_exits_2_naming_the_valid_ids(tmp_path: Path) -> None:
    catalog = load_catalog()
    remote = next(m for m in catalog.models if catalog.providers[m.provider].kind != "mlx")
    done = fleet(hub_env(tmp_path, HF_HUB_OFFLINE="1"), "pull", remote.id)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert remote.id in done.stderr
    for model in local_models(catalog):
        assert model.id in done.stderr


def test_list_shows_the_cached_model_present_sized_and_loadable(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Given a hub cache holding the tiny model under one local model's hub id
    local: list[Model] = local_models(load_catalog())
    cached, *missing = local
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1")
    size = lay_out_in_hub_cache(tiny_model_dir, tmp_path / "hf", cached.upstream)
    # When `fleet models list --json` runs
    done = fleet(env, "list", "--json")
    # Then that model is present, its size is its blobs', and it loads
    assert done.returncode == 0, done.stderr
    rows = {r["model"]: r for r in json.loads(done.stdout)}
    assert list(rows) == [m.id for m in local]
    row = rows[cached.id]
    assert row["present"] is True and row["loadable"] is True, row
    assert row["size_bytes"] == size
    assert row["path"].endswith(f"snapshots/{COMMIT}")
    assert row["problem"] is None and row["fix"] is None
    # And every other one is missing, with the pull command as its fix
    for model in missing:
        assert rows[model.id]["present"] is False
        assert rows[model.id]["fix"] == f"fleet models pull {model.id}"
    # And the table says the same
    table = fleet(env, "list")
    assert table.returncode == 0, table.stderr
    line = next(x for x in table.stdout.splitlines() if cached.id in x)
    assert "yes" in line and f"{size / 1000:.1f} KB" in line, line
    for model in missing:
        assert f"fleet models pull {model.id}" in table.stdout


def test_pull_fetches_a_model_from_a_hub_stand_in_and_list_then_finds_it(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Given a stand-in Hub serving the tiny model under one local model's hub id
    model = local_models(load_catalog())[-1]
    with HubStandIn(model.upstream, tiny_model_dir, COMMIT) as hub:
        env = hub_env(tmp_path, HF_ENDPOINT=hub.url)
        # When `fleet models pull ID` runs
        done = fleet(env, "pull", model.id)
        # Then it exits 0, naming the snapshot it fetched, with its progress on stderr
        assert done.returncode == 0, done.stdout + done.stderr
        snapshot = tmp_path / "hf" / "hub" / ("models--" + model.upstream.replace("/", "--"))
        assert done.stdout.strip() == f"{model.id}: {snapshot / 'snapshots' / COMMIT}"
        assert "100%" in done.stderr
        assert any(r.startswith("GET /api/models/") for r in hub.requests), hub.requests
        # And every file is there, whole
        for f in tiny_model_dir.iterdir():
            if f.is_file():
                assert (snapshot / "snapshots" / COMMIT / f.name).read_bytes() == f.read_bytes()
        # And a second pull fetches no file again
        downloads = sum(r.startswith("GET /" + model.upstream) for r in hub.requests)
        assert fleet(env, "pull", model.id, "--json").returncode == 0
        assert sum(r.startswith("GET /" + model.upstream) for r in hub.requests) == downloads
    # And `fleet models list`, offline now, shows it present and loadable
    listed = fleet({**env, "HF_HUB_OFFLINE": "1"}, "list", "--json")
    row = next(r for r in json.loads(listed.stdout) if r["model"] == model.id)
    assert row["present"] is True and row["loadable"] is True, row
