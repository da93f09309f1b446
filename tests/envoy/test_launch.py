"""The worker launcher: a standby outlives the thread that asked for it, and nothing starts once closed."""
from __future__ import annotations

import os
import threading

import pytest

from fedjax_core.envoy.launch import LauncherClosed, WorkerLauncher
from processes import loaded_jax, wait_until


def test_a_standby_asked_for_by_a_thread_that_ends_is_not_killed_with_it(tmp_path):
    launcher = WorkerLauncher({**os.environ, "JAX_PLATFORMS": "cpu"}, {}, standby=True)
    try:
        # the daemon asks for a standby from the thread that reaped the last worker, which then ends; the
        # standby has asked for SIGTERM when its parent goes (PR_SET_PDEATHSIG) by the time it imports JAX
        asker = threading.Thread(target=lambda: (launcher.prepare(),
                                                 wait_until(lambda: loaded_jax(launcher._ready.pid), 60,
                                                            "the standby to import JAX")))
        asker.start()
        asker.join()
        process, warm = launcher.launch(tmp_path / "missing.json")  # a spec it cannot read: it exits 1
        assert warm
        assert process.wait(timeout=60) == 1  # not -15: the thread's end did not kill it
    finally:
        launcher.close()


def test_nothing_starts_once_the_launcher_is_closed(tmp_path):
    launcher = WorkerLauncher(dict(os.environ), {}, standby=False)
    launcher.close()
    launcher.prepare()  # a no-op
    with pytest.raises(LauncherClosed, match="stopping"):
        launcher.launch(tmp_path / "spec.json")
