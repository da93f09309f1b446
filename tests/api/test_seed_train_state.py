"""OpenFL's tutorial notebook, with its own ``CustomTrainState`` (``opt_vars`` a pytree list of strings),
runs here with the imports changed: leaves that are not arrays stay with the template and never travel,
while arrays of a dtype the wire cannot carry are still refused."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from fedjax_core import FLExperiment, ModelInterface
from fedjax_core import records as r
from fedjax_core.api.model_tensors import StaticList, canonicalize, state_to_tensors, tensors_to_state
from fedjax_core.tensors import TensorError
from fl_experiment import SubsetDataset
from processes import Stack
from seed_tutorial import CustomTrainState, apply_model, create_train_state, seed_tasks


def test_the_seeds_string_opt_vars_stay_with_the_template():
    state = create_train_state()
    assert state.opt_vars == ["trace"]  # a pytree field of the seed's class: its strings are leaves
    tensors = state_to_tensors(state)
    assert not any(name.startswith("opt_vars") for name in tensors)
    assert "params/Dense_0/kernel" in tensors and "opt_state/0/trace/Dense_0/kernel" in tensors
    doubled = {name: np.asarray(a) * 2 for name, a in tensors.items() if name.startswith("params/")}
    restored = tensors_to_state(state, doubled)
    assert restored.opt_vars == ["trace"]
    with pytest.raises(TypeError, match="state.opt_vars"):  # JAX refuses a string leaf...
        apply_model(state, np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int32))
    static = canonicalize(state)  # ...so workers hold such lists as static structure, and the state jits
    assert isinstance(static.opt_vars, StaticList) and static.opt_vars == ["trace"]
    apply_model(static, np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int32))
    assert sorted(state_to_tensors(static)) == sorted(tensors)
    np.testing.assert_array_equal(np.asarray(restored.params["Dense_0"]["kernel"]), doubled["params/Dense_0/kernel"])


class WithOddLeaves(train_state.TrainState):
    label: str = "kept"
    raw: bytes = b"kept"
    nothing: None = None
    counter: int = 3  # a Python number is a tensor, as `step` is


def test_only_array_like_leaves_travel_and_unsendable_arrays_are_still_refused():
    state = WithOddLeaves.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1))
    assert sorted(state_to_tensors(state)) == ["counter", "params/w", "step"]
    with pytest.raises(TensorError, match="state leaf 'phase' is .*complex64, which cannot cross the wire"):
        state_to_tensors({"params": {"w": jnp.ones(2)}, "phase": jnp.ones(2, jnp.complex64)})
    with pytest.raises(TensorError, match="state leaf 'names' is .*<U1, which cannot cross the wire"):
        state_to_tensors({"names": np.array(["a"])})


def test_the_seeds_train_state_trains_in_a_real_federation(tmp_path):
    stack = Stack(tmp_path)
    try:
        stack.start()
        exp = FLExperiment(federation=stack.federation(), experiment_name="seed_state")
        exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=seed_tasks(),
                  data_loader=SubsetDataset(limit=64), rounds_to_train=2, opt_treatment="CONTINUE_GLOBAL",
                  device_assignment_policy="CPU_ONLY")
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        assert exp.get_experiment_status().state == "finished", stack.logs()
        trained = {e.envoy for e in exp.history if e.stage == r.Stage.TRAIN and e.envoy}
        assert trained == {"env1", "env2"}
        last = exp.get_last_model()
        assert isinstance(last, CustomTrainState) and last.opt_vars == ["trace"]
        apply_model(last, np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int32))  # jits, as in the notebook
        start = state_to_tensors(create_train_state())
        assert not np.array_equal(np.asarray(last.params["Dense_0"]["kernel"]), start["params/Dense_0/kernel"])
        assert float(jnp.abs(last.opt_state[0].trace["Dense_0"]["kernel"]).sum()) > 0  # momentum came back
    finally:
        stack.stop()
