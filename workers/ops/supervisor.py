"""A group of child processes started, watched and stopped together (`fleet up`, `fleet demo`,
and the test suite's and benchmarks' worker processes).

Each child logs to its own file. Stopping sends SIGTERM to all (Celery's warm shutdown:
running jobs finish, unstarted ones stay queued), waits, and only then SIGKILLs stragglers.
One child can also be stopped, killed or started again on its own (the tests do, to break
a fleet on purpose).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    ready_marker: str | None = None  # a line fragment in the log that means "serving"
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0  # how many times it was started (restarts append to the same log)
    log_start: int = field(default=0, repr=False)  # the log's size when it last started

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """The whole log, every start included."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ready(self) -> bool:
        """Its ready marker is in what it logged since it was last started."""
        if not self.ready_marker:
            return True
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_start)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return False
        return self.ready_marker in text


class Supervisor:
    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        name: str,
        argv: list[str],
        ready_marker: str | None = None,
        *,
        cwd: Path | None = None,
    ) -> Child:
        child = Child(name, argv, self.log_dir / f"{name}.log", ready_marker, cwd)
        self._launch(child, "wb")
        self.children.append(child)
        return child

    def restart(self, child: Child) -> Child:
        """Start `child`'s command again (stopping it first if it still runs); its log goes
        on in the same file, and wait_ready() waits for what the new process logs."""
        if child.alive():
            self.stop_child(child)
        self._launch(child, "ab")
        if child not in self.children:
            self.children.append(child)
        return child

    def _launch(self, child: Child, mode: str) -> None:
        with open(child.log_path, mode) as log:
            child.log_start = log.tell() if mode == "ab" else 0
            # Own process group: a Ctrl-C in the terminal reaches us, and we stop the
            # children in order, instead of every process racing on the same SIGINT.
            child.process = subprocess.Popen(
                child.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=child.cwd,
                start_new_session=True,
            )
        child.starts += 1

    def wait_ready(self, timeout_s: float = 120, children: Iterable[Child] | None = None) -> None:
        """Wait until every child (or each of `children`) has logged its ready marker.
        Raises RuntimeError, with the log's tail, as soon as a watched child has died."""
        watched = self.children if children is None else list(children)
        deadline = time.monotonic() + timeout_s
        pending = [c for c in watched if c.ready_marker]
        while pending:
            for child in list(pending):
                dead = [
                    c for c in watched if c.process is not None and c.process.poll() is not None
                ]
                if dead:
                    raise RuntimeError(self.describe_death(dead[0]))
                if child.ready():
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

    def kill(self, child: Child, sig: int = signal.SIGKILL, timeout_s: float = 10) -> None:
        """Send `sig` (kill -9 by default) to the child's main process only, and reap it."""
        if child.alive():
            assert child.process is not None
            child.process.send_signal(sig)
            child.process.wait(timeout_s)

    def stop_child(self, child: Child, timeout_s: float = 30) -> None:
        """SIGTERM one child, wait, then SIGKILL its process group if it still runs."""
        self._stop([child], timeout_s)

    def stop(self, timeout_s: float = 30) -> None:
        self._stop(self.children, timeout_s)
        self.children.clear()

    def _stop(self, children: Iterable[Child], timeout_s: float) -> None:
        running = [c for c in children if c.alive()]
        for child in running:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
