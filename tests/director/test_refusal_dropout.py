"""An envoy that refuses an experiment drops out of it (every remaining round), durably."""
from __future__ import annotations

import hashlib
import sqlite3

import numpy as np
import pytest

from fedjax_core import records as r
from fedjax_core import strategies as s
from fedjax_core.director.core import Director
from fedjax_core.errors import PreconditionError
from fedjax_core.spec import ExperimentSpec, from_flat
from fedjax_core.tensors import iter_chunks, spec_of

INITIAL = {"params/w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "step": np.array(0, np.int32)}
INFO = r.ShardInfo("shard", ("32", "32", "3"), ("1",), 10, 5)


def make_director(tmp_path, envoys=("a", "b")) -> Director:
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)
    for envoy in envoys:
        d.register_envoy(envoy, INFO)
    return d


def reopen(d: Director, tmp_path) -> Director:
    d.close()
    return Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)


def header(**overrides) -> ExperimentSpec:
    agg, params = s.FedAvg().to_wire()
    fields = dict(name="exp", rounds=3, opt_treatment="CONTINUE_GLOBAL", bundle_size=3, aggregation=agg,
                  aggregation_params=params, model_spec=tuple(spec_of(n, a) for n, a in INITIAL.items()))
    return from_flat({**fields, **overrides})


def submit(d: Director, h: ExperimentSpec) -> None:
    d.submit_experiment(h, [b"abc"], iter_chunks(INITIAL))


def play_round(d: Director, round_: int, envoys: tuple[str, ...]) -> None:
    for envoy in envoys:
        weights = {"params/w": np.full((3, 4), ord(envoy[0]) + round_, np.float32), "step": np.array(1, np.int32)}
        d.uploads.accept_update(envoy, "exp", round_, 10, iter_chunks(weights))


def dropouts(d: Director, name: str = "exp") -> list[r.MetricEvent]:
    return [e for _, e, _ in d.store.events(name) if e.stage == r.Stage.DROPOUT]


def test_a_refusing_envoy_leaves_every_remaining_round_and_a_restart_keeps_it_out(tmp_path):
    d = make_director(tmp_path, envoys=("a", "b", "c"))
    submit(d, header(rounds=2))
    play_round(d, 0, envoys=("a", "b", "c"))
    d.workers.report_failure("b", "exp", "its submitter 'api' is not in settings.accept_from (x)", refused=True)
    [event] = dropouts(d)
    assert event.envoy == "b" and event.round == 1
    assert event.note.startswith("envoy 'b' refused experiment 'exp': its submitter 'api' is not in")
    assert "2 of 3 envoys continue" in event.note
    assert d.catalog.experiment_status("exp").envoys == ("a", "c")
    assert d.workers.current_task("b", "exp").kind == r.TaskKind.FINISHED
    with pytest.raises(PreconditionError, match="not a collaborator"):
        d.workers.report_failure("b", "exp", "again", refused=True)

    d = reopen(d, tmp_path)  # the refusal survives the director
    assert d.catalog.experiment_status("exp").envoys == ("a", "c")
    play_round(d, 1, envoys=("a", "c"))
    run = d.run("exp")
    assert run is not None and run.state.kind == r.TaskKind.VALIDATE and run.state.participants == ("a", "c")
    for envoy in ("a", "c"):
        d.workers.report_metrics(envoy, "exp", 2, r.Stage.AGGREGATED, (r.Metric("val", "acc", 0.5),), 5)
    assert d.catalog.experiment_status("exp").state == "finished"
    # round 1 had sampled b before it refused: it dropped out of it; the final validation left it out
    assert d.catalog.experiment_status("exp").participants == {0: ("a", "b", "c"), 1: ("a", "b", "c")}
    d.close()


def test_a_refusal_mid_round_drops_the_envoy_from_that_round_and_the_round_closes(tmp_path):
    d = make_director(tmp_path)
    submit(d, header(rounds=1))
    play_round(d, 0, envoys=("a",))
    d.workers.report_failure("b", "exp", "refused in review by the envoy's operator", refused=True)
    run = d.run("exp")
    assert run is not None and run.state.kind == r.TaskKind.VALIDATE and run.state.participants == ("a",)
    d.close()


def test_a_refusal_that_leaves_too_few_envoys_fails_the_experiment_saying_so(tmp_path):
    d = make_director(tmp_path)
    submit(d, header(rounds=2, min_envoys=2))
    d.workers.report_failure("b", "exp", "nope", refused=True)
    status = d.catalog.experiment_status("exp")
    assert status.state == "failed"
    assert status.error == ("envoy 'b' refused experiment 'exp' in round 0, leaving fewer than the 2 results round 0 "
                            "needs (min_envoys=2): nope")
    d.close()


def test_the_bundle_sha256_is_recorded_at_submission(tmp_path):
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)
    d.register_envoy("a", INFO)
    d.submit_experiment(header(bundle_size=6), [b"abc", b"def"], iter_chunks(INITIAL))
    assert d.catalog.experiment_bundle_sha256("exp") == hashlib.sha256(b"abcdef").hexdigest()
    d.close()


def test_a_refusal_whose_shrunk_envoy_list_cannot_be_stored_leaves_the_round_as_it_was(tmp_path, monkeypatch):
    d = make_director(tmp_path, envoys=("a", "b", "c"))
    submit(d, header(rounds=1, min_envoys=2))
    play_round(d, 0, envoys=("a", "c"))  # b's refusal would complete the round
    real = d.store.update_experiment

    def locked(name, **fields):
        if "envoys" in fields:
            raise sqlite3.OperationalError("database is locked")
        return real(name, **fields)

    monkeypatch.setattr(d.store, "update_experiment", locked)
    with pytest.raises(sqlite3.OperationalError):
        d.workers.report_failure("b", "exp", "nope", refused=True)
    monkeypatch.undo()
    run = d.run("exp")
    assert run.round == 0 and "b" in run.state.envoys and run.state.pending == {"b"}  # nothing half-done
    d.workers.report_failure("b", "exp", "nope", refused=True)  # the database is back: the refusal goes through
    assert d.run("exp").round == 1 and d.catalog.experiment_status("exp").envoys == ("a", "c")
    d.close()
