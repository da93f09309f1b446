"""How the envoy daemon starts experiment workers: cold, or from a standby started ahead of time.

A standby is a worker process started before any experiment asks for it (``params.standby_worker``).
It has its own folder and has entered its sandbox, imports JAX, Flax, optax and the worker's own code,
touches no accelerator, holds no experiment's state, and waits for one line on stdin: the daemon's word
that the spec and bundle of the experiment it becomes the worker of are in its folder. From
then on it is that experiment's one worker and exits with it, as a cold one does; the daemon starts
the next standby once the worker is gone. That takes the imports (about 0.5 s on a CPU) off the first
round of every experiment, at the cost of one idle process per envoy between experiments.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import NamedTuple

from fedjax_core.envoy.workdir import WorkDir

log = logging.getLogger("fedjax.envoy")
# -s: no user site-packages, which an experiment's code could otherwise leave behind in the worker
# account's home for later experiments to import
# -P: its folder (the cwd) is not put first on sys.path
WORKER = [sys.executable, "-s", "-P", "-m", "fedjax_core.envoy.start_worker"]


class LauncherClosed(RuntimeError):
    """The daemon is stopping: no worker starts any more."""


class Launched(NamedTuple):
    process: subprocess.Popen
    run: Path  # the worker's own folder (workdir.py)
    warm: bool  # whether it was the standby


class WorkerLauncher:
    """Starts workers with one environment and account, each in a folder of its own (``workdir.new_run``),
    where it enters its sandbox first; keeps at most one standby ready when asked to.

    Every worker is forked by one long-lived thread of its own: a worker asks the kernel for SIGTERM when
    its parent dies (PR_SET_PDEATHSIG), and the kernel sends it when the *thread* that forked it ends, so a
    worker started from a short-lived thread (one that reaped a crashed worker) would be killed with it."""

    def __init__(self, env: dict[str, str], user: dict, standby: bool, workdir: WorkDir):
        self.env, self.user, self.standby, self.workdir = env, user, standby, workdir
        self._ready: Launched | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._forker = futures.ThreadPoolExecutor(1, thread_name_prefix="worker-launcher")

    def _start(self, run: Path, standby: bool) -> subprocess.Popen:
        """A worker in ``run``, in a session of its own (no controlling terminal: it cannot type into the
        operator's), with no stdin but the standby's pipe."""
        argv = [*WORKER, *(["--standby"] if standby else []), str(os.getpid()), str(run)]
        env = {**self.env, **self.workdir.environment(run)}
        return self._forker.submit(subprocess.Popen, argv, env=env, cwd=run, start_new_session=True,
                                   stdin=subprocess.PIPE if standby else subprocess.DEVNULL, **self.user).result()

    def prepare(self) -> None:
        """Start a standby unless one is alive, standbys are off, or the launcher is closed."""
        with self._lock:
            if not self.standby or self._closed or (self._ready is not None and self._ready.process.poll() is None):
                return
            if self._ready is not None:
                self.workdir.close_run(self._ready.run)
            try:
                run = self.workdir.new_run()
                self._ready = Launched(self._start(run, True), run, True)
            except OSError as exc:  # e.g. out of processes: experiments still start cold
                log.warning("could not start a standby worker (%s); the next experiment's worker starts cold", exc)
                self._ready = None

    def launch(self, fill: Callable[[Path], object]) -> Launched:
        """A worker for the experiment that ``fill(run)`` puts into the worker's folder ``run`` (its spec and
        bundle), the standby when one is alive. Raises LauncherClosed once :meth:`close` has run."""
        with self._lock:
            if self._closed:
                raise LauncherClosed("the envoy daemon is stopping: no new worker")
            ready, self._ready = self._ready, None
        if ready is not None and ready.process.poll() is None:
            try:
                fill(ready.run)
            except BaseException:  # e.g. the bundle went missing: the standby stays ready for the next one
                with self._lock:
                    self._ready = ready if self._ready is None and not self._closed else self._ready
                raise
            try:
                ready.process.stdin.write(b"start\n")
                ready.process.stdin.close()
                return ready
            except BrokenPipeError:  # it died just now: start one cold
                stop_process(ready.process)
        if ready is not None:
            self.workdir.close_run(ready.run)
        run = self.workdir.new_run()
        try:
            fill(run)
            return Launched(self._start(run, False), run, False)
        except BaseException:
            self.workdir.close_run(run)
            raise

    def close(self) -> None:
        """Stop the standby (it holds nothing yet); no new one starts."""
        with self._lock:
            self._closed, ready, self._ready = True, self._ready, None
        if ready is not None:
            stop_process(ready.process)
            self.workdir.close_run(ready.run)
        self._forker.shutdown(wait=False)


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL past ``grace_s``; returns once the process is reaped. Whatever it started in
    its session (its process group) is killed with it."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    kill_group(process)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to what a worker left in its process group (a worker leads its own: start_new_session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
