"""The director's round-deadline thread survives an error (a full disk at a deadline): the experiment that
hit it fails with a message, and later rounds' deadlines and heartbeat dropouts keep working."""
from __future__ import annotations

import errno
import resource
import sqlite3
import sys
from pathlib import Path

from fedjax_core import records as r
from fedjax_core.director.core import Director
from fedjax_core.tensors import iter_chunks
from fedjax_core.local import Process, free_port
from processes import wait_until, write_director_config
from test_round_engine import INFO, header, submit, update


def tick(d: Director, timer: list[float], to: float) -> None:
    timer[0] = to
    with d.lock:
        d.lock.notify_all()


def test_a_full_disk_at_a_round_deadline_fails_that_experiment_and_deadlines_go_on(tmp_path, monkeypatch):
    timer = [0.0]
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60,
                 timer=lambda: timer[0], envoy_timeout_s=1000)
    try:
        for envoy in ("a", "b"):
            d.register_envoy(envoy, INFO)
        submit(d, header(name="first", round_timeout_s=10, min_envoys=1))
        d.uploads.accept_update("a", "first", 0, 10, iter_chunks(update("a", 0)))  # b never uploads: the deadline closes it

        def disk_full(*_args, **_kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        writes = {"failed": 0}
        real_update = d.store.update_experiment

        def update_experiment(name, **fields):  # the database cannot write the failure either, once
            if fields.get("state") == r.State.FAILED and not writes["failed"]:
                writes["failed"] += 1
                raise sqlite3.OperationalError("database or disk is full")
            return real_update(name, **fields)

        monkeypatch.setattr(d.engine, "close", disk_full)
        monkeypatch.setattr(d.store, "update_experiment", update_experiment)
        tick(d, timer, 11)
        wait_until(lambda: d.catalog.experiment_status("first").state == r.State.FAILED, 30, "the experiment to fail")
        error = d.catalog.experiment_status("first").error
        assert "round 0" in error and "disk" in error, error
        assert d.deadlines.is_alive()

        monkeypatch.undo()
        submit(d, header(name="second", round_timeout_s=10, min_envoys=1))
        wait_until(lambda: d.catalog.experiment_status("second").state == r.State.RUNNING, 30, "the next experiment")
        tick(d, timer, 12)
        d.uploads.accept_update("a", "second", 0, 10, iter_chunks(update("a", 0)))
        tick(d, timer, 30)  # past the second experiment's deadline: the same thread closes its round
        wait_until(lambda: d.catalog.experiment_status("second").current_round == 1, 30, "the deadline to close round 0")
    finally:
        d.close()


def test_the_director_raises_its_open_files_limit_to_the_hard_one(tmp_path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(1024, hard)
    config = write_director_config(tmp_path / "director.yaml", free_port())
    start_low = (f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard})); "
                 f"os.execv(sys.executable, [sys.executable, '-m', 'fedjax_core', 'director', 'start', '-c', "
                 f"{str(config)!r}, '--disable-tls'])")
    director = Process([sys.executable, "-c", start_low], cwd=tmp_path, name="director")
    try:
        director.wait_for("DIRECTOR READY")
        reported = int(director.wait_for(r"open files: up to (\d+) at once").group(1))
        limits = Path(f"/proc/{director.proc.pid}/limits").read_text().splitlines()
        soft = int(next(row for row in limits if row.startswith("Max open files")).split()[3])
        assert soft == reported == min(hard, 1 << 20)
    finally:
        director.stop()
