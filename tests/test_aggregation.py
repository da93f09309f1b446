"""fedjax_core.aggregation: every built-in strategy against a numpy reference written another way."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from fedjax_core import strategies as s
from fedjax_core.aggregation import AggregationError, RoundUpdates, Upload, build
from fedjax_core.records import TensorSpec
from fedjax_core.tensors import ModelFile, ModelFileWriter, spec_of, write_model_file

WEIGHTS = (10, 37, 1000, 5, 64)
PARAMS = {"params/conv/kernel": (3, 3, 3, 8), "params/conv/bias": (8,), "params/dense/kernel": (17, 5),
          "params/scalar": ()}
STRATEGIES = [s.FedAvg(), s.FedAvgM(), s.FedAdam(), s.FedYogi(), s.FedAdagrad(), s.FedMedian(),
              s.FedTrimmedAvg(beta=0.2), s.Krum(num_malicious_clients=1, num_clients_to_keep=2)]


def _updates(n: int = len(WEIGHTS), seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        u = {name: (rng.standard_normal(shape) * (k + 1)).astype(np.float32) for name, shape in PARAMS.items()}
        u["params/half"] = (rng.standard_normal((4, 6)) * 3).astype(np.float16)
        u["opt_state/trace"] = rng.standard_normal((7,)).astype(np.float32)  # float, but not params
        u["opt_state/step"] = np.asarray(rng.integers(0, 100), dtype=np.int32)
        u["opt_state/counts"] = rng.integers(-(2**40), 2**40, size=(5,), dtype=np.int64)
        u["opt_state/flags"] = rng.random((3, 2)) > 0.5
        out.append(u)
    return out


def _global(seed: int = 99) -> dict[str, np.ndarray]:
    return {name: a * 0.5 for name, a in _updates(1, seed)[0].items()}


def _specs(update):
    return update.specs if isinstance(update, ModelFile) else [spec_of(name, a) for name, a in update.items()]


def _round(strategy, updates, weights=WEIGHTS, global_model=None, state=None):
    """One round through the director's rule: fold the uploads, then aggregate."""
    rule = build(strategy)
    specs = _specs(updates[0])
    global_model = global_model if global_model is not None else _global()
    state = rule.init(specs) if state is None else state
    round_updates = RoundUpdates(specs)
    for k, (u, w) in enumerate(zip(updates, weights)):
        round_updates.add(Upload(f"envoy{k}", float(w), u))
    return rule.aggregate(state, global_model, round_updates)


def _rounds(strategy, n_rounds=3, weights=WEIGHTS):
    """Several rounds, each starting from the last round's model: returns [x_0, x_1, ...] of params."""
    x, state, models = _global(), None, []
    models.append(x)
    for t in range(n_rounds):
        model, state = _round(strategy, _updates(len(weights), seed=t), weights, x, state)
        x = model
        models.append(model)
    return models


def _stack(updates, name):
    return np.stack([np.asarray(u[name], np.float64) for u in updates])


def _mean(updates, name, weights=WEIGHTS):
    return np.average(_stack(updates, name), axis=0, weights=np.asarray(weights[:len(updates)], np.float64))


def _tol(name):
    return dict(rtol=2e-3, atol=2e-3) if name == "params/half" else dict(rtol=2e-5, atol=1e-6)


def _assert_params(got, want):
    for name in list(PARAMS) + ["params/half"]:
        np.testing.assert_allclose(np.asarray(got[name], np.float64), want[name], err_msg=name, **_tol(name))


# --------------------------------------------------------------------------- references
def _server_opt_reference(strategy, n_rounds=3, weights=WEIGHTS):
    """The pinned formulas, in float64, round by round."""
    x = {n: np.asarray(a, np.float64) for n, a in _global().items()}
    m = {n: np.zeros_like(a) for n, a in x.items()}
    v = {n: np.zeros_like(a) for n, a in x.items()}
    out = [x]
    for t in range(n_rounds):
        updates = _updates(len(weights), seed=t)
        new = {}
        for name in list(PARAMS) + ["params/half"]:
            mean = _mean(updates, name, weights)
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


