"""Personal layers in the director (in-process): tasks name the patterns, personal tensors are neither sent nor
taken, the aggregate keeps their initial values, and the status reports each envoy's latest personalised
validation (from both stores)."""
from __future__ import annotations

import numpy as np
import pytest

from fedjax_core import records as r
from fedjax_core.director.core import Director
from fedjax_core.director.memory_store import MemoryStore
from fedjax_core.director.store import SqliteStore
from fedjax_core.errors import InvalidRequestError
from fedjax_core.model_file import ModelFile
from fedjax_core.spec import ExperimentSpec
from fedjax_core.tensors import iter_chunks, spec_of
from test_core import round_model

INITIAL = {"params/body/w": np.arange(6, dtype=np.float32).reshape(2, 3),
           "params/head/w": np.full((3, 2), 7.0, np.float32), "params/head/b": np.ones(2, np.float32)}
INFO = r.ShardInfo("shard", ("32", "32", "3"), ("1",), 1000, 5)
PATTERNS = ("params/head/**",)


@pytest.fixture
def director(tmp_path):
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)
    for envoy in ("a", "b"):
        d.register_envoy(envoy, INFO)
    spec = ExperimentSpec(name="exp", rounds=2, opt_treatment=r.OptTreatment.RESET, bundle_size=3,
                          model_spec=tuple(spec_of(n, a) for n, a in INITIAL.items()), personal=PATTERNS)
    d.submit_experiment(spec, [b"abc"], iter_chunks(INITIAL))
    yield d
    d.close()


def body(scale: float) -> dict[str, np.ndarray]:
    return {"params/body/w": INITIAL["params/body/w"] * scale}


def test_tasks_carry_the_patterns_and_the_round_model_leaves_the_personal_tensors_out(director):
    task = director.workers.current_task("a", "exp")
    assert task.kind == r.TaskKind.TRAIN and task.personal == PATTERNS
    assert task.upload_tensors == ("params/body/w",)
    assert {chunk.name for chunk in round_model(director, "a", "exp", 0)} == {"params/body/w"}


def test_an_upload_with_a_personal_tensor_is_refused_and_the_aggregate_keeps_the_initial_head(director, tmp_path):
    leaky = {**body(1.0), "params/head/w": INITIAL["params/head/w"] * 2}
    with pytest.raises(InvalidRequestError, match="protocol violation.*'a'.*personal tensor 'params/head/w'"):
        director.uploads.accept_update("a", "exp", 0, 10, iter_chunks(leaky))
    director.uploads.accept_update("a", "exp", 0, 10, iter_chunks(body(1.0)))  # the same envoy, now as it should
    director.uploads.accept_update("b", "exp", 0, 30, iter_chunks(body(5.0)))
    model = ModelFile(tmp_path / "state" / "experiments" / "exp" / "model_round_0001.fjm").arrays()
    np.testing.assert_allclose(model["params/body/w"], INITIAL["params/body/w"] * (10 * 1 + 30 * 5) / 40, rtol=1e-6)
    for name in ("params/head/w", "params/head/b"):
        np.testing.assert_array_equal(model[name], INITIAL[name])


def test_status_reports_each_envoys_latest_personalised_validation(director):
    def validated(envoy: str, round_: int, loss: float) -> None:
        director.workers.report_metrics(envoy, "exp", round_, r.Stage.AGGREGATED,
                                        (r.Metric("validate", "loss", loss),), 5)

    assert director.catalog.experiment_status("exp").personal_validation == ()
    validated("a", 0, 0.9)
    validated("b", 0, 0.8)
    director.workers.report_metrics("a", "exp", 0, r.Stage.LOCAL, (r.Metric("validate", "loss", 0.1),), 5)
    director.uploads.accept_update("a", "exp", 0, 10, iter_chunks(body(1.0)))
    director.uploads.accept_update("b", "exp", 0, 10, iter_chunks(body(1.0)))
    validated("b", 1, 0.5)
    status = director.catalog.experiment_status("exp")
    assert status.personal_validation == (
        r.EnvoyValidation("a", 0, (r.Metric("validate", "loss", 0.9),)),
        r.EnvoyValidation("b", 1, (r.Metric("validate", "loss", 0.5),)))


@pytest.mark.parametrize("make", [lambda p: SqliteStore(p / "db.sqlite"), lambda p: MemoryStore()],
                         ids=["sqlite", "memory"])
def test_latest_envoy_metrics_takes_each_envoys_latest_round_of_the_stage(tmp_path, make):
    store = make(tmp_path)
    for round_, envoy, stage, value in [(0, "b", r.Stage.AGGREGATED, 1.0), (2, "b", r.Stage.AGGREGATED, 3.0),
                                        (1, "b", r.Stage.AGGREGATED, 2.0), (3, "b", r.Stage.LOCAL, 9.0),
                                        (0, "a", r.Stage.AGGREGATED, 4.0), (5, "", r.Stage.AGGREGATED, 8.0)]:
        store.add_event("exp", r.MetricEvent(round=round_, envoy=envoy, stage=stage, timestamp=1.0,
                                             metrics=(r.Metric("v", "acc", value),)))
    store.add_event("other", r.MetricEvent(round=9, envoy="a", stage=r.Stage.AGGREGATED, timestamp=1.0))
    assert store.latest_envoy_metrics("exp", r.Stage.AGGREGATED) == [
        r.EnvoyValidation("a", 0, (r.Metric("v", "acc", 4.0),)), r.EnvoyValidation("b", 2, (r.Metric("v", "acc", 3.0),))]
    assert store.latest_envoy_metrics("none", r.Stage.AGGREGATED) == []
    store.close()
