"""compose.yaml: one worker service per queue with its pool, one beat, Flower, Redis with
AOF, and provider keys passed from the host only to the workers that call those providers.

Checked twice: on the file as plain YAML, and on `docker-compose config`'s normalized
output (needs docker-compose, no engine: a machine without it fails these tests)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.catalog import QUEUES, load_catalog
from workers.ops.pools import worker_argv

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
BROKER = "redis://redis:6379/0"
CATALOG = load_catalog()
KEY_VARS = {p.api_key_env for p in CATALOG.providers.values() if p.api_key_env}
URL_VARS = {p.base_url_env for p in CATALOG.providers.values() if p.base_url_env}
# Variables that would hold a secret (not POSTGRES_HOST_AUTH_METHOD, a mode: trust).
SECRETISH = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|AUTH(?!_METHOD)", re.IGNORECASE)


def provider_vars(queue: str) -> tuple[set[str], set[str]]:
    """(key variables, base-URL variables) of the providers whose models live on `queue`."""
    providers = [CATALOG.providers[m.provider] for m in CATALOG.models if m.queue == queue]
    keys = {p.api_key_env for p in providers if p.api_key_env}
    return keys, {p.base_url_env for p in providers if p.base_url_env}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def celery_subcommand(service: dict[str, Any]) -> str | None:
    cmd = command(service)
    if cmd[:3] == ["celery", "-A", "workers"] and len(cmd) > 3:
        return cmd[3]
    return None


def option(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def published(service: dict[str, Any]) -> set[tuple[str, str]]:
    """(host port, container port) pairs, from the short or the long port syntax."""
    pairs = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            pairs.add((str(port.get("published")), str(port["target"])))
        else:
            *host, container = str(port).split("/")[0].split(":")
            pairs.add((host[-1] if host else "", container))
    return pairs


def check_fleet(services: dict[str, Any]) -> dict[str, str]:
    """The structural checks; returns queue -> its worker service's name."""
    workers = {n: s for n, s in services.items() if celery_subcommand(s) == "worker"}
    by_queue: dict[str, str] = {}
    for name, service in workers.items():
        for queue in option(command(service), "-Q").split(","):
            assert queue not in by_queue, f"{queue} consumed by {by_queue[queue]} and {name}"
            by_queue[queue] = name
    assert sorted(by_queue) == sorted(QUEUES)

    for queue, name in by_queue.items():
        # Exactly what workers.ops.pools would run: pool, concurrency, node name, events, flags.
        expected = ["celery", *worker_argv([queue])[3:]]
        assert command(services[name]) == expected, name

    beats = [n for n, s in services.items() if celery_subcommand(s) == "beat"]
    assert len(beats) == 1, f"beat must run once per fleet: {beats}"
    beat = services[beats[0]]
    schedule_dir = str(Path(option(command(beat), "-s")).parent)
    mounts = [v if isinstance(v, str) else v["target"] for v in beat.get("volumes") or []]
    assert any(m.split(":")[1] == schedule_dir if ":" in m else m == schedule_dir for m in mounts)

    flowers = [n for n, s in services.items() if celery_subcommand(s) == "flower"]
    assert len(flowers) == 1
    flower = services[flowers[0]]
    assert command(flower)[3:] == ["flower", "--address=0.0.0.0", "--port=5555"]
    assert ("5555", "5555") in published(flower)

    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    assert re.search(r"--appendonly\s+yes", " ".join(command(redis))), command(redis)
    assert redis.get("volumes"), "Redis' AOF needs a volume to survive a restart"

    # The ledger writer: every finished job's attempts reach the database through it
    writers = [n for n, s in services.items() if command(s)[:2] == ["fleet", "ledger-writer"]]
    assert len(writers) >= 1, "nothing drains the ledger spool"
    assert environment(services[writers[0]])["FLEET_LEDGER_URL"].startswith("postgresql://")

    for name in [*workers, *beats, *flowers, *writers]:
        service = services[name]
        env = environment(service)
        assert env["FLEET_BROKER_URL"] == env["FLEET_STATE_URL"] == BROKER, name
        assert "redis" in service["depends_on"], name
        build = service["build"]
        assert (build if isinstance(build, str) else build["context"]) in (".", str(ROOT))
    return by_queue


