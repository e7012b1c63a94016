"""The layers of modelfleet, each standing only on those below it:

1. router/: the decisions (catalog, policy, jobs, routing). No I/O: it loads no Celery,
   httpx or database driver, and imports nothing from workers/, client/ or gateway/.
   router/__init__.py re-exports the client's dispatch, dispatch_many and JobHandle for
   convenience, imported on first use (`from router import dispatch` keeps working).
2. workers/: the fleet's machinery (runtime, state, providers, ledger, simulator).
3. client/: dispatch() and JobHandle, which send routed jobs with the runtime's sending
   code and the fleet's live state.
4. gateway/: the HTTP door, on the client.
5. At the top, the tools that drive a whole fleet: the `fleet` command (workers/cli/), the
   demo (workers/sim/demo.py, which sends its jobs through the client) and `fleet up`'s
   supervisor (workers/ops/up.py, which starts the gateway and waits for its ready line).
   They live in workers/ because `fleet` is the workers' command, but stand on the client
   and the gateway, and nothing below imports them.

The static check reads every import of every module, those inside functions too (the
fleet imports its heavy parts lazily), so a layer cannot climb up even on a path no test
runs. The subprocess tests check what importing and running each layer actually loads.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import client
import router

ROOT = Path(__file__).resolve().parents[1]
# What each layer must not import: the layers above it.
ABOVE = {
    "router": {"workers", "client", "gateway"},
    "workers": {"client", "gateway"},
    "client": {"gateway"},
}
# The modules (or packages) that stand above their package's layer, and what of the layers
# above they import.
TOP = {
    "router.__init__": {"client"},  # the lazy re-export of dispatch
    "workers.cli": {"client", "gateway"},  # submit, dead-letter replay, serve, keys
    "workers.sim.demo": {"client"},
    "workers.ops.up": {"gateway"},
}


def module_name(path: Path) -> str:
    """`path` as a dotted name; a package's own module is `<package>.__init__`."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imported_packages(path: Path) -> set[str]:
    """The top-level packages the module at `path` imports anywhere in its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # a relative import stays inside the module's own top-level package
            found.add(module_name(path) if node.level else str(node.module))
    return {name.split(".")[0] for name in found}


def top_of(module: str) -> str | None:
    """The entry of TOP that `module` is, or is inside of."""
    return next((top for top in TOP if module == top or module.startswith(top + ".")), None)


def test_no_layer_imports_a_layer_above_it() -> None:
    climbs: list[str] = []
    tops_seen: set[str] = set()
    for package, above in ABOVE.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            module = module_name(path)
            top = top_of(module)
            allowed = TOP[top] if top else set()
            reached = imported_packages(path) & above
            if top and reached & allowed:
                tops_seen.add(top)
            climbs += [f"{module} imports {p}" for p in sorted(reached - allowed)]
    assert climbs == []
    assert tops_seen == set(TOP)  # each module said to stand above its layer still does


def test_router_leaves_the_client_to_first_use() -> None:
    loaded = modules_after("import router")
    assert [m for m in loaded if m.split(".")[0] in ("client", "workers", "gateway")] == []
    assert router.dispatch is client.dispatch
    assert router.dispatch_many is client.dispatch_many
    assert router.JobHandle is client.JobHandle


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
