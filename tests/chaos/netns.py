"""An island: a network namespace joined to this host by a veth pair, standing in for a
second machine (the tests run as root). A worker started under `island.prefix` reaches
Redis and the provider only through the pair; `cut()` takes the host's end down, as a
pulled cable does, and `heal()` brings it back."""

from __future__ import annotations

import os
import random
import shutil
import subprocess


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Island:
    def __init__(self) -> None:
        if shutil.which("ip") is None or os.geteuid() != 0:
            raise RuntimeError("an island needs root and iproute2 (apt-get install iproute2)")
        n = random.randrange(1, 250)
        self.namespace = f"mf-island-{n}"
        self.host_end, self.island_end = f"mfh{n}", f"mfi{n}"
        self.host_ip, self.island_ip = f"10.77.{n}.1", f"10.77.{n}.2"

    @property
    def prefix(self) -> list[str]:
        """What runs a command inside the island."""
        return ["ip", "netns", "exec", self.namespace]

    def __enter__(self) -> Island:
        _ip("netns", "add", self.namespace)
        try:
            _ip("link", "add", self.host_end, "type", "veth", "peer", "name", self.island_end)
            _ip("link", "set", self.island_end, "netns", self.namespace)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_end)
            _ip("link", "set", self.host_end, "up")
            inside = ["-n", self.namespace]
            _ip(*inside, "addr", "add", f"{self.island_ip}/30", "dev", self.island_end)
            _ip(*inside, "link", "set", self.island_end, "up")
            _ip(*inside, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "link", "del", self.host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)

    def cut(self) -> None:
        _ip("link", "set", self.host_end, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_end, "up")
