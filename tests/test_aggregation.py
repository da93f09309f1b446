"""fedjax_core.aggregation: the built-in strategies, checked against numpy references."""
from __future__ import annotations

import numpy as np
import pytest

from fedjax_core.aggregation import STRATEGIES, AggregationError, fedavg, get_aggregator
from fedjax_core.records import TensorSpec
from fedjax_core.tensors import ModelFile, spec_of, write_model_file

WEIGHTS = (10, 37, 1000)
FLOAT_SHAPES = {
    "params/conv/kernel": (3, 3, 3, 8),
    "params/conv/bias": (8,),
    "params/dense/kernel": (17, 5),
    "params/scalar": (),
}


def _updates(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(len(WEIGHTS)):
        u = {name: (rng.standard_normal(shape) * (k + 1)).astype(np.float32) for name, shape in FLOAT_SHAPES.items()}
        u["params/half"] = (rng.standard_normal((4, 6)) * 3).astype(np.float16)
        u["opt_state/step"] = np.asarray(rng.integers(0, 100), dtype=np.int32)
        u["opt_state/counts"] = rng.integers(-(2**40), 2**40, size=(5,), dtype=np.int64)
        u["opt_state/flags"] = rng.random((3, 2)) > 0.5
        out.append(u)
    return out


def _specs(update: dict[str, np.ndarray]) -> list[TensorSpec]:
    return [spec_of(name, a) for name, a in update.items()]


def _fold(updates, weights=WEIGHTS, name="fedavg"):
    agg = get_aggregator(name)
    state = agg.init(_specs(updates[0]))
    for u, w in zip(updates, weights):
        state = agg.update(state, u, w)
    return agg.finalize(state)


def _reference(updates, weights=WEIGHTS) -> dict[str, np.ndarray]:
    """The same rule written the other way round: stack, then numpy's weighted average / max."""
    ref = {}
    w = np.asarray(weights, dtype=np.float64)
    for name in updates[0]:
        stacked = np.stack([np.asarray(u[name]) for u in updates])
        dtype = updates[0][name].dtype
        if np.issubdtype(dtype, np.floating):
            ref[name] = np.average(stacked.astype(np.float64), axis=0, weights=w).astype(dtype)
        else:
            ref[name] = stacked.max(axis=0)
    return ref


def test_fedavg_matches_numpy_weighted_mean_for_float_leaves():
    updates = _updates()
    out = _fold(updates)
    ref = _reference(updates)
    assert set(out) == set(updates[0])
    for name in list(FLOAT_SHAPES) + ["params/half"]:
        assert out[name].shape == updates[0][name].shape, name
        tol = 1e-3 if updates[0][name].dtype == np.float16 else 1e-6
        np.testing.assert_allclose(out[name].astype(np.float64), ref[name].astype(np.float64), rtol=tol, atol=tol,
                                   err_msg=name)


def test_fedavg_is_weighted_not_plain_mean():
    # Two scalars, 0 and 1, with weights 1 and 3: the weighted mean is 0.75, the plain mean 0.5.
    agg = fedavg()
    state = agg.init([TensorSpec("w", "float32", ())])
    state = agg.update(state, {"w": np.float32(0.0)}, 1)
    state = agg.update(state, {"w": np.float32(1.0)}, 3)
    assert float(agg.finalize(state)["w"]) == pytest.approx(0.75)


def test_fedavg_weights_dominate_by_sample_count():
    # The 1000-sample update dominates: the result lies much closer to it than to the others.
    updates = _updates()
    out = _fold(updates)
    kernel = "params/dense/kernel"
    d_big = np.abs(out[kernel] - updates[2][kernel]).mean()
    d_small = np.abs(out[kernel] - updates[0][kernel]).mean()
    assert d_big < d_small / 10


def test_result_dtype_equals_input_dtype():
    updates = _updates()
    out = _fold(updates)
    for name, array in updates[0].items():
        assert out[name].dtype == array.dtype, name
        assert out[name].shape == array.shape, name


def test_integer_and_bool_leaves_take_the_elementwise_max():
    updates = _updates()
    out = _fold(updates)
    for name in ("opt_state/step", "opt_state/counts", "opt_state/flags"):
        expected = np.stack([u[name] for u in updates]).max(axis=0)
        np.testing.assert_array_equal(out[name], expected, err_msg=name)
    # A mean of the steps would not be the max (guard that the data exercises the rule).
    steps = [int(u["opt_state/step"]) for u in updates]
    assert len(set(steps)) > 1
    assert int(out["opt_state/step"]) == max(steps)
    # int64 counters beyond float32's exact range survive bit for bit.
    assert np.abs(out["opt_state/counts"]).max() > 2**24


def test_integer_max_is_elementwise_not_per_update():
    agg = fedavg()
    state = agg.init([TensorSpec("c", "int32", (3,)), TensorSpec("b", "bool", (3,))])
    state = agg.update(state, {"c": np.array([5, 0, 2], np.int32), "b": np.array([True, False, False])}, 1)
    state = agg.update(state, {"c": np.array([1, 7, 2], np.int32), "b": np.array([False, False, True])}, 100)
    out = agg.finalize(state)
    np.testing.assert_array_equal(out["c"], [5, 7, 2])
    np.testing.assert_array_equal(out["b"], [True, False, True])
    assert out["b"].dtype == np.bool_


def test_update_does_not_mutate_the_callers_arrays():
    updates = _updates()
    copies = [{k: v.copy() for k, v in u.items()} for u in updates]
    _fold(updates)
    for u, c in zip(updates, copies):
        for name in u:
            np.testing.assert_array_equal(u[name], c[name], err_msg=name)


@pytest.mark.parametrize("weight", [0, -1, -0.5, float("nan")])
def test_non_positive_weight_is_refused(weight):
    agg = fedavg()
    state = agg.init([TensorSpec("w", "float32", (2,))])
    with pytest.raises(AggregationError, match="weight"):
        agg.update(state, {"w": np.ones(2, np.float32)}, weight)


def test_finalize_without_update_is_refused():
    agg = fedavg()
    state = agg.init([TensorSpec("w", "float32", (2,))])
    with pytest.raises(AggregationError, match="no update"):
        agg.finalize(state)


def test_unknown_strategy_is_refused_listing_the_built_ins():
    with pytest.raises(AggregationError) as info:
        get_aggregator("fedmedian")
    message = str(info.value)
    assert "fedmedian" in message
    assert STRATEGIES, "at least one built-in strategy"
    for name in STRATEGIES:
        assert name in message


def test_strategy_names_are_case_insensitive():
    updates = _updates()
    a, b = _fold(updates, name="FedAvg"), _fold(updates, name="fedavg")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_folding_memory_mapped_model_files_equals_in_memory(tmp_path):
    updates = _updates(seed=3)
    in_memory = _fold(updates)
    files = []
    for k, u in enumerate(updates):
        path = tmp_path / f"update_{k}.fjm"
        write_model_file(path, u)
        files.append(ModelFile(path))
    mapped = [{name: mf.array(name) for name in mf.names()} for mf in files]
    assert isinstance(mapped[0]["params/conv/kernel"], np.memmap)
    from_files = _fold(mapped)
    assert set(from_files) == set(in_memory)
    for name in in_memory:
        assert from_files[name].dtype == in_memory[name].dtype, name
        np.testing.assert_array_equal(from_files[name], in_memory[name], err_msg=name)
    # The model files stay untouched (read-only maps, the fold copies what it keeps).
    for mf, u in zip(files, updates):
        for name in u:
            np.testing.assert_array_equal(mf.array(name), u[name], err_msg=name)


def test_init_resets_a_reused_aggregator():
    agg = fedavg()
    spec = [TensorSpec("w", "float32", ())]
    state = agg.update(agg.init(spec), {"w": np.float32(10.0)}, 5)
    agg.finalize(state)
    state = agg.update(agg.init(spec), {"w": np.float32(2.0)}, 1)
    assert float(agg.finalize(state)["w"]) == pytest.approx(2.0)
