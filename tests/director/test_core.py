"""The director's federation logic in-process: folding, rounds, restarts and hostile input."""
from __future__ import annotations

import numpy as np
import pytest

from fedjax_core import records as r
from fedjax_core import serde
from fedjax_core.director.core import Director
from fedjax_core.director.round_machine import DeadlinePassed
from fedjax_core.errors import AlreadyExistsError, InvalidRequestError, PreconditionError
from fedjax_core.spec import ExperimentSpec, from_flat
from fedjax_core.tensors import iter_chunks, spec_of
from fedjax_core.model_file import ModelFile
from fedjax_proto import tensors_pb2 as t_pb

INITIAL = {"params/w": np.arange(6, dtype=np.float32).reshape(2, 3), "params/b": np.zeros(3, np.float32),
           "step": np.array(0, np.int32)}
INFO = r.ShardInfo("shard", ("32", "32", "3"), ("1",), 1000, 5)


def make_director(tmp_path) -> Director:
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)
    for envoy in ("a", "b"):
        d.register_envoy(envoy, INFO)
    return d


def header(name="exp", **overrides) -> ExperimentSpec:
    fields = dict(name=name, rounds=2, opt_treatment="CONTINUE_GLOBAL", bundle_size=3,
                  model_spec=tuple(spec_of(n, a) for n, a in INITIAL.items()))
    return from_flat({**fields, **overrides})


def submit(d: Director, h: ExperimentSpec | None = None, chunks=None) -> int:
    return d.submit_experiment(h or header(), [b"abc"], chunks if chunks is not None else iter_chunks(INITIAL))


def round_model(d: Director, envoy: str, experiment: str, round_: int) -> list[r.TensorChunk]:
    """What GetRoundModel streams to ``envoy``'s worker, parsed back into chunks."""
    return list(serde.chunk_stream(t_pb.TensorChunk.FromString(m)
                                   for m in d.workers.round_model(envoy, experiment, round_)))


def update(scale: float) -> dict[str, np.ndarray]:
    return {"params/w": INITIAL["params/w"] * scale, "params/b": np.full(3, scale, np.float32),
            "step": np.array(int(scale), np.int32)}


def test_updates_are_averaged_by_sample_count(tmp_path):
    d = make_director(tmp_path)
    submit(d)
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)))
    d.uploads.accept_update("b", "exp", 0, 30, iter_chunks(update(5.0)))
    model = ModelFile(tmp_path / "state" / "experiments" / "exp" / "model_round_0001.fjm").arrays()
    np.testing.assert_allclose(model["params/w"], INITIAL["params/w"] * (10 * 1 + 30 * 5) / 40, rtol=1e-6)
    np.testing.assert_allclose(model["params/b"], np.full(3, 4.0), rtol=1e-6)
    assert model["step"] == 5  # counters take the max
    assert d.catalog.experiment_status("exp").current_round == 1
    d.close()


def test_restart_after_every_update_but_before_the_close_finishes_the_round(tmp_path, monkeypatch):
    d = make_director(tmp_path)
    submit(d)
    monkeypatch.setattr(Director, "_close", lambda self, run: None)  # killed right here
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)))
    d.uploads.accept_update("b", "exp", 0, 10, iter_chunks(update(3.0)))
    d.close()
    monkeypatch.undo()
    restarted = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)
    assert restarted.catalog.experiment_status("exp").current_round == 1
    model = ModelFile(tmp_path / "state" / "experiments" / "exp" / "model_round_0001.fjm").arrays()
    np.testing.assert_allclose(model["params/b"], np.full(3, 2.0))
    restarted.close()


def test_a_straggler_whose_round_closed_meanwhile_is_told_so(tmp_path):
    d = make_director(tmp_path)
    submit(d, header(round_timeout_s=60, min_envoys=1))
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update(1.0)))

    def straggling_chunks():
        chunks = list(iter_chunks(update(2.0), chunk_bytes=8))
        yield chunks[0]
        run = d.run("exp")
        with d.lock:  # the deadline closes round 0 while "b" is still uploading
            effects = d.act(run, DeadlinePassed())
        d.after(run, effects)
        yield from chunks[1:]

    with pytest.raises(PreconditionError, match="round 0 of 'exp' is not open"):
        d.uploads.accept_update("b", "exp", 0, 10, straggling_chunks())
    assert d.catalog.experiment_status("exp").current_round == 1
    assert not list((tmp_path / "state" / "incoming").iterdir())  # the spooled upload is gone
    d.close()


def test_a_name_being_submitted_is_taken(tmp_path):
    d = make_director(tmp_path)

    def chunks_with_a_rival():
        with pytest.raises(AlreadyExistsError):
            submit(d)  # same name while the first submission streams
        yield from iter_chunks(INITIAL)

    submit(d, chunks=chunks_with_a_rival())
    assert d.catalog.experiment_status("exp").state == "running"
    assert (tmp_path / "state" / "experiments" / "exp" / "bundle.bin").read_bytes() == b"abc"
    d.close()


def test_a_failed_submission_frees_its_name(tmp_path):
    d = make_director(tmp_path)
    with pytest.raises(InvalidRequestError, match="initial model"):
        submit(d, chunks=iter_chunks({"params/w": INITIAL["params/w"]}))  # tensors missing
    assert [s.name for s in d.catalog.experiments()] == []
    submit(d)
    assert d.catalog.experiment_status("exp").state == "running"
    d.close()


@pytest.mark.parametrize("overrides, message", [
    (dict(model_spec=(r.TensorSpec("params/w", "float32", (1,) * 70),)), "at most 32 dimensions"),
    (dict(model_spec=(r.TensorSpec("params/w", "float32", (2**31, 2**31, 0)),)), "from 0 to 2\\*\\*31 - 1"),
    (dict(model_spec=(r.TensorSpec("params/w", "float32", (2**30, 2**30)),)), "larger than 64 GiB"),
    (dict(round_timeout_s=float("inf")), "round_timeout_s must be a number of seconds from 0"),
    (dict(round_timeout_s=float("nan")), "round_timeout_s must be a number of seconds from 0"),
    (dict(envoys=("a", "alcie")), "no envoy named 'alcie' has registered; registered envoys: a, b"),
    (dict(envoys=("a", "a")), "lists an envoy twice"),
    (dict(name="x\n"), "experiment name 'x\\\\n' is not valid"),
    (dict(name="../escape"), "is not valid"),
])
def test_hostile_headers_are_refused_and_the_director_keeps_working(tmp_path, overrides, message):
    d = make_director(tmp_path)
    with pytest.raises(InvalidRequestError, match=message):
        submit(d, header(**overrides), chunks=iter([]))
    submit(d)  # the next, valid experiment runs
    assert d.catalog.experiment_status("exp").state == "running"
    d.close()


def test_envoys_registering_while_nothing_is_queued_read_no_registry(tmp_path, monkeypatch):
    """Each registration looks for queued experiments to start; with none it must not read every envoy's shard
    info (a thousand envoys registering would read it a million times)."""
    d = make_director(tmp_path)
    reads = []
    original = d.store.envoys
    monkeypatch.setattr(d.store, "envoys", lambda *a, **k: reads.append(a) or original(*a, **k))
    for i in range(20):
        d.register_envoy(f"e{i}", INFO)
    assert reads == []
    submit(d, header("first", envoys=("a", "b")))
    submit(d, header("second", envoys=("a", "b")))  # queued behind the first
    assert d.catalog.experiment_status("second").state == r.State.QUEUED
    reads.clear()
    d.register_envoy("late", INFO)  # queued work: an envoy coming online looks at who is online
    assert reads
    d.close()
