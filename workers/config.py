"""Where the fleet's services and files are: the broker and state URLs, the data dir,
and the broker of a running `fleet up`, all from the environment.

The lowest module of `workers/`: it imports nothing of the fleet but `router.errors`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    override = environ.get("FLEET_DATA_DIR")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("modelfleet"))


def read_up_info(directory: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((directory / "up.json").read_text()))
    except (OSError, ValueError):
        return {}


def broker_from_up(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """FLEET_BROKER_URL for clients: the environment's, or the running `fleet up`'s."""
    if environ.get("FLEET_BROKER_URL"):
        return {}
    info = read_up_info(data_dir(environ))
    return {"FLEET_BROKER_URL": info["broker_url"]} if info.get("broker_url") else {}
