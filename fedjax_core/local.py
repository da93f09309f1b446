"""Run federation processes on this machine: free loopback ports and children whose output
can be waited on line by line. Used by ``make demo``, the tests and local simulations."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process whose output is collected line by line, so tests wait on what it prints."""

    def __init__(self, args: Sequence[str], cwd: Path | None = None, env: dict | None = None, name: str = ""):
        self.name = name or Path(args[0]).name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(list(args), cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """Wait until a printed line matches ``pattern``; fail with the output if the process dies first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{self.name}: no line matching {pattern!r}; output:\n" + "\n".join(self.lines))
                self._cond.wait(timeout=min(left, 1.0))

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode


# Kernel arguments for notebooks run headless (make demo, the tests): ipykernel warns that a
# local kernel "is running over TCP without encryption", which a user who did nothing wrong
# need not read; real errors still show.
QUIET_KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]
