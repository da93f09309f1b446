"""Differentially private experiments end to end on SimulatedFederation (the director's round engine, the envoys'
round runner): what the status, the round events and the stream report, and max_epsilon's early stop."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedjax_core import partition
from fedjax_core.privacy import CentralDP, LocalDP, accounting
from fedjax_core.records import Stage
from fedjax_core.simulation import SimulatedFederation
from fedjax_core.spec import SpecError
from linear_federation import data, linear_state, run


@pytest.fixture(scope="module")
def fed():
    federation = SimulatedFederation.from_arrays(train=data(600, 0), valid=data(120, 1),
                                                 partition=partition.dirichlet(n_envoys=6, alpha=1.0, seed=0))
    yield federation
    federation.close()


def round_metrics(exp) -> dict[int, dict[str, float]]:
    return {e.round: {m.name: m.value for m in e.metrics if m.task == "privacy"}
            for e in exp.history if e.stage == Stage.ROUND and not e.envoy}


def test_central_dp_reports_epsilon_each_round_and_in_the_status(fed):
    privacy = CentralDP(noise_multiplier=1.2, clipping_norm=0.5, delta=1e-5)
    exp = run(fed, "central", rounds=3, envoys_per_round=3, privacy=privacy)
    status = exp.get_experiment_status()
    assert status.state == "finished" and status.delta == 1e-5
    spec = exp_spec(fed, "central")
    per_round = [accounting.experiment_epsilon(spec, k, 0.5) for k in (1, 2, 3)]
    assert status.epsilon == pytest.approx(per_round[-1], rel=1e-12)
    rounds = round_metrics(exp)
    assert [rounds[i]["epsilon"] for i in range(3)] == pytest.approx(per_round, rel=1e-12)
    assert all(rounds[i]["noise_std"] == pytest.approx(1.2 * 0.5 / 3) for i in range(3))
    assert all(rounds[i]["clipping_norm"] == 0.5 for i in range(3))
    assert rounds[2]["epsilon_unsampled"] == pytest.approx(accounting.experiment_epsilon(spec, 3, 1.0), rel=1e-12)
    assert rounds[2]["epsilon_unsampled"] > rounds[2]["epsilon"]


def exp_spec(fed, name):
    return fed.client.store.experiment(name).spec


def test_max_epsilon_stops_training_before_the_round_that_would_exceed_it(fed):
    privacy = CentralDP(noise_multiplier=2.0, clipping_norm=0.5, delta=1e-5, max_epsilon=3.0)
    exp = run(fed, "capped", rounds=8, envoys_per_round=3, privacy=privacy)
    status = exp.get_experiment_status()
    spec = exp_spec(fed, "capped")
    trained = accounting.rounds_within(spec, 0.5)
    assert 1 <= trained < 8
    assert status.state == "finished" and status.current_round == trained
    assert status.epsilon <= 3.0 < accounting.experiment_epsilon(spec, trained + 1, 0.5)
    last = next(e for e in exp.history if e.stage == Stage.ROUND and e.round == trained - 1)
    assert f"training stops after round {trained - 1}" in last.note and "max_epsilon=3" in last.note
    final = [e for e in exp.history if e.stage == Stage.AGGREGATED and e.envoy and e.round == trained]
    assert len(final) == 6  # every envoy validated the last model
    assert not [e for e in exp.history if e.stage == Stage.TRAIN and e.round >= trained]


def test_local_dp_noises_every_upload_before_the_director_sees_it(fed, monkeypatch):
    from fedjax_core.simulation import envoys as virtual

    seen = []
    upload = virtual.VirtualEnvoys.upload

    def spy(self, envoy, round_, sample_count, tensors, encodings, applied=(0.0, 0.0)):
        base = self.model(round_)
        seen.append((applied, {n: np.asarray(t, np.float64) - base[n] for n, t in tensors.items()}))
        return upload(self, envoy, round_, sample_count, tensors, encodings, applied)

    monkeypatch.setattr(virtual.VirtualEnvoys, "upload", spy)
    exp = run(fed, "local", rounds=2, privacy=LocalDP(clipping_norm=0.05, epsilon=4.0, delta=1e-5))
    status = exp.get_experiment_status()
    z = accounting.local_noise_multiplier(4.0, 1e-5)
    assert status.state == "finished" and status.epsilon == pytest.approx(
        accounting.epsilon_of(z, 1.0, 2, 1e-5), rel=1e-12)
    assert len(seen) == 12
    squares = []
    for applied, change in seen:
        assert applied == pytest.approx((0.05, 0.05 * z))
        squares.append(sum(float(np.vdot(d, d)) for d in change.values()))
    sigma2, size = (0.05 * z) ** 2, 15  # 15 parameters; the clipped change itself is at most 0.05 long
    # 12 uploads x 15 coordinates of noise: the mean squared length is 15 sigma^2 (+ at most C^2), within ~11%
    assert 0.6 * size * sigma2 < np.mean(squares) < 1.5 * (size * sigma2 + 0.05 ** 2)


def test_a_refused_combination_fails_start_before_anything_is_sent(fed):
    from fedjax_core import Periodic

    with pytest.raises(SpecError, match="check-ins that no noise covers"):
        run(fed, "refused", rounds=2, sync=Periodic(every=2),
            privacy=CentralDP(noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5))
    assert "refused" not in {s.name for s in fed.client.experiments()}
    from fedjax_core.errors import InvalidRequestError
    from fedjax_core.privacy import SecureAggregation

    with pytest.raises(InvalidRequestError, match="does not run secure aggregation: its envoys share one process"):
        run(fed, "masked", rounds=1, secure_aggregation=SecureAggregation())
    assert math.isnan(run(fed, "plain", rounds=1).get_experiment_status().epsilon)
    assert linear_state() is not None
