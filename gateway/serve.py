"""`fleet serve`: the gateway under uvicorn, on loopback unless told otherwise. `fleet
dashboard` serves the same app where no gateway runs, and names its dashboard's URL."""

from __future__ import annotations

import sys
from typing import Any, TextIO

HOST = "127.0.0.1"
PORT = 8080
READY = "gateway: serving on"  # the line `fleet up` waits for


def serve(
    host: str = HOST,
    port: int = PORT,
    out: TextIO = sys.stdout,
    ready: str = READY,
    path: str = "/v1",
) -> int:
    """Serve until stopped; once listening, print `ready` and the URL of `path`."""
    import uvicorn

    from gateway.app import create_app

    config = uvicorn.Config(
        create_app(),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,  # request lines name paths and clients, never keys; kept quiet
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)

    original_startup = server.startup

    async def startup(sockets: list[Any] | None = None) -> None:
        await original_startup(sockets)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1]  # port 0: the one given
            print(f"{ready} http://{host}:{bound}{path}", file=out, flush=True)

    server.startup = startup  # type: ignore[method-assign]
    server.run()
    return 0 if server.started else 1
