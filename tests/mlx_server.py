"""Start `mlx_lm.server` on a local model for tests (no hub: HF_HUB_OFFLINE=1).

    proc = start_mlx_server(model_dir, port, tmp_path)
    try:
        wait_for_mlx_server(proc, port)
        ... POST http://127.0.0.1:{port}/v1/chat/completions ...
    finally:
        stop_mlx_server(proc)

The server loads the model at startup (about 2 s on the tiny model: ~1 s of imports,
the rest loading) and answers /health with 200 once it listens; `"model"` in a request
may be "default_model" or the model directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlx_server_command(model_dir: Path | str, port: int) -> list[str]:
    return [
        sys.executable,
        # The server warns (UserWarning) that it is not for production: fine for tests,
        # and must not turn into an error if PYTHONWARNINGS=error is inherited.
        "-W",
        "ignore:mlx_lm.server is not recommended:UserWarning",
        "-m",
        "mlx_lm",
        "server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "WARNING",
    ]


def start_mlx_server(model_dir: Path | str, port: int, tmp: Path) -> subprocess.Popen[bytes]:
    """Start the server in the background; its output goes to tmp/mlx_server-PORT.log.

    HF_HUB_CACHE points at an (existing) folder under `tmp`, because GET /v1/models scans
    the hub cache, and HF_HUB_OFFLINE=1 keeps every hub look-up local.
    """
    tmp = Path(tmp)
    hub_cache = tmp / "hf_hub_cache"
    hub_cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "PYTHONUNBUFFERED": "1"})
    log = (tmp / f"mlx_server-{port}.log").open("wb")
    try:
        return subprocess.Popen(
            mlx_server_command(model_dir, port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    finally:
        log.close()  # the child holds its own copy


def wait_for_mlx_server(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 30.0) -> float:
    """Poll GET /health until 200; return the seconds it took. Raises if the server dies."""
    started = time.monotonic()
    url = f"http://127.0.0.1:{port}/health"
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited with code {proc.returncode}")
            try:
                if client.get(url).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"mlx_lm.server did not answer on port {port} within {timeout_s}s")


def stop_mlx_server(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
