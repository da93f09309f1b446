"""The daemon's workers when experiments run side by side: only a worker whose experiment the director has
moved on from is stopped, never one of an experiment that still runs."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from fedjax_core.envoy.daemon import EnvoyDaemon, Worker, cache_folder
from fedjax_core.envoy.launch import Launched


class FakeWorkDir:
    def __init__(self):
        self.discarded: list[str] = []

    def discard_bundle(self, name: str) -> None:
        self.discarded.append(name)


@pytest.fixture
def daemon(tmp_path):
    processes = {}

    def worker(name: str) -> Worker:
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        processes[name] = process
        return Worker(Launched(process, tmp_path / name, False), None)

    stub = SimpleNamespace(name="env1", _worker_lock=threading.Lock(), workdir=FakeWorkDir(),
                           _workers={"a": worker("a"), "b": worker("b")})
    yield stub, processes
    for process in processes.values():
        process.kill()
        process.wait()


def test_a_push_naming_the_running_experiments_stops_only_the_workers_of_others(daemon):
    stub, processes = daemon
    EnvoyDaemon._stop_ended(stub, frozenset({"a", "c"}))
    assert list(stub._workers) == ["a"] and processes["a"].poll() is None
    assert processes["b"].wait(timeout=30) is not None and stub.workdir.discarded == ["b"]


def test_a_director_that_names_none_runs_one_experiment_at_a_time(daemon):
    stub, processes = daemon
    EnvoyDaemon._stop_ended(stub, frozenset())
    assert stub._workers == {} and all(p.wait(timeout=30) is not None for p in processes.values())


def test_each_submitter_has_a_cache_folder_of_its_own():
    names = ["api", "CN=lab a/ü", "CN=lab a/u", "x" * 300]
    folders = [cache_folder(n) for n in names]
    assert len(set(folders)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}-[0-9a-f]{12}", f) for f in folders), folders
    assert folders[0].startswith("api-")
