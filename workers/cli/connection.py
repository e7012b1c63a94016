"""How a `fleet` command reaches a running fleet: the broker `fleet up` started (when
FLEET_BROKER_URL is unset) and a Redis client for the fleet's state."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis import Redis


def broker_env() -> dict[str, str]:
    from workers.config import broker_from_up

    return broker_from_up()


def state_client() -> Redis | None:
    """A Redis client for the fleet's state, or None when it cannot be reached."""
    import os

    import redis

    from workers.config import fleet_urls
    from workers.state.connections import new_client

    client = new_client(fleet_urls({**os.environ, **broker_env()})[1])
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        return None
    return client
