"""modelfleet's decision layer: the catalog, the policy, jobs and routing.

Importing this package loads no Celery, httpx or database driver. `dispatch`,
`dispatch_many` and `JobHandle` belong to the client (`client/`, which sends routed jobs to
their Celery queues and stands above this layer); they are re-exported here for convenience
and imported on first use, so the decision layer itself imports nothing above it.
"""

from typing import TYPE_CHECKING, Any

from router.catalog import Catalog, load_catalog
from router.errors import (
    BatchRefused,
    ConfigError,
    FleetError,
    InvalidJob,
    JobFailed,
    NoRouteAvailable,
)
from router.jobs import Job, parse_job
from router.policy import Route, RouteQuery, route, route_job
from router.results import Attempt, Result

if TYPE_CHECKING:
    from client.dispatch import JobHandle, dispatch, dispatch_many

__all__ = [
    "Attempt",
    "BatchRefused",
    "Catalog",
    "ConfigError",
    "FleetError",
    "InvalidJob",
    "Job",
    "JobFailed",
    "JobHandle",
    "NoRouteAvailable",
    "Result",
    "Route",
    "RouteQuery",
    "dispatch",
    "dispatch_many",
    "load_catalog",
    "parse_job",
    "route",
    "route_job",
]


def __getattr__(name: str) -> Any:
    if name in ("dispatch", "dispatch_many", "JobHandle"):
        import client

        return getattr(client, name)
    raise AttributeError(f"module 'router' has no attribute {name!r}")
