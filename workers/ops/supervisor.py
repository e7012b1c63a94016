"""A group of child processes started, watched and stopped together (`fleet up`, `fleet demo`).

Each child logs to its own file. Stopping sends SIGTERM to all (Celery's warm shutdown:
running jobs finish, unstarted ones stay queued), waits, and only then SIGKILLs stragglers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    ready_marker: str | None = None  # a line fragment in the log that means "serving"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Supervisor:
    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], ready_marker: str | None = None) -> Child:
        child = Child(name, argv, self.log_dir / f"{name}.log", ready_marker)
        with open(child.log_path, "wb") as log:
            # Own process group: a Ctrl-C in the terminal reaches us, and we stop the
            # children in order, instead of every process racing on the same SIGINT.
            child.process = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.children.append(child)
        return child

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        pending = [c for c in self.children if c.ready_marker]
        while pending:
            for child in list(pending):
                dead = self.dead()
                if dead:
                    raise RuntimeError(self.describe_death(dead[0]))
                if child.ready_marker and child.ready_marker in child.log():
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise RuntimeError(
                    f"not ready after {timeout_s:.0f} s: {names} (logs in {self.log_dir})"
                )
            time.sleep(0.05)

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.process is not None and c.process.poll() is not None]

    def describe_death(self, child: Child) -> str:
        code = child.process.returncode if child.process else None
        tail = "\n".join(child.log().splitlines()[-15:])
        return f"{child.name} exited with status {code} (log {child.log_path}):\n{tail}"

    def stop(self, timeout_s: float = 30) -> None:
        running = [c for c in self.children if c.process and c.process.poll() is None]
        for child in running:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
        self.children.clear()
