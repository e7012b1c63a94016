"""`fleet demo`, `fleet up` and `fleet submit` run as a user runs them: subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from router.catalog import TASK_CLASSES
from workers.ops.redis_server import free_port

FLEET = str(Path(sys.executable).with_name("fleet"))
CLASSES = set(TASK_CLASSES)  # the demo sends a job of every class


def test_demo_json_runs_the_whole_fleet_and_exits_0(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run(
        [FLEET, "demo", "--json"], capture_output=True, text=True, timeout=180, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    keys = {"job_id", "task_class", "source", "queue_path", "model", "attempts", "ok"}
    assert all(keys | {"prompt_tokens", "completion_tokens"} <= set(r) for r in rows)
    assert all(r["ok"] for r in rows)
    assert {r["task_class"] for r in rows} == CLASSES
    assert any(r["prompt_tokens"] > 200_000 for r in rows)  # the 250K-token job
    assert any(len(set(r["queue_path"])) > 1 for r in rows)  # escalated into another queue
    assert any(r["attempts"] > 1 and len(set(r["queue_path"])) == 1 for r in rows)
    cron = [r for r in rows if r["source"] == "cron"]
    assert cron and all(set(r["queue_path"]) <= {"free", "local"} for r in cron)
    assert len({r["job_id"] for r in rows}) == len(rows)

    # The user's own ledger holds none of the demo's made-up spend
    mine = subprocess.run(
        [FLEET, "usage", "--json"], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(mine.stdout) == []
    # `fleet usage` on the demo's ledger shows every demo attempt, its totals the demo's
    demo_ledger = f"sqlite:///{tmp_path / 'data' / 'demo' / 'ledger.db'}"
    usage = subprocess.run(
        [FLEET, "usage", "--by", "task_class", "--json"],
        capture_output=True,
        text=True,
        env={**env, "FLEET_LEDGER_URL": demo_ledger},
    )
    assert usage.returncode == 0, usage.stderr
    groups = json.loads(usage.stdout)
    assert sum(g["attempts"] for g in groups) == sum(r["attempts"] for r in rows)
    assert sum(g["jobs"] for g in groups) == len(rows)
    assert sum(g["prompt_tokens"] for g in groups) == sum(r["prompt_tokens"] for r in rows)
    assert sum(g["completion_tokens"] for g in groups) == sum(r["completion_tokens"] for r in rows)


@pytest.fixture
def up_env(tmp_path: Path, fleet_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in fleet_env.items() if k != "FLEET_BROKER_URL"}
    return {**env, "FLEET_DATA_DIR": str(tmp_path / "data")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "fleet up did not come up"
        time.sleep(0.1)
    return json.loads(path.read_text())


def test_fleet_up_runs_once_per_data_dir_serves_jobs_and_stops_cleanly(
    up_env: dict[str, str],
) -> None:
    # Given a fleet started with `fleet up` on a fresh data dir
    port, gateway_port = free_port(), free_port()
    up = subprocess.Popen(
        [FLEET, "up", "--flower-port", str(port), "--gateway-port", str(gateway_port)],
        env=up_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        info = _wait_for(Path(up_env["FLEET_DATA_DIR"]) / "up.json", up)
        # When a second `fleet up` starts on the same data dir, it refuses
        again = subprocess.run([FLEET, "up"], env=up_env, capture_output=True, text=True)
        assert again.returncode == 2
        assert "already running" in again.stderr and again.stderr.count("\n") == 1
        # And `fleet submit --wait --json` finds the broker from the data dir
        submitted = subprocess.run(
            [FLEET, "submit", "--class", "user_facing", "hello there", "--wait", "--json"],
            env=up_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert submitted.returncode == 0, submitted.stderr
        result = json.loads(submitted.stdout)
        assert result["ok"] and result["model"] == "zai/glm-4.7"
        # And `fleet submit --stream` prints the same answer as it is written
        streamed = subprocess.run(
            [FLEET, "submit", "--class", "user_facing", "hello there", "--stream"],
            env=up_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert streamed.returncode == 0, streamed.stderr
        assert streamed.stdout == result["text"] + "\n"
        assert info["broker_url"].startswith("redis://127.0.0.1:")
        assert info["flower"].endswith(f":{port}")
        # And the gateway answers at the URL it announced (a key is needed)
        assert info["gateway"] == f"http://127.0.0.1:{gateway_port}/v1"
        refused = urllib.request.Request(info["gateway"] + "/models")
        with pytest.raises(urllib.error.HTTPError) as no_key:
            urllib.request.urlopen(refused, timeout=10)
        assert no_key.value.code == 401
        no_key.value.close()
    finally:
        # Then SIGTERM stops every child and the private Redis
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "stopping" in out
    # `fleet doctor`'s summary, run at start: every class has a usable model
    assert "doctor: 10 of 10 task classes usable, 26 of 26 models can serve" in out
    pids = [int(p) for p in re.findall(r" pid (\d+) ", out)]
    assert len(pids) == 9  # a worker per queue, the ledger writer, beat, flower, gateway
    assert [pid for pid in pids if _alive(pid)] == []
    redis = subprocess.run(["pgrep", "-f", up_env["FLEET_DATA_DIR"]], capture_output=True)
    assert redis.stdout == b""  # the private redis-server (and beat) ran with the data dir
    assert not (Path(up_env["FLEET_DATA_DIR"]) / "up.json").exists()


def test_fleet_up_without_redis_server_says_how_to_install_it(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
        "PATH": str(tmp_path),
        "FLEET_DATA_DIR": str(tmp_path / "data"),
    }
    done = subprocess.run([FLEET, "up"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "redis-server not found: install it (sudo apt-get install redis-server)" in done.stderr
    assert done.stderr.count("\n") == 1


def test_submit_bad_input_is_one_line(up_env: dict[str, str], tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    for args, needle in [
        (["--class", "creative", "--image", str(text_file), "x"], "is not an image file"),
        (["--class", "creative", "--image", str(tmp_path / "a.png"), "x"], "No such file"),
        (["--class", "poetry", "x"], "invalid choice: 'poetry'"),
        (["--class", "creative", "--focus", "zz", "x"], "unknown focus 'zz'"),
    ]:
        done = subprocess.run([FLEET, "submit", *args], env=up_env, capture_output=True, text=True)
        assert done.returncode == 2, (args, done.stderr)
        assert needle in done.stderr and done.stderr.count("\n") == 1
