"""A round in two calls per envoy: the round's model inside the task, the metric reports inside the upload."""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from fedjax_core import records as r
from fedjax_core.director import worker_calls
from fedjax_core.director.memory_store import MemoryStore
from fedjax_core.director.store import SqliteStore
from fedjax_core.errors import InvalidRequestError, PreconditionError
from fedjax_core.model_file import ModelFile
from fedjax_core.spec import SecureAggregation
from fedjax_core.tensors import assemble, iter_chunks
from test_core import INITIAL, header, make_director, round_model, submit, update


def reports(agg: float, train: float, local: float, valid: int = 5, n_train: int = 10) -> list[r.StageReport]:
    return [r.StageReport(r.Stage.AGGREGATED, (r.Metric("validate", "acc", agg),), valid),
            r.StageReport(r.Stage.TRAIN, (r.Metric("train", "loss", train),), n_train),
            r.StageReport(r.Stage.LOCAL, (r.Metric("validate", "acc", local),), valid)]


@contextlib.contextmanager
def held_elsewhere(lock) -> Iterator[None]:
    """``lock`` held by another thread meanwhile."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        yield
    finally:
        release.set()
        holder.join()


def from_memory(call, *args, **kwargs):
    """``call(*args, **kwargs)``, an answer from memory that is None (or False) while the director's lock is busy,
    asked again while it is: the director's deadline watch takes the lock for a moment after every change."""
    deadline = time.monotonic() + 10
    while ((answer := call(*args, **kwargs)) is None or answer is False) and time.monotonic() < deadline:
        time.sleep(0.001)
    return answer


def round_events(d, round_: int) -> dict[tuple[str, str], r.MetricEvent]:
    return {(e.envoy, e.stage): e for _, e, _ in d.store.events("exp", round_=round_)}


def test_a_plain_training_round_asks_for_reports_with_the_upload_and_others_do_not(tmp_path):
    d = make_director(tmp_path / "plain")
    submit(d, header(rounds=1))
    assert d.workers.current_task("a", "exp").reports_with_upload
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)), reports=reports(0.1, 1.0, 0.2))
    d.uploads.accept_update("b", "exp", 0, 10, iter_chunks(update(1.0)), reports=reports(0.3, 1.0, 0.4))
    final = d.workers.current_task("a", "exp")
    assert final.kind == r.TaskKind.VALIDATE and not final.reports_with_upload  # validation only: ReportMetrics
    d.close()
    d = make_director(tmp_path / "periodic")
    submit(d, header(rounds=4, sync="periodic", sync_every=2))
    task = d.workers.current_task("a", "exp")
    assert task.kind == r.TaskKind.TRAIN and task.check_in and not task.reports_with_upload  # may not upload
    d.close()


def test_reports_in_uploads_are_recorded_and_averaged_like_report_calls(tmp_path):
    d = make_director(tmp_path)
    submit(d)
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)), reports=reports(0.2, 1.5, 0.3, valid=5))
    assert d.catalog.experiment_status("exp").current_round == 0
    events = round_events(d, 0)
    assert {stage for envoy, stage in events if envoy == "a"} == set(r.STAGES)  # kept before the round closes
    assert events[("a", r.Stage.TRAIN)].metrics == (r.Metric("train", "loss", 1.5),)
    d.uploads.accept_update("b", "exp", 0, 30, iter_chunks(update(5.0)), reports=reports(0.6, 0.5, 0.9, valid=5))
    assert d.catalog.experiment_status("exp").current_round == 1
    aggregated = round_events(d, 0)[("", r.Stage.AGGREGATED)].metrics
    # weighted by the validation counts the reports carried (5 and 5; INFO registers 5 validation samples)
    np.testing.assert_allclose([m.value for m in aggregated if m.name == "acc"], [np.average([0.2, 0.6], weights=[5, 5])])
    train = round_events(d, 0)[("", r.Stage.TRAIN)].metrics
    np.testing.assert_allclose([m.value for m in train if m.name == "loss"], [np.average([1.5, 0.5], weights=[10, 10])])
    d.close()


