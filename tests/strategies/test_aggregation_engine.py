"""fedjax_core.aggregation: the round's uploads, the leaf policy, sources, and the memory properties."""
from __future__ import annotations

import dataclasses
import tracemalloc
from typing import ClassVar

import numpy as np
import pytest
from strategy_data import (PARAM_NAMES, STRATEGIES, WEIGHTS, as_files, assert_same_bytes, make_global, make_updates,
                           round_updates, run_round, specs_of, weighted_mean)

import fedjax_core.aggregation as aggregation
from fedjax_core import strategies as s
from fedjax_core.aggregation import (AggregationError, ArraySource, NextState, RoundUpdates, Rule, Upload, aggregate,
                                     init_state, stepper)
from fedjax_core.records import TensorSpec
from fedjax_core.model_file import ModelFile, ModelFileWriter

COUNTERS = ("opt_state/step", "opt_state/counts", "opt_state/flags")


def test_result_dtype_and_shape_equal_the_inputs_for_every_strategy():
    updates = make_updates()
    for strategy in STRATEGIES:
        model, _ = run_round(strategy, updates)
        for name, array in updates[0].items():
            assert model[name].dtype == array.dtype, (strategy, name)
            assert model[name].shape == array.shape, (strategy, name)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda x: x.name)
def test_integer_bool_and_non_param_leaves_keep_max_and_weighted_mean(strategy):
    updates = make_updates()
    model, _ = run_round(strategy, updates)
    for name in COUNTERS:
        np.testing.assert_array_equal(model[name], np.stack([u[name] for u in updates]).max(axis=0), err_msg=name)
    assert np.abs(model["opt_state/counts"]).max() > 2**24  # int64 beyond float32's exact range, bit for bit
    np.testing.assert_allclose(model["opt_state/trace"], weighted_mean(updates, "opt_state/trace"), rtol=1e-6)


@dataclasses.dataclass(frozen=True)
class _Constant(s.Strategy):
    """A rule that ignores the uploads: every params coordinate becomes 3 (not registered)."""

    name: ClassVar[str] = "constant"

    def rule(self) -> Rule:
        def combiner(updates):
            return lambda name: ((block, np.full(block.stop - block.start, 3.0)) for block, _ in updates.stacks(name))
        return Rule(combiner=combiner)


def test_the_engine_applies_the_leaf_policy_to_any_rule():
    """A strategy author writes the params rule only: counters and other float leaves are the engine's."""
    updates = make_updates()
    model, state = run_round(_Constant(), updates)
    for name in PARAM_NAMES:
        assert (model[name] == 3).all(), name
    for name in COUNTERS:
        np.testing.assert_array_equal(model[name], np.stack([u[name] for u in updates]).max(axis=0), err_msg=name)
    np.testing.assert_allclose(model["opt_state/trace"], weighted_mean(updates, "opt_state/trace"), rtol=1e-6)
    assert state == {}


def test_a_rule_with_state_needs_a_step():
    with pytest.raises(ValueError, match="needs a step"):
        Rule(slots=("m",))


def test_update_does_not_mutate_the_callers_arrays():
    updates = make_updates()
    copies = [{k: v.copy() for k, v in u.items()} for u in updates]
    for strategy in STRATEGIES:
        run_round(strategy, updates)
    for u, c in zip(updates, copies):
        for name in u:
            np.testing.assert_array_equal(u[name], c[name], err_msg=name)


@pytest.mark.parametrize("weight", [0, -1, -0.5, float("nan")])
def test_non_positive_weight_is_refused(weight):
    updates = RoundUpdates([TensorSpec("params/w", "float32", (2,))])
    with pytest.raises(AggregationError, match="weight"):
        updates.add(Upload("a", weight, ArraySource({"params/w": np.ones(2, np.float32)})))


def test_aggregate_without_update_is_refused():
    with pytest.raises(AggregationError, match="no update"):
        aggregate(s.FedAvg(), ArraySource({}), ArraySource({}), RoundUpdates([TensorSpec("params/w", "float32", (2,))]))


