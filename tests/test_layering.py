"""The decision code (catalog, policy, route) loads no Celery, httpx or database driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def modules_after(code: str, env: dict[str, str] | None = None) -> list[str]:
    """Every module a fresh interpreter has loaded after running `code`."""
    script = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    )
    return list(json.loads(out.stdout.splitlines()[-1]))


FORBIDDEN = ("celery", "kombu", "httpx", "redis", "sqlalchemy", "psycopg", "sqlite3", "mlx")


def test_decision_code_imports_no_io_library() -> None:
    loaded = modules_after(
        "import router, router.catalog, router.policy, router.jobs, router.tokens\n"
        "from router import load_catalog, route, RouteQuery\n"
        "route(load_catalog(), RouteQuery(task_class='creative'))"
    )
    offenders = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_fleet_route_starts_without_celery() -> None:
    # `fleet route` reads live state from Redis when it can, but loads no Celery, HTTP
    # client or database driver.
    loaded = modules_after(
        "from workers.cli import main\nmain(['route', '--class', 'creative', '--json'])"
    )
    assert not [m for m in loaded if m.split(".")[0] in set(FORBIDDEN) - {"redis"}]


# What an app process that only sends jobs must not load: the worker, its pool, the ledger
# and its database drivers, the provider adapters. (billiard's package itself is loaded by
# kombu, for its fork hook: kombu/utils/compat.py; its pool is not.)
WORKER_SIDE = (
    "sqlalchemy",
    "psycopg",
    "httpx",
    "mlx",
    "mlx_lm",
    "billiard.pool",
    "celery.worker",
    "celery.concurrency",
    "celery.apps.worker",
    "workers.runtime.tasks",
    "workers.runtime.step",
    "workers.ledger",
    "workers.providers",
    "workers.ops",
    "workers.sim",
)


def test_the_client_sends_and_waits_without_loading_the_worker(redis_server) -> None:
    env = {**os.environ, "FLEET_BROKER_URL": redis_server.url.rsplit("/", 1)[0] + "/15"}
    env.pop("FLEET_STATE_URL", None)
    loaded = modules_after(
        "from router import dispatch, dispatch_many\n"
        "job = {'task_class': 'cost_free', 'messages': [{'role': 'user', 'content': 'hi'}]}\n"
        "handle = dispatch(job)\n"
        "dispatch_many([job, job])\n"
        "try:\n"
        "    handle.get(timeout=0.2)\n"
        "except TimeoutError:\n"
        "    pass",
        env,
    )
    assert "celery" in loaded and "redis" in loaded  # it did send, through Celery's client
    offenders = [m for m in loaded if m.startswith(WORKER_SIDE)]
    assert offenders == []


def test_the_gateway_loads_no_worker_code() -> None:
    # The gateway stands on the fleet's public API: dispatch, routing, the catalog, the
    # live state of apps, the ledger's keys; none of the worker's machinery.
    loaded = modules_after(
        "from gateway.app import create_app\n"
        "create_app()\n"
        "import gateway.serve, gateway.keys, gateway.shapes, gateway.waiter"
    )
    worker = tuple(m for m in WORKER_SIDE if m not in ("sqlalchemy", "psycopg", "workers.ledger"))
    assert [m for m in loaded if m.startswith(worker)] == []
