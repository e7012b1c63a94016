"""The decision code (catalog, policy, route) loads no Celery, httpx or database driver."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("celery", "kombu", "httpx", "redis", "sqlalchemy", "psycopg", "sqlite3", "mlx")


def test_decision_code_imports_no_io_library() -> None:
    code = (
        "import sys, json\n"
        "import router, router.catalog, router.policy, router.jobs, router.tokens\n"
        "from router import load_catalog, route, RouteQuery\n"
        "route(load_catalog(), RouteQuery(task_class='creative'))\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    offenders = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_fleet_route_starts_without_celery() -> None:
    # `fleet route` reads live state from Redis when it can, but loads no Celery, HTTP
    # client or database driver.
    code = (
        "import sys, json\n"
        "from workers.cli import main\n"
        "main(['route', '--class', 'creative', '--json'])\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert not [m for m in loaded if m.split(".")[0] in set(FORBIDDEN) - {"redis"}]