def test_update_lacking_a_tensor_or_with_a_wrong_shape_or_dtype_is_refused():
    updates = RoundUpdates([TensorSpec("params/w", "float32", (2,))])
    with pytest.raises(AggregationError, match="lacks tensor 'params/w'"):
        updates.add(Upload("a", 1, ArraySource({})))
    with pytest.raises(AggregationError, match=r"shape \(3,\)"):
        updates.add(Upload("a", 1, ArraySource({"params/w": np.ones(3, np.float32)})))
    with pytest.raises(AggregationError, match="'params/w' is float64, expected float32"):
        updates.add(Upload("a", 1, ArraySource({"params/w": np.ones(2, np.float64)})))
    assert updates.count == 0


def test_a_refused_update_is_not_kept():
    specs = [TensorSpec("params/a", "float32", (2,)), TensorSpec("params/b", "float32", (2,)),
             TensorSpec("step", "int32", ())]
    updates = RoundUpdates(specs)
    updates.add(Upload("x", 1, ArraySource({"params/a": np.ones(2, np.float32), "params/b": np.ones(2, np.float32),
                                            "step": np.int32(3)})))
    with pytest.raises(AggregationError, match="'params/b' has shape"):  # 'a' is fine, 'b' is not
        updates.add(Upload("y", 1, ArraySource({"params/a": np.full(2, 9, np.float32),
                                                "params/b": np.ones(3, np.float32), "step": np.int32(7)})))
    assert updates.count == 1 and updates.total_weight == 1
    assert updates.maximum("step") == 3
    model, _ = aggregate(s.FedAvg(), ArraySource({}), ArraySource({}), updates)
    np.testing.assert_array_equal(model["params/a"], [1, 1])


def test_an_array_source_reads_like_a_model_file(tmp_path):
    arrays = make_updates(1)[0]
    (model_file,) = as_files(tmp_path, [arrays], "m")
    memory = ArraySource(arrays)
    for name, array in arrays.items():
        assert memory.spec(name) == model_file.spec(name) and name in memory
        for (a, x), (b, y) in zip(memory.blocks(name, 5, 1), model_file.blocks(name, 5, 1), strict=True):
            assert a == b and x.tobytes() == y.tobytes()
        out_a, out_b = np.empty(array.size - 1, array.dtype), np.empty(array.size - 1, array.dtype)
        assert memory.read_into(name, 1, out_a).tobytes() == model_file.read_into(name, 1, out_b).tobytes()
    assert "nope" not in memory


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda x: x.name)
def test_model_files_aggregate_to_the_bytes_of_array_sources_and_are_read_never_mapped(strategy, tmp_path,
                                                                                       monkeypatch):
    updates = make_updates(seed=3)
    files = as_files(tmp_path, updates, "u")
    (global_file,) = as_files(tmp_path, [make_global()], "global")
    (state_file,) = as_files(tmp_path, [init_state(strategy, files[0].specs)], "state")
    want_model, want_state = run_round(strategy, updates)

    def mapped(*args, **kwargs):
        raise AssertionError("aggregation mapped a model file: its pages would count in the director's memory")
    monkeypatch.setattr(np, "memmap", mapped)
    for global_model, state in ((make_global(), None), (global_file, state_file)):
        model, new_state = run_round(strategy, files, global_model=global_model, state=state)
        assert_same_bytes(model, want_model, strategy.name)
        assert_same_bytes(new_state, want_state, strategy.name)
    assert list(want_state) == list(init_state(strategy, files[0].specs))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda x: x.name)
def test_many_small_blocks_give_the_same_bytes(strategy, tmp_path, monkeypatch):
    """Tensors spread over many blocks (and robust stacks cut short) aggregate to the same bytes."""
    updates = make_updates(seed=5)
    files = as_files(tmp_path, updates, "u")
    (global_file,) = as_files(tmp_path, [make_global()], "global")
    want, want_state = run_round(strategy, updates)
    monkeypatch.setattr(aggregation, "_BLOCK", 7)
    monkeypatch.setattr(aggregation, "_STACK", 16)  # 5 uploads: robust blocks of 3 elements
    (state_file,) = as_files(tmp_path, [init_state(strategy, files[0].specs)], "state")
    for uploads, global_model, state in ((updates, make_global(), None), (files, global_file, state_file)):
        model, new_state = run_round(strategy, uploads, global_model=global_model, state=state)
        assert_same_bytes(model, want)
        assert_same_bytes(new_state, want_state)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda x: x.name)
