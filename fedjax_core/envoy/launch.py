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
from concurrent import futures
from pathlib import Path

log = logging.getLogger("fedjax.envoy")
# -s: no user site-packages, which an experiment's code could otherwise leave behind in the worker
# account's home for later experiments to import
WORKER = [sys.executable, "-s", "-m", "fedjax_core.envoy.worker"]


class LauncherClosed(RuntimeError):
    """The daemon is stopping: no worker starts any more."""


class WorkerLauncher:
    """Starts workers with one environment and account; keeps at most one standby ready when asked to.

    Every worker is forked by one long-lived thread of its own: a worker asks the kernel for SIGTERM when
    its parent dies (PR_SET_PDEATHSIG), and the kernel sends it when the *thread* that forked it ends, so a
    worker started from a short-lived thread (one that reaped a crashed worker) would be killed with it."""

    def __init__(self, env: dict[str, str], user: dict, standby: bool):
        self.env, self.user, self.standby = env, user, standby
        self._ready: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._forker = futures.ThreadPoolExecutor(1, thread_name_prefix="worker-launcher")

    def _start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return self._forker.submit(subprocess.Popen, argv, env=self.env, **self.user, **kwargs).result()

    def prepare(self) -> None:
        """Start a standby unless one is alive, standbys are off, or the launcher is closed."""
        with self._lock:
            if not self.standby or self._closed or (self._ready is not None and self._ready.poll() is None):
                return
            try:
                self._ready = self._start([*WORKER, "--standby", str(os.getpid())], stdin=subprocess.PIPE)
            except OSError as exc:  # e.g. out of processes: experiments still start cold
                log.warning("could not start a standby worker (%s); the next experiment's worker starts cold", exc)
                self._ready = None

    def launch(self, spec_path: Path) -> tuple[subprocess.Popen, bool]:
        """The worker of the experiment whose spec is at ``spec_path``, and whether it was a standby.
        Raises LauncherClosed once :meth:`close` has run."""
        with self._lock:
            if self._closed:
                raise LauncherClosed("the envoy daemon is stopping: no new worker")
            ready, self._ready = self._ready, None
        if ready is not None and ready.poll() is None:
            try:
                ready.stdin.write(f"{spec_path}\n".encode())
                ready.stdin.close()
                return ready, True
            except OSError:  # it died just now: start one cold
                stop_process(ready)
        return self._start([*WORKER, str(spec_path)]), False

    def close(self) -> None:
        """Stop the standby (it holds nothing yet); no new one starts."""
        with self._lock:
            self._closed, ready, self._ready = True, self._ready, None
        if ready is not None:
            stop_process(ready)
        self._forker.shutdown(wait=False)


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL past ``grace_s``; returns once the process is reaped."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
