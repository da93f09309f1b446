"""Model states <-> named tensors: every float width travels, and a leaf that cannot is named at start(). In the
seed tutorial's own ``CustomTrainState`` (``opt_vars`` a pytree list of strings), leaves that are not arrays stay
with the template and never travel, while arrays of a dtype the wire cannot carry are still refused."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import struct
from flax.training import train_state

from fedjax_core.runtime.model_tensors import StaticList, canonicalize, state_to_tensors, tensors_to_state
from fedjax_core.tensors import TensorError, assemble, iter_chunks, spec_of
from fedjax_core.model_file import ModelFile, write_model_file
from seed_tutorial import apply_model, create_train_state


def bf16_state():
    params = {"dense": {"kernel": jnp.linspace(-1, 1, 12, dtype=jnp.bfloat16).reshape(3, 4),
                        "bias": jnp.zeros(4, jnp.float16)}, "scale": jnp.ones((), jnp.float32)}
    return train_state.TrainState.create(apply_fn=lambda *a: None, params=params, tx=optax.sgd(0.1, 0.9))


def test_bfloat16_and_float16_leaves_travel_with_their_dtype(tmp_path):
    tensors = state_to_tensors(bf16_state())
    assert tensors["params/dense/kernel"].dtype == ml_dtypes.bfloat16
    assert tensors["params/dense/bias"].dtype == np.float16
    assert tensors["opt_state/0/trace/dense/kernel"].dtype == ml_dtypes.bfloat16  # momentum follows the params
    assert spec_of("k", tensors["params/dense/kernel"]).dtype == "bfloat16"
    back = assemble(iter_chunks(tensors, chunk_bytes=8))
    write_model_file(tmp_path / "m.fjm", back)
    from_file = ModelFile(tmp_path / "m.fjm").arrays()
    for name, array in tensors.items():
        assert from_file[name].dtype == array.dtype and from_file[name].tobytes() == array.tobytes(), name
    restored = tensors_to_state(bf16_state(), {n: a * 2 for n, a in from_file.items() if n.startswith("params/")})
    assert restored.params["dense"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored.params["dense"]["kernel"], np.float32),
                                  np.asarray(tensors["params/dense/kernel"], np.float32) * 2)


class WithExtras(train_state.TrainState):
    note: str = struct.field(pytree_node=False, default="static fields stay behind")
    phase: jax.Array | None = None


@pytest.mark.parametrize("leaf, what", [(jnp.ones(2, jnp.complex64), "complex64"), (np.array(["a"]), "<U1")])
def test_a_leaf_that_cannot_travel_is_named_not_skipped(leaf, what):
    state = WithExtras.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1), phase=leaf)
    with pytest.raises(TensorError, match=f"state leaf 'phase' is .* {what}, which cannot cross the wire"):
        state_to_tensors(state)


def test_static_fields_and_empty_optimizer_states_are_not_leaves():
    state = WithExtras.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1))  # phase=None
    assert sorted(state_to_tensors(state)) == ["params/w", "step"]


def test_read_only_received_arrays_are_restored_without_a_copy_and_writable_ones_are_copied():
    state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.zeros((64, 64))}, tx=optax.sgd(0.1))
    received = assemble(iter_chunks({"params/w": np.arange(4096, dtype=np.float32).reshape(64, 64)}))
    writable = np.array(received["params/w"])  # numpy's own buffer, not necessarily 64-byte aligned
    received["params/w"].flags.writeable = False  # as the envoy client hands them over
    restored = tensors_to_state(state, received).params["w"]
    if jax.default_backend() == "cpu":
        assert restored.unsafe_buffer_pointer() == received["params/w"].ctypes.data  # the same buffer
    copied = tensors_to_state(state, {"params/w": writable}).params["w"]
    writable[0, 0] = -1  # a writable array may change afterwards: JAX must have its own copy
    for leaf in (restored, copied):
        assert leaf.dtype == jnp.float32 and not leaf.weak_type
        np.testing.assert_array_equal(np.asarray(leaf), np.arange(4096, dtype=np.float32).reshape(64, 64))
    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x + 1, p), donate_argnums=0)
    step({"w": restored})  # donating an aliased buffer leaves the received array as it was
    np.testing.assert_array_equal(received["params/w"], np.arange(4096, dtype=np.float32).reshape(64, 64))


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
