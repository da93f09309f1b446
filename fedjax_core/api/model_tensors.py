"""A flax train state <-> named numpy tensors (pytree path -> array), against a template.

Names are the state's pytree paths joined by '/', e.g. ``params/Conv_0/kernel``,
``opt_state/0/trace/Dense_0/bias``, ``step``. Restoring goes against a template state, so
the structure, static fields (``apply_fn``, ``tx``) and dtypes always come from the
template, and any mismatch names the offending path.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from fedjax_core.tensors import ALLOWED_DTYPES, TensorError

S = TypeVar("S")


def _flat(state: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(serialization.to_state_dict(state), keep_empty_nodes=True, sep="/")


def _is_empty(leaf: Any) -> bool:
    return leaf is traverse_util.empty_node or leaf is None


def _is_tensor(leaf: Any) -> bool:
    if _is_empty(leaf):
        return False
    try:
        return np.asarray(leaf).dtype.name in ALLOWED_DTYPES
    except (TypeError, ValueError):
        return False


def state_to_tensors(state: Any) -> dict[str, np.ndarray]:
    """Every leaf of ``state`` as a numpy array, with the dtype JAX itself holds it in.

    A leaf the platform cannot send (complex numbers, strings, objects) is an error that names
    its pytree path: it would otherwise be left out of every round without anyone knowing.
    Static fields (``apply_fn``, ``tx``: ``pytree_node=False``) are not leaves and stay behind.
    """
    out = {}
    for name, leaf in _flat(state).items():
        if _is_empty(leaf):
            continue
        if not _is_tensor(leaf):
            what = f"{type(leaf).__name__} of dtype {leaf.dtype}" if hasattr(leaf, "dtype") else type(leaf).__name__
            raise TensorError(
                f"state leaf {name!r} is {what}, which cannot cross the wire "
                f"(allowed: {', '.join(sorted(ALLOWED_DTYPES))}): cast it, or make it a static field "
                "(flax.struct.field(pytree_node=False))")
        out[name] = np.asarray(jax.device_get(jnp.asarray(leaf)))
    return out


def tensors_to_state(template: S, tensors: Mapping[str, np.ndarray]) -> S:
    """``template`` with the leaves named in ``tensors`` replaced; others keep the template's values.

    Each new leaf is placed as the template's is (a leaf replicated over an envoy's mesh stays so). A
    read-only array may be taken without a copy (see ``_placed_like``): it must not change afterwards."""
    flat = _flat(template)
    for name, array in tensors.items():
        if name not in flat or not _is_tensor(flat[name]):
            raise TensorError(f"tensor {name!r} is not a leaf of the model state "
                              f"(leaves look like {next(iter(flat), '-')!r})")
        want = np.asarray(jax.device_get(jnp.asarray(flat[name])))
        if want.shape != array.shape or want.dtype != array.dtype:
            raise TensorError(f"tensor {name!r}: got {array.dtype}{list(array.shape)}, "
                              f"the model has {want.dtype}{list(want.shape)}")
        flat[name] = _placed_like(flat[name], array, alias=True)
    return serialization.from_state_dict(template, traverse_util.unflatten_dict(flat, sep="/"))


def _placed_like(leaf: Any, value: np.ndarray, alias: bool = False) -> jax.Array:
    """``value`` as a JAX array sharded as ``leaf`` is when that spans several devices (an envoy's mesh),
    else on the default device as before.

    ``alias``: a read-only ``value`` may become the JAX array's buffer itself: on CPU, when it is 64-byte
    aligned (:func:`fedjax_core.tensors.assemble` fills such buffers), there is no copy."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and len(sharding.device_set) > 1:
        return jax.device_put(value, sharding)
    if alias and isinstance(value, np.ndarray) and not value.flags.writeable:  # nobody can change it under JAX
        return jax.device_put(value)
    return jnp.asarray(value)


def canonicalize(state: S) -> S:
    """Numeric leaves as strongly typed JAX arrays, so rounds restored from the wire hit the same jit cache."""
    flat = _flat(state)
    for name, leaf in flat.items():
        if _is_tensor(leaf):
            flat[name] = _placed_like(leaf, np.asarray(jax.device_get(jnp.asarray(leaf))))
    return serialization.from_state_dict(state, traverse_util.unflatten_dict(flat, sep="/"))
