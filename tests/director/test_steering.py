"""No single envoy steers a round beyond its registered weight: not by registering again with a bigger shard
mid-experiment, not through a metric report's sample count or its non-finite values, not by reporting a metric
name of its own to pick the best model, not by taking a name the aggregated metrics use."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedjax_core import records as r
from fedjax_core import strategies as s
from fedjax_core.errors import InvalidRequestError
from fedjax_core.tensors import iter_chunks
from test_round_engine import INFO, header, make_director, model_file, submit, update


def test_registering_again_with_a_huge_shard_mid_experiment_does_not_change_its_weight(tmp_path):
    d = make_director(tmp_path)
    submit(d, header())
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update("a", 0)))
    d.register_envoy("b", dataclasses.replace(INFO, train_size=10**15))  # the same daemon, a "bigger" shard
    d.uploads.accept_update("b", "exp", 0, 10**15, iter_chunks(update("b", 0)))
    got = model_file(tmp_path, 1)
    for name in ("params/w", "params/b"):  # both weighted by the 10 samples they had when the experiment started
        np.testing.assert_allclose(got[name], (update("a", 0)[name] + update("b", 0)[name]) / 2, rtol=1e-6)


def aggregated(d, round_: int, stage=r.Stage.AGGREGATED) -> dict[str, float]:
    [event] = [e for _, e, _ in d.store.events("exp", round_=round_) if not e.envoy and e.stage == stage]
    return {m.name: m.value for m in event.metrics}


def test_a_reports_sample_count_weighs_at_most_the_registered_validation_size(tmp_path):
    d = make_director(tmp_path)  # both registered 5 validation samples
    submit(d, header())
    d.workers.report_metrics("a", "exp", 0, r.Stage.AGGREGATED, (r.Metric("validate", "accuracy", 0.0),), 5)
    d.workers.report_metrics("b", "exp", 0, r.Stage.AGGREGATED, (r.Metric("validate", "accuracy", 1.0),), 2**62)
    for envoy in ("a", "b"):
        d.uploads.accept_update(envoy, "exp", 0, 10, iter_chunks(update(envoy, 0)))
    assert aggregated(d, 0)["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_are_refused_where_they_arrive(tmp_path, value):
    d = make_director(tmp_path)
    submit(d, header())
    with pytest.raises(InvalidRequestError, match=r"envoy 'b' reported validate/accuracy = .*: metrics must be finite"):
        d.workers.report_metrics("b", "exp", 0, r.Stage.AGGREGATED, (r.Metric("validate", "accuracy", value),), 5)
    assert d.store.events("exp") == []


def test_a_metric_only_one_envoy_reports_cannot_pick_the_best_model(tmp_path):
    d = make_director(tmp_path)
    submit(d, header(rounds=2))
    honest = {0: 0.2, 1: 0.6, 2: 0.4}  # validation accuracy of model_r, which round r validates
    for round_ in range(3):
        # b reports first, with a made-up name that sorts first and has 'acc' in it, worst at the best round
        d.workers.report_metrics("b", "exp", round_, r.Stage.AGGREGATED,
                         (r.Metric("validate", "a_acc", -honest[round_]), r.Metric("validate", "accuracy", honest[round_])), 5)
        d.workers.report_metrics("a", "exp", round_, r.Stage.AGGREGATED, (r.Metric("validate", "accuracy", honest[round_]),), 5)
        if round_ < 2:
            for envoy in ("a", "b"):
                d.uploads.accept_update(envoy, "exp", round_, 10, iter_chunks(update(envoy, round_)))
    status = d.catalog.experiment_status("exp")
    assert status.state == "finished"
    assert (status.best_metric, status.best_round, status.best_value) == ("accuracy", 1, pytest.approx(0.6))


def test_names_the_aggregated_metrics_use_are_reserved(tmp_path):
    d = make_director(tmp_path, envoys=())
    for name in ("aggregated", "Aggregated"):
        with pytest.raises(InvalidRequestError, match=f"envoy name '{name}' is reserved"):
            d.register_envoy(name, INFO)


def test_a_daemon_without_an_instance_id_cannot_take_an_online_envoys_name(tmp_path):
    from fedjax_core.errors import AlreadyExistsError

    d = make_director(tmp_path, envoys=())
    d.register_envoy("a", INFO, instance_id="first-daemon")
    for impostor in ("", "", "third"):
        with pytest.raises(AlreadyExistsError, match="an envoy named 'a' is already online"):
            d.register_envoy("a", INFO, instance_id=impostor)
        assert d.heartbeat("a", impostor) is False
    assert d.heartbeat("a", "first-daemon") is True  # the original daemon is still the one it knows
    d.close()


def test_krum_rounds_never_close_with_fewer_uploads_than_krum_needs_after_dropouts(tmp_path):
    """Krum(f=0) needs more than 2 uploads. Four envoys pass the check at submission; min_envoys=1 would let a
    round close with one upload once envoys drop out: Krum's own floor (3) holds instead, and the experiment
    fails saying so rather than 'aggregate' what one envoy sent."""
    d = make_director(tmp_path, envoys=("a", "b", "c", "d"))
    submit(d, header(strategy=s.Krum(num_malicious_clients=0), min_envoys=1))
    d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update("a", 0)))
    d.workers.report_failure("b", "exp", "out of memory", round_=0)  # 3 can still report: the round goes on
    assert d.catalog.experiment_status("exp").state == r.State.RUNNING
    d.workers.report_failure("c", "exp", "out of memory", round_=0)
    status = d.catalog.experiment_status("exp")
    assert status.state == r.State.FAILED and status.current_round == 0
    assert "fewer than the 3 results the round needs (krum aggregates no fewer than 3 uploads)" in status.error
    d.close()


def test_a_final_validation_needs_no_more_than_min_envoys_under_krum(tmp_path):
    d = make_director(tmp_path, envoys=("a", "b", "c"))
    submit(d, header(strategy=s.Krum(num_malicious_clients=0), min_envoys=1, rounds=1))
    for envoy in ("a", "b", "c"):
        d.uploads.accept_update(envoy, "exp", 0, 10, iter_chunks(update(envoy, 0)))
    d.workers.report_failure("c", "exp", "validation crashed", round_=1)  # the final validation is not aggregated by Krum
    assert d.catalog.experiment_status("exp").state == r.State.RUNNING
    d.close()
