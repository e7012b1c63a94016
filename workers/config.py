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
# Admission is counted on Redis' clock, the limit on the provider's: a call reaches the
# provider some time after its slot was taken, and that time varies (a fresh worker's
# first calls open connections; a busy one's threads wait for the GIL). Two calls a
# window apart on Redis' clock can arrive less than a window apart. Every window is
# counted this much longer, so a slot is free again only window + margin after it was
# taken (limits.py). 1 s covers that spread with room, also on a loaded machine
# (docs/architecture.md, "Provider's clock"); 1 s on a minute costs 1/61 of the limit.
DEFAULT_LIMIT_MARGIN_MS = 1000
MAX_LIMIT_MARGIN_MS = 60_000


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


def limit_margin_ms(environ: Mapping[str, str] = os.environ) -> int:
    """FLEET_LIMIT_MARGIN_MS: how much longer than its nominal window every rate window is
    counted (DEFAULT_LIMIT_MARGIN_MS when unset); ConfigError, one line, when it is not a
    whole number of milliseconds from 0 to MAX_LIMIT_MARGIN_MS."""
    value = environ.get("FLEET_LIMIT_MARGIN_MS")
    if value is None or value.strip() == "":
        return DEFAULT_LIMIT_MARGIN_MS
    try:
        margin = int(value)
    except ValueError:
        margin = -1
    if not 0 <= margin <= MAX_LIMIT_MARGIN_MS:
        raise ConfigError(
            f"FLEET_LIMIT_MARGIN_MS must be a whole number of milliseconds from 0 to"
            f" {MAX_LIMIT_MARGIN_MS} (got {value!r}; default {DEFAULT_LIMIT_MARGIN_MS})"
        )
    return margin


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
