"""A full disk fails the experiment (or submission) it hit, keeps nothing half-written, and the
director serves on; ended experiments' files are bounded by keep_experiments."""
from __future__ import annotations

import errno
import sys

import numpy as np
import pytest

from fedjax_core import records as r
from fedjax_core.director import closer, transfers
from fedjax_core.director.core import Director
from fedjax_core.errors import NotFoundError, StorageError
from fedjax_core.metrics_log import ExperimentLogger
from fedjax_core.spec import from_flat
from fedjax_core.tensors import iter_chunks, spec_of
from fedjax_core.model_file import ModelFileWriter

INITIAL = {"params/w": np.ones((2, 3), np.float32)}
INFO = r.ShardInfo("shard", ("32", "32", "3"), ("1",), 1000, 5)


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def director(tmp_path):
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)
    d.register_envoy("a", INFO)
    yield d
    d.close()


def submit(d: Director, name: str = "exp", rounds: int = 1) -> None:
    h = from_flat(dict(name=name, rounds=rounds, opt_treatment="RESET", bundle_size=3,
                           model_spec=tuple(spec_of(n, a) for n, a in INITIAL.items())))
    d.submit_experiment(h, [b"abc"], iter_chunks(INITIAL))


def finish(d: Director, name: str) -> None:
    d.uploads.accept_update("a", name, 0, 10, iter_chunks(INITIAL))
    d.workers.report_metrics("a", name, 1, r.Stage.AGGREGATED, (r.Metric("v", "acc", 0.5),), 5)
    assert d.catalog.experiment_status(name).state == r.State.FINISHED


def test_full_disk_while_storing_an_update_fails_the_experiment_and_the_director_serves_on(director, monkeypatch):
    submit(director)
    monkeypatch.setattr(ModelFileWriter, "add_chunk", no_space)
    with pytest.raises(StorageError, match="disk is full: it could not store this update"):
        director.uploads.accept_update("a", "exp", 0, 10, iter_chunks(INITIAL))
    monkeypatch.undo()
    status = director.catalog.experiment_status("exp")
    assert status.state == r.State.FAILED and "disk is full (No space left on device" in status.error
    assert "while storing the update of envoy 'a' for round 0" in status.error
    assert not list((director.state_dir / "incoming").iterdir())  # nothing half-written stays
    assert director.heartbeat("a")
    submit(director, "after")  # space is back: the next experiment runs
    finish(director, "after")


def test_full_disk_while_closing_a_round_fails_the_experiment_cleanly(director, monkeypatch):
    submit(director)
    monkeypatch.setattr(closer, "write_next_model", no_space)
    director.uploads.accept_update("a", "exp", 0, 10, iter_chunks(INITIAL))
    monkeypatch.undo()
    status = director.catalog.experiment_status("exp")
    assert status.state == r.State.FAILED and "closing round 0 failed: the director's disk is full" in status.error
    assert not (director.files.round_dir("exp", 0)).exists()  # the spooled updates went with it
    submit(director, "after")
    finish(director, "after")


def test_full_disk_at_submission_keeps_no_trace_and_the_name_stays_free(director, monkeypatch):
    monkeypatch.setattr(transfers, "write_bundle", no_space)
    with pytest.raises(StorageError, match="experiment 'exp' was not stored; free space there and submit again"):
        submit(director)
    monkeypatch.undo()
    assert not list((director.state_dir / "incoming").iterdir())
    submit(director)  # the same name, once there is space
    finish(director, "exp")


def test_unwritable_tensorboard_logs_do_not_lose_metrics(director, monkeypatch):
    monkeypatch.setattr(ExperimentLogger, "log", no_space)
    submit(director)
    finish(director, "exp")
    stages = {e.stage for _, e, _ in director.store.events("exp")}
    assert {r.Stage.AGGREGATED, r.Stage.ROUND} <= stages


def test_keep_experiments_removes_the_files_of_older_ended_experiments(tmp_path):
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60,
                 keep_experiments=1)
    try:
        d.register_envoy("a", INFO)
        for name in ("one", "two", "three"):
            submit(d, name)
            finish(d, name)
        kept = sorted(p.name for p in (tmp_path / "state" / "experiments").iterdir())
        assert kept == ["three"]
        assert d.catalog.experiment_status("one").state == r.State.FINISHED  # the history stays
        assert [e.stage for _, e, _ in d.store.events("one")]
        with pytest.raises(NotFoundError, match="models of experiment 'one' were removed to bound disk use"):
            d.catalog.model_chunks("one", "last")
        assert next(d.catalog.model_chunks("three", "last")).name == "params/w"
    finally:
        d.close()


def test_director_gc_removes_old_files_on_demand(tmp_path, capsys, caplog):
    from fedjax_core.cli import main

    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)
    d.register_envoy("a", INFO)
    for name in ("one", "two"):
        submit(d, name)
        finish(d, name)
    d.close()
    config = tmp_path / "director.yaml"
    config.write_text(f"settings:\n  sample_shape: ['32', '32', '3']\n  target_shape: ['1']\n"
                      f"  state_dir: {tmp_path / 'state'}\n")
    with caplog.at_level("INFO", "fedjax.director"):
        assert main(["director", "gc", "-c", str(config), "--keep", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "state" / "experiments").iterdir()) == ["two"]
    assert "removed the files of experiment 'one' (--keep=1)" in caplog.text  # what was given, not the setting
    assert main(["director", "gc", "-c", str(config)]) == 2  # how many to keep is not said anywhere
    assert "--keep N (N >= 0), or settings.keep_experiments" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE")
def test_a_file_size_limit_refuses_the_submission_and_the_director_process_stays_up(tmp_path):
    """A real director process whose files may not exceed 8 MiB: a 16 MiB model cannot be stored."""
    from fedjax_core import Federation
    from fedjax_core.local import Process, free_port
    from processes import write_director_config

    port = free_port()
    config = write_director_config(tmp_path / "director.yaml", port)
    limit = 8 << 20
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0})); "
            "from fedjax_core.cli import main; sys.exit(main(sys.argv[1:]))").format(limit)
    proc = Process([sys.executable, "-c", code, "director", "start", "-c", str(config), "--disable-tls"],
                   cwd=tmp_path, name="director")
    try:
        proc.wait_for("DIRECTOR READY")
        client = Federation(director_node_fqdn="127.0.0.1", director_port=port, tls=False).client
        big = {"params/w": np.zeros((4 << 20,), np.float32)}  # 16 MiB
        h = from_flat(dict(name="big", rounds=1, opt_treatment="RESET", bundle_size=3, envoys=(),
                               model_spec=tuple(spec_of(n, a) for n, a in big.items())))
        with pytest.raises(StorageError, match="disk is full .*experiment 'big' was not stored"):
            client.submit(h, b"abc", big)
        assert proc.proc.poll() is None  # still serving
        assert all(s.name != "big" for s in client.experiments())  # and kept no trace of it
    finally:
        proc.stop()
