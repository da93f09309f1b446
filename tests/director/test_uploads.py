"""Uploads: small ones spooled on the event loop (``spool_here``) and kept in batches (``keep_spooled``), with
one data sync, one folder sync and one database commit a batch, the same checks and the same round as ``accept_update``."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from fedjax_core import model_file
from fedjax_core import records as r
from fedjax_core.director import files, uploads
from fedjax_core.errors import InvalidRequestError, PreconditionError
from fedjax_core.model_file import ModelFile
from fedjax_core.spec import SecureAggregation
from fedjax_core.tensors import iter_chunks
from test_core import INITIAL, header, make_director, submit, update
from test_one_call_rounds import from_memory, held_elsewhere, reports, round_events


def spool(d, envoy: str, scale: float, round_: int = 0, **kwargs):
    """``spool_here`` of envoy's update, asked again while the lock is busy elsewhere."""
    return from_memory(lambda: d.uploads.spool_here(envoy, "exp", round_, 10, iter_chunks(update(scale)), **kwargs))


def test_a_batch_is_kept_with_one_folder_sync_and_one_commit_and_closes_the_round(tmp_path, monkeypatch):
    d = make_director(tmp_path)
    submit(d)
    synced_files, folders, commits = [], [], []
    monkeypatch.setattr(uploads, "fsync_files", lambda paths: synced_files.append([p.name for p in paths])
                        or [None] * len(paths))
    monkeypatch.setattr(files, "fsync_dir", lambda path: folders.append(path))
    add_updates = d.store.add_updates
    monkeypatch.setattr(d.store, "add_updates", lambda *a: commits.append([u.envoy for u in a[2]]) or add_updates(*a))
    spooled = [spool(d, "a", 1.0, reports=reports(0.1, 1.0, 0.2)), spool(d, "b", 3.0, reports=reports(0.3, 2.0, 0.4))]
    assert not synced_files and not commits  # spooled, not yet durable, not yet known to the round
    assert d.catalog.experiment_status("exp").current_round == 0
    answers = d.uploads.keep_spooled(spooled)
    received = sum(np.asarray(a).nbytes for a in update(1.0).values())
    assert [answer[0] for answer in answers] == [received, received]
    assert answers[0][1] == () and answers[1][1]  # the second completes the round: the caller closes it
    assert len(synced_files) == 1 and len(synced_files[0]) == 2  # their data synced at once
    assert len(folders) == 1 and commits == [["a", "b"]]
    assert {e for e, _ in round_events(d, 0)} == {"a", "b"}  # the reports, recorded with the updates
    d.after(spooled[1].run, answers[1][1])
    assert d.catalog.experiment_status("exp").current_round == 1
    np.testing.assert_allclose(ModelFile(d.files.model("exp", 1))["params/w"], INITIAL["params/w"] * 2.0)
    assert not list((tmp_path / "state").rglob("*.partial")) and not list((tmp_path / "state" / "incoming").iterdir())
    d.close()


def test_spooling_refuses_what_accept_update_refuses(tmp_path):
    d = make_director(tmp_path)
    submit(d)
    with pytest.raises(InvalidRequestError, match="positive count"):
        d.uploads.spool_here("a", "exp", 0, 0, iter_chunks(update(1.0)))
    with pytest.raises(PreconditionError, match="round 1 of 'exp' is not open"):
        spool(d, "a", 1.0, round_=1)
    bad = update(1.0)
    bad["params/b"] = np.full(3, np.nan, np.float32)
    with pytest.raises(InvalidRequestError, match="params/b"):
        from_memory(d.uploads.spool_here, "a", "exp", 0, 10, iter_chunks(bad))
    first = spool(d, "a", 1.0)
    with pytest.raises(PreconditionError, match="already in progress"):
        spool(d, "a", 1.0)
    d.uploads.keep_spooled([first])
    with pytest.raises(PreconditionError, match="already sent its update"):
        spool(d, "a", 1.0)
    assert not d.workers.running("a", "exp").receiving  # every refusal left it
    assert not list((tmp_path / "state" / "incoming").iterdir())
    d.close()


def test_spooling_leaves_to_accept_update_what_it_cannot_tell_at_once(tmp_path):
    d = make_director(tmp_path)
    submit(d, dataclasses.replace(header(rounds=1), opt_treatment=r.OptTreatment.RESET,
                                  secure=SecureAggregation(True, 0.5, 1.0, 32)))
    assert d.uploads.spool_here("a", "exp", 0, 10, iter_chunks(update(1.0))) is None  # secure: summed in memory
    d.close()
    d = make_director(tmp_path / "plain")
    submit(d)
    with held_elsewhere(d.lock):
        assert d.uploads.spool_here("a", "exp", 0, 10, iter_chunks(update(1.0))) is None  # the loop does not wait
    assert spool(d, "a", 1.0, round_=0) is not None
    assert d.uploads.spool_here("a", "ghost", 0, 10, iter_chunks(update(1.0))) is None  # not running: it says why
    d.close()


