"""A workaround in kombu's Redis transport (kombu 5.7), applied when the app is built.

A worker whose Redis goes away while it holds unacked jobs must reconnect, not exit. On
the connection error Celery's consumer closes the broker connection twice
(`Connection.collect()`, then `Connection.close()`). When the first pass leaves a channel
open (its close raised on the dead socket), the transport is already detached on the
second, and restoring that channel's unacked messages fails in `Channel._connparams`
with AttributeError ('NoneType' object has no attribute 'hostname'): not a connection
error, so it escapes the consumer's `ignore_errors` and the worker dies ("Unrecoverable
error"). The chaos suite's Redis restarts (tests/chaos) exercise it.

Here a detached channel raises a connection error instead: the close goes on, the worker
reconnects, and the jobs it held stay filed (on kombu's stock channel, in its unacked
set, which its visibility sweep requeues; on the fleet's transport, held by this process,
whose beat acks or gives them back once Redis answers: workers/runtime/liveness.py). A job
that finished meanwhile is recognised as such when it comes back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_applied: list[bool] = []


def harden_redis_transport() -> None:
    """Patch kombu's Redis channel once per process (idempotent)."""
    if _applied:
        return
    from kombu.transport import redis as transport
    from redis.exceptions import ConnectionError as RedisConnectionError

    original: Callable[[Any, bool], Any] = transport.Channel._connparams  # unannotated in kombu

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None:  # the transport was closed under this channel
            raise RedisConnectionError("the broker connection is closed")
        return original(self, asynchronous)

    transport.Channel._connparams = _connparams  # type: ignore[method-assign]
    _applied.append(True)
