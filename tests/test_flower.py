"""Flower, started for real against the test fleet: it sees every queue's worker and the
jobs dispatched, and shows no prompt and no API key. Its API refuses callers without
credentials when basic auth is on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from mlx_server import free_port

from router import dispatch
from router.catalog import QUEUES
from workers.runtime.celery_app import fleet_urls
from workers.sim.simulated import PLACEHOLDER_KEY
from workers.state import keys

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 30
# A tiny PNG as a data URL: the vision job's image part.
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def reset_live_state(environ: dict[str, str]) -> None:
    """Forget every model's cooldown, circuit and rate windows in the state Redis, so the
    jobs here meet every model usable, whatever ran before."""
    with redis.Redis.from_url(fleet_urls(environ)[1]) as client:
        for kind in ("cooldown", "circuit", "window"):
            for key in client.scan_iter(f"{keys.PREFIX}:{kind}:*"):
                client.delete(key)


class Flower:
    def __init__(self, env: dict[str, str], tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"flower-{self.port}.log"
        argv = [sys.executable, "-m", "celery", "-A", "workers.runtime.celery_app", "flower"]
        argv += ["--address=127.0.0.1", f"--port={self.port}", *args]
        with self.log_path.open("wb") as log:
            # cwd: a scratch folder, so no flowerconfig.py or state file is picked up or left.
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=tmp)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_answering(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower exited:\n{self.log()[-3000:]}")
            try:
                httpx.get(self.url + "/healthcheck", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError(f"flower did not answer within {timeout_s} s:\n{self.log()[-3000:]}")

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kwargs)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def flower(fleet_env, fleet_workers, tmp_path_factory) -> Iterator[Flower]:
    env = {**fleet_env, "FLOWER_UNAUTHENTICATED_API": "true"}
    server = Flower(env, tmp_path_factory.mktemp("flower"))
    try:
        server.wait_answering()
        # Flower knows a worker once it has seen its events (a heartbeat every 2 s): only
        # then are the jobs' events sure to reach it.
        deadline = time.monotonic() + 20
        while len(server.get("/api/workers?status=1").json()) < len(QUEUES):
            assert time.monotonic() < deadline, server.get("/api/workers?status=1").text
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


def ask(text: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **fields}


def image_job(text: str) -> dict[str, Any]:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": PIXEL}}]
    return {"task_class": "user_facing", "messages": [{"role": "user", "content": parts}]}


def wait_tasks(flower: Flower, ids: set[str], timeout_s: float = 10) -> dict[str, Any]:
    """Flower's /api/tasks once every job in `ids` has reached a final state there."""
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = flower.get("/api/tasks").json()
        final = {i for i in ids if tasks.get(i, {}).get("state") in ("SUCCESS", "FAILURE")}
        if final == ids:
            return dict(tasks)
        assert time.monotonic() < deadline, f"Flower never saw {ids - final} finish"
        time.sleep(0.1)


def test_flower_sees_every_queue_and_shows_no_prompt_or_key(
    flower, fleet_app, fleet_env, fleet_workers
) -> None:
    secret = f"flower-prompt-{uuid.uuid4().hex}"  # in every prompt; the simulator echoes it
    jobs = {
        "subscription": ask(f"{secret} user", task_class="user_facing"),
        "free": ask(f"{secret} free", task_class="cost_free"),
        "long-context": ask(f"{secret} long", task_class="long_context"),
        "local": ask(f"{secret} ping", task_class="heartbeat", source="heartbeat", max_tokens=8),
        "vision": image_job(f"{secret} what is in this picture?"),
        # Escalates subscription -> free (task-retried, then a new delivery's events) ...
        "escalated": ask(f"[[sim:MiniMax-M2.1=503]] {secret} hop", task_class="fast_general"),
        # ... and fails (task-failed, its exception carries the Result).
        "failed": ask(f"[[sim:glm-4.7=400]] {secret} bad", task_class="user_facing"),
    }
    reset_live_state(fleet_env)
    try:
        handles = {name: dispatch(job) for name, job in jobs.items()}
        results = {name: h.get(timeout=TIMEOUT_S, propagate=False) for name, h in handles.items()}
    finally:
        reset_live_state(fleet_env)
    for queue in QUEUES:
        assert results[queue].ok and results[queue].queue_path == [queue], results[queue]
    assert results["escalated"].queue_path == ["subscription", "free"]
    assert not results["failed"].ok

    workers = flower.get("/api/workers?refresh=1").json()
    consumed = {q["name"] for w in workers.values() for q in w.get("active_queues") or []}
    assert consumed == set(QUEUES), sorted(workers)

    tasks = wait_tasks(flower, {h.id for h in handles.values()})
    for name, handle in handles.items():
        task = tasks[handle.id]
        assert task["name"] == "fleet.run_job"
        assert task["state"] == ("FAILURE" if name == "failed" else "SUCCESS")
        # The job as Flower shows it: the dispatcher's short description, not the payload.
        assert task["args"] == "()"
        job = jobs[name]
        assert task["kwargs"].startswith(
            f"{{'job': {handle.id!r}, 'class': {job['task_class']!r}, 'source': "
        ), task["kwargs"]
        assert len(task["kwargs"]) < 200
    # The result as Flower shows it: the outcome, without the answer text.
    escalated = tasks[handles["escalated"].id]["result"]
    assert "'model': 'openrouter/meta-llama/llama-3.1-405b-instruct:free'" in escalated
    assert "'queue_path': ['subscription', 'free']" in escalated
    assert "bad_request" in tasks[handles["failed"].id]["exception"]

    seen = json.dumps(tasks)
    assert PLACEHOLDER_KEY not in seen
    assert secret not in seen, [k for k, t in tasks.items() if secret in json.dumps(t)]
    for queue in QUEUES:  # the workers' logs hold neither, too
        log = fleet_workers.log(queue)
        assert secret not in log and PLACEHOLDER_KEY not in log, queue


def test_basic_auth_refuses_the_api_without_credentials(fleet_env, tmp_path) -> None:
    env = {k: v for k, v in fleet_env.items() if k != "FLOWER_UNAUTHENTICATED_API"}
    server = Flower(env, tmp_path, "--basic-auth=fleet:s3cret-pass")
    try:
        server.wait_answering()
        assert server.get("/api/workers").status_code == 401
        assert server.get("/api/tasks").status_code == 401
        assert server.get("/api/workers", auth=("fleet", "wrong")).status_code == 401
        assert server.get("/api/workers", auth=("fleet", "s3cret-pass")).status_code == 200
    finally:
        server.stop()