@pytest.mark.parametrize("bad, message", [
    ([r.StageReport("testing", (), 5)], "unknown stage"),
    ([r.StageReport(r.Stage.TRAIN, (), 5), r.StageReport(r.Stage.TRAIN, (), 5)], "each stage at most once"),
    ([r.StageReport(r.Stage.TRAIN, (r.Metric("train", "loss", float("nan")),), 5)], "finite"),
    ([r.StageReport(r.Stage.TRAIN, tuple(r.Metric("t", f"m{i}", 1.0) for i in range(300)), 5)], "at most"),
])
def test_bad_reports_refuse_the_upload_before_anything_is_kept(tmp_path, bad, message):
    d = make_director(tmp_path)
    submit(d)
    with pytest.raises(InvalidRequestError, match=message):
        d.uploads.check_upload("a", "exp", 0, bad)
    with pytest.raises(InvalidRequestError, match=message):
        d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)), reports=bad)
    assert round_events(d, 0) == {}
    assert d.store.updates("exp", 0) == []
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)), reports=reports(0.1, 1.0, 0.2))  # still open
    d.close()


def test_a_secure_round_takes_reports_by_call_and_refuses_them_in_an_upload(tmp_path):
    """Its upload is a masked vector, which the director adds up without recording anything else: reports there
    would be lost, so they are refused."""
    d = make_director(tmp_path)
    spec = dataclasses.replace(header(rounds=1), opt_treatment=r.OptTreatment.RESET,
                               secure=SecureAggregation(True, 0.5, 1.0, 32))
    submit(d, spec)
    task = d.workers.current_task("a", "exp")
    assert task.secagg is not None and not task.reports_with_upload
    with pytest.raises(InvalidRequestError, match="ReportMetrics only"):
        d.uploads.accept_update("a", "exp", 0, 10, iter([]), reports=reports(0.1, 1.0, 0.2))
    assert round_events(d, 0) == {}
    d.close()


def test_the_task_carries_the_rounds_model_as_get_round_model_streams_it(tmp_path):
    d = make_director(tmp_path)
    submit(d)
    task, chunks = d.workers.task_with_model("a", "exp", inline=True)
    assert task.kind == r.TaskKind.TRAIN and chunks is not None
    streamed = assemble(round_model(d, "b", "exp", 0), {})
    carried = assemble(iter(chunks), {})
    assert carried.keys() == streamed.keys() == set(INITIAL)
    for name in INITIAL:
        np.testing.assert_array_equal(carried[name], streamed[name])
        np.testing.assert_array_equal(carried[name], INITIAL[name])
    traffic = d.run("exp").traffic  # counted like a download, for the round's bytes_sent
    assert traffic.bytes_out["a"] == traffic.bytes_out["b"] == sum(a.nbytes for a in INITIAL.values())
    assert d.workers.task_with_model("a", "exp", inline=False) == (task, None)  # an older worker asks for none
    d.close()


def test_a_model_over_the_inline_limit_is_left_to_get_round_model(tmp_path, monkeypatch):
    d = make_director(tmp_path)
    submit(d)
    monkeypatch.setattr(worker_calls, "INLINE_MODEL_BYTES", sum(a.nbytes for a in INITIAL.values()) - 1)
    task, chunks = d.workers.task_with_model("a", "exp", inline=True)
    assert task.kind == r.TaskKind.TRAIN and chunks is None
    d.close()


