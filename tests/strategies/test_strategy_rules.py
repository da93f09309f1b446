"""Every built-in strategy's rule against a numpy reference written another way (through the engine, in memory)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import scipy.stats
from strategy_data import (PARAM_NAMES, PARAMS, WEIGHTS, assert_params, make_global, make_updates, round_updates,
                           run_round, run_rounds, stack, weighted_mean)

from fedjax_core import strategies as s
from fedjax_core.strategies.krum import krum_choice


# --------------------------------------------------------------------------- references
def server_opt_reference(strategy, n_rounds=3, weights=WEIGHTS):
    """The pinned formulas, in float64, round by round."""
    x = {n: np.asarray(a, np.float64) for n, a in make_global().items()}
    m = {n: np.zeros_like(a) for n, a in x.items()}
    v = {n: np.zeros_like(a) for n, a in x.items()}
    out = [x]
    for t in range(n_rounds):
        updates = make_updates(len(weights), seed=t)
        new = {}
        for name in PARAM_NAMES:
            mean = weighted_mean(updates, name, weights)
            if isinstance(strategy, s.FedAvgM):
                m[name] = strategy.server_momentum * m[name] + (x[name] - mean)
                new[name] = x[name] - strategy.server_learning_rate * m[name]
                continue
            delta = mean - x[name]
            beta_1 = 0.0 if isinstance(strategy, s.FedAdagrad) else strategy.beta_1
            m[name] = beta_1 * m[name] + (1 - beta_1) * delta
            if isinstance(strategy, s.FedAdam):
                v[name] = strategy.beta_2 * v[name] + (1 - strategy.beta_2) * delta**2
            elif isinstance(strategy, s.FedYogi):
                v[name] = v[name] - (1 - strategy.beta_2) * delta**2 * np.sign(v[name] - delta**2)
            else:
                v[name] = v[name] + delta**2
            new[name] = x[name] + strategy.eta * m[name] / (np.sqrt(v[name]) + strategy.tau)
        x = new
        out.append(x)
    return out


def krum_reference(updates, weights, f, keep):
    flat = [np.concatenate([np.asarray(u[n], np.float64).ravel() for n in PARAM_NAMES]) for u in updates]
    n = len(flat)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:n - f - 2]))
    chosen = sorted(np.argsort(scores, kind="stable")[:keep])
    return chosen, {name: np.average(stack([updates[i] for i in chosen], name), axis=0,
                                     weights=[weights[i] for i in chosen]) for name in PARAM_NAMES}


# ---------------------------------------------------------------------------------- FedAvg
def test_fedavg_matches_numpy_weighted_mean_for_float_leaves():
    updates = make_updates()
    model, state = run_round(s.FedAvg(), updates)
    assert state == {}
    assert_params(model, {n: weighted_mean(updates, n) for n in PARAM_NAMES})


def test_fedavg_is_weighted_not_plain_mean():
    # Two scalars, 0 and 1, with weights 1 and 3: the weighted mean is 0.75, the plain mean 0.5.
    updates = [{"params/w": np.float32(0.0)}, {"params/w": np.float32(1.0)}]
    model, _ = run_round(s.FedAvg(), updates, weights=(1, 3), global_model={"params/w": np.float32(0)})
    assert float(model["params/w"]) == pytest.approx(0.75)


def test_fedavg_of_a_few_hundred_updates_stays_within_float32_rounding():
    rng = np.random.default_rng(1)
    updates = [{"params/w": (rng.standard_normal(1000) * 0.1 + 1).astype(np.float32)} for _ in range(300)]
    weights = rng.integers(1, 5000, len(updates))
    model, _ = run_round(s.FedAvg(), updates, weights=weights)
    want = np.average(np.stack([u["params/w"] for u in updates]).astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(model["params/w"], want, rtol=1e-7)  # summed in float64: one float32 rounding


# ----------------------------------------------------------------------- server optimizers
@pytest.mark.parametrize("strategy", [s.FedAvgM(), s.FedAvgM(server_learning_rate=0.5, server_momentum=0.5),
                                      s.FedAdam(), s.FedAdam(eta=0.01, beta_1=0.5, beta_2=0.9, tau=1e-3),
                                      s.FedYogi(), s.FedAdagrad(), s.FedAdagrad(eta=0.3, tau=1e-2)],
                         ids=repr)
def test_server_optimizers_follow_their_formulas_over_rounds(strategy):
    got, want = run_rounds(strategy), server_opt_reference(strategy)
    for t in range(1, len(want)):
        assert_params(got[t], want[t])
    assert not np.allclose(got[-1]["params/dense/kernel"], got[-2]["params/dense/kernel"])  # the data moves it


@pytest.mark.parametrize("strategy", [s.FedAvgM(), s.FedAdam(), s.FedYogi(), s.FedAdagrad()], ids=repr)
def test_server_optimizer_state_is_named_tensors_beside_the_params(strategy):
    _, state = run_round(strategy, make_updates())
    slots = ("momentum",) if isinstance(strategy, s.FedAvgM) else ("m", "v")
    assert set(state) == {f"{slot}/{name}" for slot in slots for name in PARAM_NAMES}
    assert state["m/params/half" if "m" in slots else "momentum/params/half"].dtype == np.float32


def test_fedavgm_without_momentum_at_rate_one_is_fedavg():
    updates = make_updates()
    a, _ = run_round(s.FedAvgM(server_learning_rate=1.0, server_momentum=0.0), updates)
    b, _ = run_round(s.FedAvg(), updates)
    assert_params(a, {n: np.asarray(b[n], np.float64) for n in b})


@pytest.mark.parametrize("strategy", [s.FedAvgM(), s.FedAdam(), s.FedYogi(), s.FedAdagrad()], ids=repr)
def test_uploads_identical_to_the_global_model_leave_it_unchanged(strategy):
    x = make_global()
    model, _ = run_round(strategy, [x, x, x], weights=(1, 2, 3), global_model=x)
    for name in PARAMS:
        np.testing.assert_array_equal(model[name], x[name], err_msg=name)


def test_one_upload_under_a_server_optimizer_follows_its_formula():
    strategy = s.FedAdam()
    got = run_rounds(strategy, n_rounds=2, weights=(7,))
    want = server_opt_reference(strategy, n_rounds=2, weights=(7,))
    assert_params(got[2], want[2])


# --------------------------------------------------------------------------- robust rules
def test_fedmedian_is_the_unweighted_coordinate_median():
    updates = make_updates()
    a, _ = run_round(s.FedMedian(), updates)
    b, _ = run_round(s.FedMedian(), updates, weights=(1, 1, 1, 1, 10**6))  # weights do not matter
    assert_params(a, {n: np.median(stack(updates, n), axis=0) for n in PARAM_NAMES})
    for name in PARAMS:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.25, 0.4])
def test_fedtrimmedavg_is_scipy_trim_mean(beta):
    updates = make_updates()
    model, _ = run_round(s.FedTrimmedAvg(beta=beta), updates)
    assert_params(model, {n: scipy.stats.trim_mean(stack(updates, n), beta, axis=0) for n in PARAM_NAMES})


def test_fedtrimmedavg_drops_an_outlier_that_moves_the_mean():
    updates = make_updates()
    updates[0] = {**updates[0], "params/conv/bias": np.full(8, 1e6, np.float32)}
    trimmed, _ = run_round(s.FedTrimmedAvg(beta=0.2), updates)
    mean, _ = run_round(s.FedAvg(), updates)
    assert np.abs(trimmed["params/conv/bias"]).max() < 10 < np.abs(mean["params/conv/bias"]).max()


@pytest.mark.parametrize("f, keep", [(0, 1), (1, 1), (1, 2), (0, 3)])
def test_krum_matches_the_reference_choice_and_weighted_mean(f, keep):
    updates = make_updates()
    chosen, want = krum_reference(updates, WEIGHTS, f, keep)
    assert krum_choice(round_updates(updates), f, keep) == list(chosen)
    model, _ = run_round(s.Krum(num_malicious_clients=f, num_clients_to_keep=keep), updates, state={})
    assert_params(model, want)


def test_krum_chooses_once_per_round(monkeypatch):
    import fedjax_core.strategies.krum as krum

    calls = []
    monkeypatch.setattr(krum, "krum_choice", lambda *args: calls.append(args) or [0, 1])
    run_round(s.Krum(num_clients_to_keep=2), make_updates())
    assert len(calls) == 1  # not once per leaf


def test_krum_never_keeps_a_far_outlier():
    updates = make_updates()
    updates[2] = {n: (a * 1000 if n.startswith("params/") else a) for n, a in updates[2].items()}
    model, _ = run_round(s.Krum(num_malicious_clients=1, num_clients_to_keep=3), updates)
    assert np.abs(model["params/dense/kernel"]).max() < 50 < np.abs(updates[2]["params/dense/kernel"]).max()


# ------------------------------------------------------------------- one or identical uploads
def test_one_upload_gives_that_upload_for_the_averaging_and_robust_rules():
    u = make_updates(1)
    for strategy in (s.FedAvg(), s.FedMedian(), s.FedTrimmedAvg(beta=0.4)):
        model, _ = run_round(strategy, u, weights=(7,))
        for name in PARAMS:
            np.testing.assert_allclose(model[name], u[0][name], rtol=1e-7, err_msg=f"{strategy.name} {name}")


def test_identical_uploads_give_that_upload_for_the_averaging_and_robust_rules():
    u = make_updates(1)[0]
    for strategy in (s.FedAvg(), s.FedMedian(), s.FedTrimmedAvg(), s.Krum(num_malicious_clients=1)):
        model, _ = run_round(strategy, [u] * 5)
        for name in PARAMS:
            np.testing.assert_allclose(model[name], u[name], rtol=1e-6, err_msg=f"{strategy.name} {name}")


def test_identical_uploads_with_different_weights_give_that_upload_bit_for_bit():
    u = make_updates(1)[0]
    model, _ = run_round(s.FedAvg(), [u] * 5)
    for name in PARAM_NAMES + ["opt_state/trace"]:
        assert model[name].tobytes() == u[name].tobytes(), name


# --------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("strategy", [s.FedAvg(), s.FedAdam(eta=0.01), s.FedMedian()], ids=repr)
def test_bfloat16_leaves_aggregate_in_float64_and_come_back_as_bfloat16(strategy):
    rng = np.random.default_rng(4)
    updates = [{"params/w": rng.standard_normal((6, 5)).astype(ml_dtypes.bfloat16)} for _ in range(3)]
    x = {"params/w": np.zeros((6, 5), ml_dtypes.bfloat16)}
    model, state = run_round(strategy, updates, weights=(1, 2, 3), global_model=x)
    assert model["params/w"].dtype == ml_dtypes.bfloat16
    stacked = stack(updates, "params/w")
    if isinstance(strategy, s.FedMedian):
        want = np.median(stacked, axis=0)
    elif isinstance(strategy, s.FedAvg):
        want = np.average(stacked, axis=0, weights=[1, 2, 3])
    else:
        delta = np.average(stacked, axis=0, weights=[1, 2, 3])
        want = 0.01 * (0.1 * delta) / (np.sqrt(0.01 * delta**2) + 1e-9)
        assert state["m/params/w"].dtype == np.float32  # server state at least float32
    np.testing.assert_allclose(np.asarray(model["params/w"], np.float64), want, rtol=1e-2, atol=1e-2)
    assert model["params/w"].tobytes() == want.astype(ml_dtypes.bfloat16).tobytes()  # one rounding, from float64

