"""Where the fleet's services are: the broker and state URLs, from the environment.

Its own module so that commands which only read fleet state (`fleet route`, `fleet
status`) do not load Celery.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from router.errors import ConfigError

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def fleet_urls(environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(broker URL, state URL) from the environment, or ConfigError saying what to set."""
    broker = environ.get("FLEET_BROKER_URL") or DEFAULT_BROKER
    state = environ.get("FLEET_STATE_URL")
    if not state:
        if not broker.startswith(("redis://", "rediss://", "redis+socket://")):
            raise ConfigError(
                f"FLEET_STATE_URL must name a Redis server when FLEET_BROKER_URL is not Redis"
                f" (broker scheme: {broker.split('://', 1)[0]})"
            )
        state = broker
    return broker, state