def check_provider_vars(services: dict[str, Any], by_queue: dict[str, str], key_value: Any) -> None:
    """Each worker gets exactly its providers' keys; nobody else gets any."""
    for name, service in services.items():
        env = environment(service)
        queue = next((q for q, n in by_queue.items() if n == name), None)
        keys, urls = provider_vars(queue) if queue else (set(), set())
        assert set(env) & KEY_VARS == keys, name
        assert set(env) & URL_VARS <= urls, name
        for var in keys:
            key_value(var, env[var])
    assert not set(environment(services[by_queue["local"]])) & (KEY_VARS | URL_VARS)


def test_compose_yaml_as_plain_yaml() -> None:
    text = COMPOSE.read_text()
    services = yaml.safe_load(text)["services"]
    by_queue = check_fleet(services)

    def is_reference(var: str, value: Any) -> None:
        assert re.fullmatch(rf"\$\{{{var}(:?-)?\}}", str(value)), f"{var}: {value!r}"

    check_provider_vars(services, by_queue, is_reference)
    # No secret-looking variable carries a value of its own anywhere in the file.
    for name, service in services.items():
        for var, value in environment(service).items():
            if SECRETISH.search(var):
                assert value is None or re.fullmatch(rf"\$\{{{var}(:?-)?\}}", value), (name, var)


def test_dockerfile_installs_the_whole_project() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    assert 'pip install ".[local]"' in dockerfile
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    copied = " ".join(line for line in dockerfile.splitlines() if line.startswith("COPY "))
    needed = {p.split(".")[0] for p in setuptools["packages"]} | {
        f"{m}.py" for m in setuptools["py-modules"]
    }
    for path in [*needed, "pyproject.toml", project["project"]["readme"]]:
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", copied), f"Dockerfile copies no {path}"


def compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    cli = compose_cli()
    if cli is None:
        pytest.fail(
            "docker-compose is not installed: compose.yaml is checked with it"
            " (scripts/setup dev installs it)",
            pytrace=False,
        )
    return cli


def normalized(compose: list[str], tmp_path: Path, host_env: dict[str, str]) -> dict[str, Any]:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **host_env}
    out = subprocess.run(
        [*compose, "--env-file", str(empty), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_docker_compose_config_accepts_it(compose: list[str], tmp_path: Path) -> None:
    host = {var: f"from-host-{var}" for var in KEY_VARS}
    host["FLOWER_BASIC_AUTH"] = "admin:from-host"
    services = normalized(compose, tmp_path, host)["services"]
    by_queue = check_fleet(services)

    def from_host(var: str, value: Any) -> None:
        assert value == f"from-host-{var}", f"{var} is not the host's value: {value!r}"

    check_provider_vars(services, by_queue, from_host)
    flower = next(s for s in services.values() if celery_subcommand(s) == "flower")
    assert environment(flower)["FLOWER_BASIC_AUTH"] == "admin:from-host"


def test_unset_host_variables_stay_unset_or_empty(compose: list[str], tmp_path: Path) -> None:
    services = normalized(compose, tmp_path, {})["services"]
    for name, service in services.items():
        env = environment(service)
        for var in KEY_VARS & set(env):
            assert env[var] in ("", None), (name, var)
        # An empty FLOWER_BASIC_AUTH would turn on a password nobody has: unset, not "".
        assert env.get("FLOWER_BASIC_AUTH") is None, name


def test_every_worker_writes_one_shared_ledger() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    workers = [s for s in services.values() if celery_subcommand(s) == "worker"]
    urls = {environment(s).get("FLEET_LEDGER_URL") or "" for s in workers}
    assert len(urls) == 1 and next(iter(urls)).startswith("postgresql://")
    assert services["postgres"]["image"].startswith("postgres:")


def test_the_gateway_is_published_on_loopback_only() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    gateway = services["gateway"]
    assert command(gateway)[:2] == ["fleet", "serve"]
    assert all(str(p).startswith("127.0.0.1:") for p in gateway["ports"])
    assert "FLEET_LEDGER_URL" in environment(gateway)  # its keys live in the ledger