def test_an_upload_the_round_stopped_taking_while_it_waited_is_refused_and_its_spool_removed(tmp_path):
    d = make_director(tmp_path)
    submit(d)
    late = spool(d, "a", 1.0)
    d.cancel_experiment("exp")
    (answer,) = d.uploads.keep_spooled([late])
    assert isinstance(answer, PreconditionError) and "not open" in str(answer)
    assert not late.update.path.exists() and d.store.updates("exp", 0) == []
    d.close()


def test_a_full_disk_while_keeping_fails_the_experiment_and_says_so(tmp_path, monkeypatch):
    import errno

    d = make_director(tmp_path)
    submit(d)
    spooled = spool(d, "a", 1.0)

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_file, "fsync_file", full)
    (answer,) = d.uploads.keep_spooled([spooled])
    assert "disk is full" in str(answer)
    status = d.catalog.experiment_status("exp")
    assert status.state == r.State.FAILED and "free space" in status.error
    assert not spooled.update.path.exists()
    d.close()


def test_model_file_writer_leaves_the_data_sync_to_its_caller_when_told(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(model_file.os, "fsync", lambda fd: synced.append(fd))
    writer = model_file.ModelFileWriter(tmp_path / "m.fjm")
    writer.add_array("w", np.ones(3, np.float32))
    writer.commit(sync_folder=False, sync=False)
    assert synced == [] and ModelFile(tmp_path / "m.fjm")["w"].tolist() == [1.0, 1.0, 1.0]
    model_file.fsync_file(tmp_path / "m.fjm")
    assert len(synced) == 1


def test_an_updates_data_is_synced_before_the_rounds_keep_lock_is_taken(tmp_path, monkeypatch):
    """Syncing a large update takes a while: other updates of the round are kept meanwhile, as before."""
    d = make_director(tmp_path)
    submit(d)
    run = d.run("exp")
    held_while_syncing = []
    sync = model_file.os.fsync
    monkeypatch.setattr(model_file.os, "fsync", lambda fd: held_while_syncing.append(run.keep_lock.locked()) or sync(fd))
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)))  # streamed: synced as it is spooled
    d.uploads.keep_spooled([spool(d, "b", 3.0)])  # spooled on the loop: synced by the keeper, first
    assert held_while_syncing.count(False) >= 2  # each update's own data
    assert held_while_syncing.count(True) == 2  # the round folder's sync, once per keep
    d.close()



def test_large_updates_write_over_the_last_rounds_files_and_average_as_before(tmp_path):
    big = {"params/w": np.linspace(-1, 1, 1 << 19, dtype=np.float32), "params/b": np.zeros(3, np.float32),
           "step": np.array(0, np.int32)}  # 2 MiB: its update files are kept as spares
    d = make_director(tmp_path)
    submit(d, header(rounds=3, model_spec=tuple(model_file.spec_of(n, a) for n, a in big.items())), iter_chunks(big))
    rng = np.random.default_rng(0)
    spares = set()
    for round_ in range(3):
        sent = {e: {**big, "params/w": rng.standard_normal(1 << 19).astype(np.float32)} for e in ("a", "b")}
        d.uploads.accept_update("a", "exp", round_, 10, iter_chunks(sent["a"]))
        if round_:  # the round's first update took one of the files the round before left
            assert os.stat(d.files.update("exp", round_, "a")).st_ino in spares
        spare_dir = d.files.spare_dir("exp")
        d.uploads.accept_update("b", "exp", round_, 30, iter_chunks(sent["b"]))  # closes the round
        a, b = (sent[e]["params/w"].astype(np.float64) for e in ("a", "b"))
        expected = (10 * a + 30 * b) / 40
        got = ModelFile(d.files.model("exp", round_ + 1))["params/w"]
        np.testing.assert_array_equal(got, expected.astype(np.float32))
        if round_ < 2:
            spares = {os.stat(p).st_ino for p in spare_dir.iterdir()}
            assert len(spares) == 2
    for envoy in ("a", "b"):  # the final model's validation ends the experiment
        d.workers.report_metrics(envoy, "exp", 3, r.Stage.AGGREGATED, (r.Metric("v", "acc", 0.5),), 5)
    assert d.catalog.experiment_status("exp").state == r.State.FINISHED
    assert not d.files.spare_dir("exp").exists()  # the ended experiment's spares went with it
    d.close()