def _krum_reference(updates, weights, f, keep):
    names = list(PARAMS) + ["params/half"]
    flat = [np.concatenate([np.asarray(u[n], np.float64).ravel() for n in names]) for u in updates]
    n = len(flat)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:n - f - 2]))
    chosen = sorted(np.argsort(scores, kind="stable")[:keep])
    return chosen, {name: np.average(_stack([updates[i] for i in chosen], name), axis=0,
                                     weights=[weights[i] for i in chosen]) for name in names}


# ---------------------------------------------------------------------------------- FedAvg
def test_fedavg_matches_numpy_weighted_mean_for_float_leaves():
    updates = _updates()
    model, state = _round(s.FedAvg(), updates)
    assert state == {}
    _assert_params(model, {n: _mean(updates, n) for n in list(PARAMS) + ["params/half"]})


def test_fedavg_is_weighted_not_plain_mean():
    # Two scalars, 0 and 1, with weights 1 and 3: the weighted mean is 0.75, the plain mean 0.5.
    updates = [{"params/w": np.float32(0.0)}, {"params/w": np.float32(1.0)}]
    model, _ = _round(s.FedAvg(), updates, weights=(1, 3), global_model={"params/w": np.float32(0)})
    assert float(model["params/w"]) == pytest.approx(0.75)


def test_result_dtype_and_shape_equal_the_inputs_for_every_strategy():
    updates = _updates()
    for strategy in STRATEGIES:
        model, _ = _round(strategy, updates)
        for name, array in updates[0].items():
            assert model[name].dtype == array.dtype, (strategy, name)
            assert model[name].shape == array.shape, (strategy, name)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda x: x.name)
def test_integer_bool_and_non_param_leaves_keep_max_and_weighted_mean(strategy):
    updates = _updates()
    model, _ = _round(strategy, updates)
    for name in ("opt_state/step", "opt_state/counts", "opt_state/flags"):
        np.testing.assert_array_equal(model[name], np.stack([u[name] for u in updates]).max(axis=0), err_msg=name)
    assert np.abs(model["opt_state/counts"]).max() > 2**24  # int64 beyond float32's exact range, bit for bit
    np.testing.assert_allclose(model["opt_state/trace"], _mean(updates, "opt_state/trace"), rtol=1e-6)


def test_update_does_not_mutate_the_callers_arrays():
    updates = _updates()
    copies = [{k: v.copy() for k, v in u.items()} for u in updates]
    for strategy in STRATEGIES:
        _round(strategy, updates)
    for u, c in zip(updates, copies):
        for name in u:
            np.testing.assert_array_equal(u[name], c[name], err_msg=name)


@pytest.mark.parametrize("weight", [0, -1, -0.5, float("nan")])
def test_non_positive_weight_is_refused(weight):
    updates = RoundUpdates([TensorSpec("params/w", "float32", (2,))])
    with pytest.raises(AggregationError, match="weight"):
        updates.add(Upload("a", weight, {"params/w": np.ones(2, np.float32)}))


def test_aggregate_without_update_is_refused():
    rule = build(s.FedAvg())
    with pytest.raises(AggregationError, match="no update"):
        rule.aggregate({}, {}, RoundUpdates([TensorSpec("params/w", "float32", (2,))]))


def test_update_lacking_a_tensor_or_with_a_wrong_shape_is_refused():
    updates = RoundUpdates([TensorSpec("params/w", "float32", (2,))])
    with pytest.raises(AggregationError, match="lacks tensor 'params/w'"):
        updates.add(Upload("a", 1, {}))
    with pytest.raises(AggregationError, match=r"shape \(3,\)"):
        updates.add(Upload("a", 1, {"params/w": np.ones(3, np.float32)}))


def _as_files(tmp_path, tensors_list, prefix):
    paths = []
    for k, tensors in enumerate(tensors_list):
        write_model_file(tmp_path / f"{prefix}{k}.fjm", tensors)
        paths.append(ModelFile(tmp_path / f"{prefix}{k}.fjm"))
    return paths