def test_each_round_carries_its_own_model(tmp_path):
    d = make_director(tmp_path)
    submit(d)
    d.workers.task_with_model("a", "exp", inline=True)  # round 0's model kept
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)))
    d.uploads.accept_update("b", "exp", 0, 10, iter_chunks(update(3.0)))
    task, chunks = d.workers.task_with_model("a", "exp", inline=True)
    assert task.round == 1
    expected = ModelFile(tmp_path / "state" / "experiments" / "exp" / "model_round_0001.fjm").arrays()
    carried = assemble(iter(chunks), {})
    np.testing.assert_allclose(carried["params/b"], np.full(3, 2.0))
    for name, array in expected.items():
        np.testing.assert_array_equal(carried[name], array)
    d.close()


@pytest.mark.parametrize("make_store", [lambda tmp: SqliteStore(tmp / "db.sqlite"), lambda tmp: MemoryStore()],
                         ids=["sqlite", "memory"])
def test_add_events_records_a_batch_and_skips_what_was_recorded(tmp_path, make_store):
    store = make_store(tmp_path)
    store.add_experiment(header())
    first = r.MetricEvent(round=0, envoy="a", stage=r.Stage.TRAIN, metrics=(r.Metric("t", "loss", 1.0),), timestamp=1.0)
    second = r.MetricEvent(round=0, envoy="a", stage=r.Stage.LOCAL, metrics=(r.Metric("v", "acc", 0.5),), timestamp=2.0)
    assert store.add_events("exp", [(first, 10.0), (second, 5.0)]) == [True, True]
    assert store.add_events("exp", [(first, 10.0), (second, 5.0)]) == [False, False]
    rows = store.events("exp")
    assert [(e.stage, w) for _, e, w in rows] == [(r.Stage.TRAIN, 10.0), (r.Stage.LOCAL, 5.0)]
    assert rows[0][0] < rows[1][0]


def test_answers_from_memory_agree_with_the_full_checks_or_defer_to_them(tmp_path):
    """What the event loop answers without a thread (a task, an admitted upload) is what task_with_model and
    check_upload say; with the lock busy, the experiment not running or the round's model not read yet it defers
    to them."""
    d = make_director(tmp_path)
    submit(d)
    w = d.workers
    assert w.task_in_memory("a", "exp", inline=True) is None  # the round's model is not read yet
    assert from_memory(w.task_in_memory, "a", "exp", inline=False) == (w.current_task("a", "exp"), None)
    run = d.run("exp")
    full = w.task_with_model("a", "exp", inline=True)  # reads the model: kept for the round's participants
    assert full[0].kind == r.TaskKind.TRAIN and full[1]
    sent = dict(run.traffic.bytes_out)
    assert from_memory(w.task_in_memory, "b", "exp", inline=True) == w.task_with_model("b", "exp", inline=True)
    tensor_bytes = sum(len(c.data) for c in full[1])
    assert run.traffic.bytes_out["b"] - sent.get("b", 0) == 2 * tensor_bytes  # counted as the full path counts
    assert from_memory(d.uploads.admit_upload_in_memory, "a", "exp", 0, reports(0.1, 1.0, 0.2))
    with pytest.raises(InvalidRequestError, match="finite"):
        from_memory(d.uploads.admit_upload_in_memory, "a", "exp", 0, [r.StageReport(r.Stage.TRAIN, (r.Metric("t", "l", float("nan")),), 5)])
    with pytest.raises(PreconditionError) as refused:
        from_memory(d.uploads.admit_upload_in_memory, "a", "exp", 3)
    with pytest.raises(PreconditionError) as full:
        d.uploads.check_upload("a", "exp", 3)
    assert str(refused.value) == str(full.value)
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)), reports=reports(0.1, 1.0, 0.2))
    assert from_memory(w.task_in_memory, "a", "exp", True) == (w.current_task("a", "exp"), None)  # uploaded: waits
    assert w.current_task("a", "exp").kind == r.TaskKind.NONE
    with pytest.raises(PreconditionError):
        from_memory(d.uploads.admit_upload_in_memory, "a", "exp", 0)  # a second upload for the round

    with held_elsewhere(d.lock):
        assert w.task_in_memory("a", "exp", True) is None  # cannot tell at once: the full look (on a pool thread) will
        assert not d.uploads.admit_upload_in_memory("b", "exp", 0)
    assert w.task_in_memory("a", "other", True) is None and not d.uploads.admit_upload_in_memory("a", "other", 0)  # not running
    d.close()