def test_leaves_written_block_by_block_are_the_aggregated_model(strategy, tmp_path, monkeypatch):
    """What the director's closer does: each new leaf goes to the model file block by block."""
    monkeypatch.setattr(aggregation, "_BLOCK", 7)
    files = as_files(tmp_path, make_updates(seed=6), "u")
    state = ArraySource(init_state(strategy, files[0].specs))
    want, want_state = run_round(strategy, files)
    updates = round_updates(files)
    leaf, new_state = stepper(strategy, state, ArraySource(make_global()), updates), NextState()
    with ModelFileWriter(tmp_path / "next.fjm") as writer:
        for name, spec in updates.specs.items():
            writer.add_blocks(name, spec.dtype, spec.shape, new_state.tee(spec, leaf(name)))
        writer.commit()
    assert_same_bytes(ModelFile(tmp_path / "next.fjm").arrays(), want)
    assert_same_bytes(new_state.arrays, want_state)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda x: x.name)
def test_the_order_uploads_arrive_in_does_not_change_a_bit(strategy):
    updates = make_updates()
    envoys = [f"envoy{k}" for k in range(len(updates))]
    named = list(zip(envoys, updates, WEIGHTS))
    results = []
    for order in (named, named[::-1], named[2:] + named[:2]):
        names, uploads, weights = zip(*order)
        results.append(aggregate(strategy, ArraySource(init_state(strategy, specs_of(updates[0]))),
                                 ArraySource(make_global()), round_updates(uploads, weights, envoys=names)))
    for model, state in results[1:]:
        assert_same_bytes(model, results[0][0])
        assert_same_bytes(state, results[0][1])


@pytest.mark.parametrize("strategy, states", [(s.FedAvg(), 0), (s.FedAvgM(), 1), (s.FedAdam(), 2),
                                              (s.FedMedian(), 0), (s.Krum(num_malicious_clients=1), 0)],
                         ids=lambda x: getattr(x, "name", x))
@pytest.mark.parametrize("streamed", [True, False], ids=["to-a-file", "to-arrays"])
def test_aggregating_spooled_updates_allocates_no_upload_and_nothing_model_sized_in_float64(
        strategy, states, streamed, tmp_path, monkeypatch):
    """Python-side allocations (numpy reports its buffers to tracemalloc) of a round of 6 uploads of a
    4 MiB model: the server optimizer's state, the new model unless it is streamed to a file as the
    director does, and blocks (made small here, so that they stand apart from the model)."""
    monkeypatch.setattr(aggregation, "_BLOCK", 1 << 12)
    monkeypatch.setattr(aggregation, "_STACK", 1 << 14)
    rng = np.random.default_rng(2)
    shapes = {"params/a": (512, 1024), "params/b": (1024, 512), "params/c": (1000,)}
    model_bytes = sum(4 * np.prod(shape) for shape in shapes.values())
    files = as_files(tmp_path, [{n: rng.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()}
                                for _ in range(6)], "u")
    (global_file,) = as_files(tmp_path, [{n: np.zeros(shape, np.float32) for n, shape in shapes.items()}], "g")
    (state_file,) = as_files(tmp_path, [init_state(strategy, files[0].specs)], "state")
    updates = RoundUpdates(files[0].specs)
    tracemalloc.start()
    try:
        for k, f in enumerate(files):
            updates.add(Upload(f"envoy{k}", 10.0 + k, f))
        if streamed:
            leaf, new_state = stepper(strategy, state_file, global_file, updates), NextState()
            with ModelFileWriter(tmp_path / "next.fjm") as writer:
                for name, spec in updates.specs.items():
                    writer.add_blocks(name, spec.dtype, spec.shape, new_state.tee(spec, leaf(name)))
                writer.commit()
        else:
            aggregate(strategy, state_file, global_file, updates)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    models = states + (0 if streamed else 1)
    assert peak < models * model_bytes + (1 << 20), f"{peak / model_bytes:.2f} x the model"
