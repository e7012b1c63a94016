"""A private `redis-server` child process: the broker and state store of `fleet up`,
`fleet demo` and the tests (which stop and restart it)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from router.errors import ConfigError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        appendonly: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        """`host`: the address clients use; it listens there and on loopback (a test
        stands a worker in another network namespace, tests/chaos/netns.py)."""
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError(
                "redis-server not found: install it (sudo apt-get install redis-server)"
                " or point FLEET_BROKER_URL at a running Redis"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # fmt: skip below: flag and value on one line read as a table of settings.
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", *dict.fromkeys(["127.0.0.1", self.host]),
            # no password: protected mode would refuse every client not on loopback
            "--protected-mode", "yes" if self.host == "127.0.0.1" else "no",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--save", "",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode()
                raise ConfigError(f"redis-server exited at start: {err.strip()[:200]}")
            if time.monotonic() > deadline:
                raise ConfigError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None
