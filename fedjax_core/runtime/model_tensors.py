"""A flax train state <-> named numpy tensors (pytree path -> array), against a template.

Names are the state's pytree paths joined by '/', e.g. ``params/Conv_0/kernel``,
``opt_state/0/trace/Dense_0/bias``, ``step``. Restoring goes against a template state, so
the structure, static fields (``apply_fn``, ``tx``) and dtypes always come from the
template, and any mismatch names the offending path.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
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
    if isinstance(leaf, (jax.Array, np.ndarray)):  # its dtype, without copying its data to the host
        return np.dtype(leaf.dtype).name in ALLOWED_DTYPES
    try:
        return np.asarray(leaf).dtype.name in ALLOWED_DTYPES
    except (TypeError, ValueError):
        return False


def _held_as(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype JAX holds ``leaf`` in (a JAX array's own, without a copy to the host)."""
    if isinstance(leaf, jax.Array):
        return tuple(leaf.shape), np.dtype(leaf.dtype)
    held = np.asarray(jax.device_get(jnp.asarray(leaf)))
    return held.shape, held.dtype


def _is_array_like(leaf: Any) -> bool:
    """Whether ``leaf`` is meant as numbers (an array, or a Python number like ``step``): those travel, or are
    refused when their dtype cannot. Anything else (a string, bytes, None, an object) is structure."""
    return isinstance(leaf, (np.ndarray, np.generic, jax.Array, bool, int, float, complex))


def state_to_tensors(state: Any, only: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Every array leaf of ``state`` (those named in ``only``, when given) as a numpy array, with the dtype JAX
    itself holds it in.

    An array the platform cannot send (complex numbers, an array of strings) is an error that names
    its pytree path: it would otherwise be left out of every round without anyone knowing. Leaves that
    are not arrays (strings such as the seed tutorial's ``opt_vars``, bytes, None, other objects) stay
    with the template and never travel, as do static fields (``apply_fn``, ``tx``: ``pytree_node=False``).
    """
    leaves = {}
    for name, leaf in _flat(state).items():
        if _is_empty(leaf) or not _is_array_like(leaf) or (only is not None and name not in only):
            continue
        if not _is_tensor(leaf):
            what = f"{type(leaf).__name__} of dtype {leaf.dtype}" if hasattr(leaf, "dtype") else type(leaf).__name__
            raise TensorError(
                f"state leaf {name!r} is {what}, which cannot cross the wire "
                f"(allowed: {', '.join(sorted(ALLOWED_DTYPES))}): cast it, or make it a static field "
                "(flax.struct.field(pytree_node=False))")
        leaves[name] = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
    fetched = jax.device_get(list(leaves.values()))  # one call: the copies to the host overlap
    return {name: np.asarray(array) for name, array in zip(leaves, fetched)}


def tensors_to_state(template: S, tensors: Mapping[str, np.ndarray]) -> S:
    """``template`` with the leaves named in ``tensors`` replaced; others keep the template's values.

    Each new leaf is placed as the template's is (a leaf replicated over an envoy's mesh stays so). A
    read-only array may be taken without a copy (see ``_placed_like``): it must not change afterwards."""
    flat = _flat(template)
    for name, array in tensors.items():
        if name not in flat or not _is_tensor(flat[name]):
            raise TensorError(f"tensor {name!r} is not a leaf of the model state "
                              f"(leaves look like {next(iter(flat), '-')!r})")
        shape, dtype = _held_as(flat[name])
        if shape != array.shape or dtype != array.dtype:
            raise TensorError(f"tensor {name!r}: got {array.dtype}{list(array.shape)}, "
                              f"the model has {dtype}{list(shape)}")
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


class StaticList(list):
    """A list of names, not numbers, in a model state (the seed tutorial's ``opt_vars = ['trace']``): the
    same list to Python code, and no leaves to JAX, so the state can still be passed to jitted functions
    (JAX refuses a string leaf). Its items are the pytree's static data."""


jax.tree_util.register_pytree_node(StaticList, lambda items: ((), tuple(items)), lambda aux, _: StaticList(aux))


def _names_only(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, (str, bytes)) for v in value)


def static_structure(state: S) -> S:
    """``state`` with each field that holds a list of strings (a pytree field, so its strings are leaves)
    holding a :class:`StaticList` instead."""
    if not dataclasses.is_dataclass(state) or isinstance(state, type):
        return state
    changes = {f.name: StaticList(getattr(state, f.name)) for f in dataclasses.fields(state)
               if _names_only(getattr(state, f.name, None)) and not isinstance(getattr(state, f.name), StaticList)}
    return dataclasses.replace(state, **changes) if changes else state


def canonicalize(state: S) -> S:
    """Numeric leaves as strongly typed JAX arrays, so rounds restored from the wire hit the same jit cache;
    lists of names as static structure (:func:`static_structure`)."""
    state = static_structure(state)
    flat = _flat(state)
    for name, leaf in flat.items():
        if _is_tensor(leaf):
            flat[name] = _placed_like(leaf, np.asarray(jax.device_get(jnp.asarray(leaf))))
    return serialization.from_state_dict(state, traverse_util.unflatten_dict(flat, sep="/"))