def test_model_files_aggregate_like_in_memory_arrays_and_are_read_never_mapped(tmp_path, monkeypatch):
    updates = _updates(seed=3)
    files = _as_files(tmp_path, updates, "u")
    (global_file,) = _as_files(tmp_path, [_global()], "global")
    want = {strategy.name: _round(strategy, updates) for strategy in STRATEGIES}

    def mapped(*args, **kwargs):
        raise AssertionError("aggregation mapped a model file: its pages would count in the director's memory")
    monkeypatch.setattr(np, "memmap", mapped)
    for strategy in STRATEGIES:
        rule = build(strategy)
        (state_file,) = _as_files(tmp_path, [rule.init(files[0].specs)], f"state-{strategy.name}-")
        for global_model, state in ((_global(), None), (global_file, state_file)):
            model, new_state = _round(strategy, files, global_model=global_model, state=state)
            for name in want[strategy.name][0]:
                np.testing.assert_array_equal(model[name], want[strategy.name][0][name], err_msg=f"{strategy.name} {name}")
            for key in want[strategy.name][1]:
                np.testing.assert_array_equal(new_state[key], want[strategy.name][1][key], err_msg=f"{strategy.name} {key}")


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda x: x.name)
def test_many_small_blocks_give_the_same_bytes(strategy, tmp_path, monkeypatch):
    """Tensors spread over many blocks (and robust stacks cut short) aggregate to the same bytes."""
    import fedjax_core.aggregation as aggregation

    updates = _updates(seed=5)
    files = _as_files(tmp_path, updates, "u")
    (global_file,) = _as_files(tmp_path, [_global()], "global")
    want, want_state = _round(strategy, updates)
    monkeypatch.setattr(aggregation, "_BLOCK", 7)
    monkeypatch.setattr(aggregation, "_STACK", 16)  # 5 uploads: robust blocks of 3 elements
    (state_file,) = _as_files(tmp_path, [build(strategy).init(files[0].specs)], "state")
    for uploads, global_model, state in ((updates, _global(), None), (files, global_file, state_file)):
        model, new_state = _round(strategy, uploads, global_model=global_model, state=state)
        for name in want:
            np.testing.assert_array_equal(model[name], want[name], err_msg=name)
        for key in want_state:
            np.testing.assert_array_equal(new_state[key], want_state[key], err_msg=key)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda x: x.name)
def test_leaves_written_block_by_block_are_the_aggregated_model(strategy, tmp_path, monkeypatch):
    """What the director does: each new leaf goes to the model file block by block, never whole in memory."""
    import fedjax_core.aggregation as aggregation

    monkeypatch.setattr(aggregation, "_BLOCK", 7)
    updates = _updates(seed=6)
    files = _as_files(tmp_path, updates, "u")
    rule = build(strategy)
    state = rule.init(files[0].specs)
    want, want_state = _round(strategy, files, state=state)
    round_updates = RoundUpdates(files[0].specs)
    for k, (f, w) in enumerate(zip(files, WEIGHTS)):
        round_updates.add(Upload(f"envoy{k}", float(w), f))
    new_state = {}
    with ModelFileWriter(tmp_path / "next.fjm") as writer:
        for name, spec in round_updates.specs.items():
            writer.add_blocks(name, spec.dtype, spec.shape, rule.leaf(name, state, _global(), round_updates, new_state))
        writer.commit()
    got = ModelFile(tmp_path / "next.fjm").arrays()
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name
    assert sorted(new_state) == sorted(want_state)
    for key in want_state:
        assert new_state[key].tobytes() == want_state[key].tobytes(), key


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda x: x.name)
def test_the_order_uploads_arrive_in_does_not_change_a_bit(strategy):
    updates = _updates()
    named = list(zip([f"envoy{k}" for k in range(len(updates))], updates, WEIGHTS))
    results = []
    for order in (named, named[::-1], named[2:] + named[:2]):
        rule = build(strategy)
        specs = _specs(updates[0])
        round_updates = RoundUpdates(specs)
        for envoy, u, w in order:
            round_updates.add(Upload(envoy, float(w), u))
        results.append(rule.aggregate(rule.init(specs), _global(), round_updates))
    for model, state in results[1:]:
        for name in model:
            assert model[name].tobytes() == results[0][0][name].tobytes(), name
        for key in state:
            assert state[key].tobytes() == results[0][1][key].tobytes(), key