def test_get_round_model_is_made_once_per_round_and_streams_what_the_uncached_path_does(tmp_path, monkeypatch):
    d = make_director(tmp_path)
    submit(d)
    made = []
    serialized = worker_calls._serialized
    monkeypatch.setattr(worker_calls, "_serialized", lambda *a: made.append(1) or serialized(*a))
    cached = [list(d.workers.round_model(envoy, "exp", 0)) for envoy in ("a", "b")]
    assert cached[0] == cached[1] and len(made) == 1  # one read for both participants
    monkeypatch.setattr(worker_calls, "DOWNLOAD_CACHE_BYTES", 0)  # a model over the bound: read for each
    assert list(d.workers.round_model("a", "exp", 0)) == cached[0] and len(made) == 1
    run = d.run("exp")
    tensor_bytes = sum(len(c.data) for c in round_model(d, "b", "exp", 0))
    assert run.traffic.bytes_out == {"a": 2 * tensor_bytes, "b": 2 * tensor_bytes}  # tensor bytes, both paths
    d.close()


def test_an_upload_costs_one_folder_sync_and_one_database_sync(tmp_path, monkeypatch):
    """The spool's own name is never made durable (it is moved on at once); the kept name is. The update's row
    and the reports it carried are one transaction."""
    from fedjax_core import model_file
    from fedjax_core.director import files

    d = make_director(tmp_path)
    submit(d)
    folders, commits = [], []
    monkeypatch.setattr(model_file, "fsync_dir", lambda path: folders.append(path))
    monkeypatch.setattr(files, "fsync_dir", lambda path: folders.append(path))
    add_updates = d.store.add_updates
    monkeypatch.setattr(d.store, "add_updates", lambda *a: commits.extend(u.envoy for u in a[2]) or add_updates(*a))
    monkeypatch.setattr(d.store, "add_events", lambda *a: commits.append("events"))
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)), reports=reports(0.1, 1.0, 0.2))
    kept = d.store.updates("exp", 0)[0][2]
    assert folders == [kept.parent] and commits == ["a"]
    assert {stage for envoy, stage in round_events(d, 0) if envoy == "a"} == set(r.STAGES)
    assert not list((tmp_path / "state").rglob(".a-*.fjm"))  # no spool left behind
    d.close()


def test_an_ended_experiment_keeps_no_round_model(tmp_path):
    d = make_director(tmp_path)
    submit(d)
    list(d.workers.round_model("a", "exp", 0))
    assert d.workers.inline_model("a", "exp", 0) is not None
    assert d.workers._downloads.nbytes > 0 and d.workers._inline.nbytes > 0
    d.cancel_experiment("exp")
    assert d.workers._downloads.nbytes == 0 and d.workers._inline.nbytes == 0
    d.close()


def test_a_new_rounds_inline_model_is_made_before_its_participants_ask(tmp_path):
    """All of a round's participants ask for its task at once when it opens: made first, each answer comes from
    memory on the event loop instead of every one of them missing the cache and asking again on a thread."""
    d = make_director(tmp_path)
    submit(d)
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)))
    assert d.workers._inline.kept("exp", d.files.model("exp", 1)) is None
    d.uploads.accept_update("b", "exp", 0, 10, iter_chunks(update(3.0)))  # closes round 0
    assert d.run("exp").round == 1 and d.workers._inline.kept("exp", d.files.model("exp", 1)) is not None
    answered = from_memory(d.workers.task_in_memory, "a", "exp", True)
    assert answered is not None and answered[0].round == 1
    np.testing.assert_allclose(assemble(answered[1])["params/w"], INITIAL["params/w"] * 2.0)
    d.close()
