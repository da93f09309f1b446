"""How the envoy daemon starts experiment workers: cold, or from a standby started ahead of time.

A standby is a worker process started before any experiment asks for it (``params.standby_worker``).
It imports JAX, Flax, optax and the worker's own code, touches no accelerator, holds no experiment's
state, and waits for one line on stdin: the spec of the experiment it becomes the worker of. From
then on it is that experiment's one worker and exits with it, as a cold one does; the daemon starts
the next standby once the worker is gone. That takes the imports (about 0.5 s on a CPU) off the first
round of every experiment, at the cost of one idle process per envoy between experiments.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger("fedjax.envoy")
WORKER = [sys.executable, "-m", "fedjax_core.envoy.worker"]


class WorkerLauncher:
    """Starts workers with one environment and account; keeps at most one standby ready when asked to."""

    def __init__(self, env: dict[str, str], user: dict, standby: bool):
        self.env, self.user, self.standby = env, user, standby
        self._ready: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._closed = False

    def prepare(self) -> None:
        """Start a standby unless one is alive, standbys are off, or the launcher is closed."""
        with self._lock:
            if not self.standby or self._closed or (self._ready is not None and self._ready.poll() is None):
                return
            try:
                self._ready = subprocess.Popen([*WORKER, "--standby", str(os.getpid())], stdin=subprocess.PIPE,
                                               env=self.env, **self.user)
            except OSError as exc:  # e.g. out of processes: experiments still start cold
                log.warning("could not start a standby worker (%s); the next experiment's worker starts cold", exc)
                self._ready = None

    def launch(self, spec_path: Path) -> tuple[subprocess.Popen, bool]:
        """The worker of the experiment whose spec is at ``spec_path``, and whether it was a standby."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None and ready.poll() is None:
            try:
                ready.stdin.write(f"{spec_path}\n".encode())
                ready.stdin.close()
                return ready, True
            except OSError:  # it died just now: start one cold
                stop_process(ready)
        return subprocess.Popen([*WORKER, str(spec_path)], env=self.env, **self.user), False

    def close(self) -> None:
        """Stop the standby (it holds nothing yet); no new one starts."""
        with self._lock:
            self._closed, ready, self._ready = True, self._ready, None
        if ready is not None:
            stop_process(ready)


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL past ``grace_s``; returns once the process is reaped."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
