"""The worker launcher: a standby outlives the thread that asked for it, each worker gets a folder of its
own, and nothing starts once closed."""
from __future__ import annotations

import os
import threading

import pytest

from fedjax_core.envoy.launch import LauncherClosed, WorkerLauncher
from fedjax_core.envoy.workdir import WorkDir
from processes import loaded_jax, wait_until


def test_a_standby_asked_for_by_a_thread_that_ends_is_not_killed_with_it(tmp_path):
    workdir = WorkDir(tmp_path / "env1", None, None).open()  # no sandbox policy: the launcher alone
    launcher = WorkerLauncher({**os.environ, "JAX_PLATFORMS": "cpu"}, {}, standby=True, workdir=workdir)
    try:
        # the daemon asks for a standby from the thread that reaped the last worker, which then ends; the
        # standby has asked for SIGTERM when its parent goes (PR_SET_PDEATHSIG) by the time it imports JAX
        asker = threading.Thread(target=lambda: (launcher.prepare(),
                                                 wait_until(lambda: loaded_jax(launcher._ready.process.pid), 60,
                                                            "the standby to import JAX")))
        asker.start()
        asker.join()
        standby_run = launcher._ready.run
        launched = launcher.launch(lambda run: None)  # no spec in its folder: it exits 1
        assert launched.warm and launched.run == standby_run
        assert launched.process.wait(timeout=60) == 1  # not -15: the thread's end did not kill it
        cold = launcher.launch(lambda run: None)  # the standby is used up: a cold worker, in a new folder
        assert not cold.warm and cold.run != standby_run and cold.run.parent == workdir.runs
        assert cold.process.wait(timeout=60) == 1
    finally:
        launcher.close()


def test_nothing_starts_once_the_launcher_is_closed(tmp_path):
    launcher = WorkerLauncher(dict(os.environ), {}, standby=False, workdir=WorkDir(tmp_path, None, None).open())
    launcher.close()
    launcher.prepare()  # a no-op
    with pytest.raises(LauncherClosed, match="stopping"):
        launcher.launch(lambda run: None)


def test_a_bundle_that_went_missing_fails_the_launch_and_keeps_the_standby(tmp_path):
    workdir = WorkDir(tmp_path / "env1", None, None).open()
    launcher = WorkerLauncher({**os.environ, "JAX_PLATFORMS": "cpu"}, {}, standby=True, workdir=workdir)
    try:
        launcher.prepare()
        standby = launcher._ready
        with pytest.raises(FileNotFoundError):
            launcher.launch(lambda run: workdir.fill_run(run, "gone", {}))  # its bundle was never downloaded
        assert launcher._ready is standby and standby.process.poll() is None
        assert [p for p in workdir.runs.iterdir() if p != standby.run] == []  # no folder left behind
    finally:
        launcher.close()