def test_identical_uploads_with_different_weights_give_that_upload_bit_for_bit():
    u = _updates(1)[0]
    model, _ = _round(s.FedAvg(), [u] * 5)
    for name in list(PARAMS) + ["params/half", "opt_state/trace"]:
        assert model[name].tobytes() == u[name].tobytes(), name


def test_fedavg_of_a_few_hundred_updates_stays_within_float32_rounding():
    rng = np.random.default_rng(1)
    updates = [{"params/w": (rng.standard_normal(1000) * 0.1 + 1).astype(np.float32)} for _ in range(300)]
    weights = rng.integers(1, 5000, len(updates))
    model, _ = _round(s.FedAvg(), updates, weights=weights)
    want = np.average(np.stack([u["params/w"] for u in updates]).astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(model["params/w"], want, rtol=1e-7)  # summed in float64: one float32 rounding


@pytest.mark.parametrize("strategy, states", [(s.FedAvg(), 0), (s.FedAvgM(), 1), (s.FedAdam(), 2),
                                              (s.FedMedian(), 0), (s.Krum(num_malicious_clients=1), 0)],
                         ids=lambda x: getattr(x, "name", x))
@pytest.mark.parametrize("streamed", [True, False], ids=["to-a-file", "to-arrays"])
def test_aggregating_spooled_updates_allocates_no_upload_and_nothing_model_sized_in_float64(
        strategy, states, streamed, tmp_path, monkeypatch):
    """Python-side allocations (numpy reports its buffers to tracemalloc) of a round of 6 uploads of a
    4 MiB model: the server optimizer's state, the new model unless it is streamed to a file as the
    director does, and blocks (made small here, so that they stand apart from the model)."""
    import tracemalloc

    import fedjax_core.aggregation as aggregation

    monkeypatch.setattr(aggregation, "_BLOCK", 1 << 12)
    monkeypatch.setattr(aggregation, "_STACK", 1 << 14)

    rng = np.random.default_rng(2)
    shapes = {"params/a": (512, 1024), "params/b": (1024, 512), "params/c": (1000,)}
    model_bytes = sum(4 * np.prod(shape) for shape in shapes.values())
    files = _as_files(tmp_path, [{n: rng.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()}
                                 for _ in range(6)], "u")
    (global_file,) = _as_files(tmp_path, [{n: np.zeros(shape, np.float32) for n, shape in shapes.items()}], "g")
    rule = build(strategy)
    (state_file,) = _as_files(tmp_path, [rule.init(files[0].specs)], "state")
    round_updates = RoundUpdates(files[0].specs)
    tracemalloc.start()
    try:
        for k, f in enumerate(files):
            round_updates.add(Upload(f"envoy{k}", 10.0 + k, f))
        if streamed:
            new_state = {}
            with ModelFileWriter(tmp_path / "next.fjm") as writer:
                for name, spec in round_updates.specs.items():
                    writer.add_blocks(name, spec.dtype, spec.shape,
                                      rule.leaf(name, state_file, global_file, round_updates, new_state))
                writer.commit()
        else:
            rule.aggregate(state_file, global_file, round_updates)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    models = states + (0 if streamed else 1)
    assert peak < models * model_bytes + (1 << 20), f"{peak / model_bytes:.2f} x the model"


# ----------------------------------------------------------------------- server optimizers
@pytest.mark.parametrize("strategy", [s.FedAvgM(), s.FedAvgM(server_learning_rate=0.5, server_momentum=0.5),
                                      s.FedAdam(), s.FedAdam(eta=0.01, beta_1=0.5, beta_2=0.9, tau=1e-3),
                                      s.FedYogi(), s.FedAdagrad(), s.FedAdagrad(eta=0.3, tau=1e-2)],
                         ids=repr)
def test_server_optimizers_follow_their_formulas_over_rounds(strategy):
    got, want = _rounds(strategy), _server_opt_reference(strategy)
    for t in range(1, len(want)):
        _assert_params(got[t], want[t])
    assert not np.allclose(got[-1]["params/dense/kernel"], got[-2]["params/dense/kernel"])  # the data moves it


@pytest.mark.parametrize("strategy", [s.FedAvgM(), s.FedAdam(), s.FedYogi(), s.FedAdagrad()], ids=repr)
def test_server_optimizer_state_is_named_tensors_beside_the_params(strategy):
    _, state = _round(strategy, _updates())
    slots = ("momentum",) if isinstance(strategy, s.FedAvgM) else ("m", "v")
    assert set(state) == {f"{slot}/{name}" for slot in slots for name in list(PARAMS) + ["params/half"]}
    assert state["m/params/half" if "m" in slots else "momentum/params/half"].dtype == np.float32


def test_fedavgm_without_momentum_at_rate_one_is_fedavg():
    updates = _updates()
    a, _ = _round(s.FedAvgM(server_learning_rate=1.0, server_momentum=0.0), updates)
    b, _ = _round(s.FedAvg(), updates)
    _assert_params(a, {n: np.asarray(b[n], np.float64) for n in b})


@pytest.mark.parametrize("strategy", [s.FedAvgM(), s.FedAdam(), s.FedYogi(), s.FedAdagrad()], ids=repr)
def test_uploads_identical_to_the_global_model_leave_it_unchanged(strategy):
    x = _global()
    model, _ = _round(strategy, [x, x, x], weights=(1, 2, 3), global_model=x)
    for name in PARAMS:
        np.testing.assert_array_equal(model[name], x[name], err_msg=name)


# --------------------------------------------------------------------------- robust rules
def test_fedmedian_is_the_unweighted_coordinate_median():
    updates = _updates()
    a, _ = _round(s.FedMedian(), updates)
    b, _ = _round(s.FedMedian(), updates, weights=(1, 1, 1, 1, 10**6))  # weights do not matter
    _assert_params(a, {n: np.median(_stack(updates, n), axis=0) for n in list(PARAMS) + ["params/half"]})
    for name in PARAMS:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.25, 0.4])
def test_fedtrimmedavg_is_scipy_trim_mean(beta):
    updates = _updates()
    model, _ = _round(s.FedTrimmedAvg(beta=beta), updates)
    _assert_params(model, {n: scipy.stats.trim_mean(_stack(updates, n), beta, axis=0)
                           for n in list(PARAMS) + ["params/half"]})


def test_fedtrimmedavg_drops_an_outlier_that_moves_the_mean():
    updates = _updates()
    updates[0] = {**updates[0], "params/conv/bias": np.full(8, 1e6, np.float32)}
    trimmed, _ = _round(s.FedTrimmedAvg(beta=0.2), updates)
    mean, _ = _round(s.FedAvg(), updates)
    assert np.abs(trimmed["params/conv/bias"]).max() < 10 < np.abs(mean["params/conv/bias"]).max()


@pytest.mark.parametrize("f, keep", [(0, 1), (1, 1), (1, 2), (0, 3)])
def test_krum_matches_the_reference_choice_and_weighted_mean(f, keep):
    updates = _updates()
    from fedjax_core.aggregation import krum_choice

    rule = build(s.Krum(num_malicious_clients=f, num_clients_to_keep=keep))
    round_updates = RoundUpdates(_specs(updates[0]))
    for k, (u, w) in enumerate(zip(updates, WEIGHTS)):
        round_updates.add(Upload(f"envoy{k}", float(w), u))
    chosen, want = _krum_reference(updates, WEIGHTS, f, keep)
    assert krum_choice(round_updates, f, keep) == list(chosen)
    model, _ = rule.aggregate({}, _global(), round_updates)
    _assert_params(model, want)


def test_krum_never_keeps_a_far_outlier():
    updates = _updates()
    updates[2] = {n: (a * 1000 if n.startswith("params/") else a) for n, a in updates[2].items()}
    model, _ = _round(s.Krum(num_malicious_clients=1, num_clients_to_keep=3), updates)
    assert np.abs(model["params/dense/kernel"]).max() < 50 < np.abs(updates[2]["params/dense/kernel"]).max()


def test_one_upload_gives_that_upload_for_the_averaging_and_robust_rules():
    u = _updates(1)
    for strategy in (s.FedAvg(), s.FedMedian(), s.FedTrimmedAvg(beta=0.4)):
        model, _ = _round(strategy, u, weights=(7,))
        for name in PARAMS:
            np.testing.assert_allclose(model[name], u[0][name], rtol=1e-7, err_msg=f"{strategy.name} {name}")


def test_one_upload_under_a_server_optimizer_follows_its_formula():
    strategy = s.FedAdam()
    got = _rounds(strategy, n_rounds=2, weights=(7,))
    want = _server_opt_reference(strategy, n_rounds=2, weights=(7,))
    _assert_params(got[2], want[2])


def test_identical_uploads_give_that_upload_for_the_averaging_and_robust_rules():
    u = _updates(1)[0]
    for strategy in (s.FedAvg(), s.FedMedian(), s.FedTrimmedAvg(), s.Krum(num_malicious_clients=1)):
        model, _ = _round(strategy, [u] * 5)
        for name in PARAMS:
            np.testing.assert_allclose(model[name], u[name], rtol=1e-6, err_msg=f"{strategy.name} {name}")


@pytest.mark.parametrize("f, n, ok", [(0, 2, False), (0, 3, True), (1, 4, False), (1, 5, True), (2, 6, False)])
def test_krum_refuses_rounds_of_at_most_2f_plus_2(f, n, ok):
    strategy = s.Krum(num_malicious_clients=f)
    if ok:
        strategy.check_round_size(n)
    else:
        with pytest.raises(s.StrategyError, match=f"more than {2 * f + 2} uploads"):
            strategy.check_round_size(n)


def test_krum_refuses_keeping_more_than_a_round_has():
    with pytest.raises(s.StrategyError, match="num_clients_to_keep=4"):
        s.Krum(num_clients_to_keep=4).check_round_size(3)


def test_a_refused_update_is_not_kept():
    specs = [TensorSpec("params/a", "float32", (2,)), TensorSpec("params/b", "float32", (2,)),
             TensorSpec("step", "int32", ())]
    updates = RoundUpdates(specs)
    updates.add(Upload("x", 1, {"params/a": np.ones(2, np.float32), "params/b": np.ones(2, np.float32),
                                "step": np.int32(3)}))
    with pytest.raises(AggregationError, match="'params/b' has shape"):  # 'a' is fine, 'b' is not
        updates.add(Upload("y", 1, {"params/a": np.full(2, 9, np.float32), "params/b": np.ones(3, np.float32),
                                    "step": np.int32(7)}))
    assert updates.count == 1 and updates.total_weight == 1
    assert updates.maximum("step") == 3
    model, _ = build(s.FedAvg()).aggregate({}, {}, updates)
    np.testing.assert_array_equal(model["params/a"], [1, 1])


@pytest.mark.parametrize("strategy", [s.FedAvg(), s.FedAdam(eta=0.01), s.FedMedian()], ids=repr)
def test_bfloat16_leaves_aggregate_in_float64_and_come_back_as_bfloat16(strategy):
    import ml_dtypes

    rng = np.random.default_rng(4)
    updates = [{"params/w": rng.standard_normal((6, 5)).astype(ml_dtypes.bfloat16)} for _ in range(3)]
    x = {"params/w": np.zeros((6, 5), ml_dtypes.bfloat16)}
    model, state = _round(strategy, updates, weights=(1, 2, 3), global_model=x)
    assert model["params/w"].dtype == ml_dtypes.bfloat16
    stack = _stack(updates, "params/w")
    if isinstance(strategy, s.FedMedian):
        want = np.median(stack, axis=0)
    elif isinstance(strategy, s.FedAvg):
        want = np.average(stack, axis=0, weights=[1, 2, 3])
    else:
        delta = np.average(stack, axis=0, weights=[1, 2, 3])
        want = 0.01 * (0.1 * delta) / (np.sqrt(0.01 * delta**2) + 1e-9)
        assert state["m/params/w"].dtype == np.float32  # server state at least float32
    np.testing.assert_allclose(np.asarray(model["params/w"], np.float64), want, rtol=1e-2, atol=1e-2)
    assert model["params/w"].tobytes() == want.astype(ml_dtypes.bfloat16).tobytes()  # one rounding, from float64
