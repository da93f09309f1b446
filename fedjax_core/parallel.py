"""Data parallelism over an envoy's devices, without rewriting the user's jit step.

A task registered with ``mesh="mesh"`` receives a :class:`jax.sharding.Mesh` over the
envoy's devices (``cuda_devices`` or ``cpu_devices`` in its config) with one axis, ``data``.
``replicate(state, mesh)`` puts a copy of the state on every device; ``shard_batch(batch,
mesh)`` splits a batch's leading axis across them. A jit step called on those inputs runs
data-parallel: XLA partitions it by its inputs' shardings and averages the gradients across
devices, so the result equals one device's within float tolerance.

    @TI.register_fl_task(model="state", data_loader="data", device="device", optimizer="opt", mesh="mesh")
    def train(state, data, device, opt, mesh):
        state = replicate(state, mesh)
        for batch in data:
            state, metrics = train_step(state, shard_batch(batch, mesh))
        return state, metrics
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

T = TypeVar("T")
DATA_AXIS = "data"


def envoy_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis (``data``) mesh over ``devices`` (default: every device this process sees)."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicate(tree: T, mesh: Mesh) -> T:
    """Every array leaf of ``tree`` (a TrainState, params...) copied to each device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: T, mesh: Mesh) -> T:
    """Every array leaf of ``batch`` split along its first axis across the devices of ``mesh``.

    The first axis must divide evenly: a batch of 100 on 8 devices is an error that says so
    (pad the batch, or drop the remainder, as a seed-style loader does with full batches).
    """
    n = mesh.devices.size

    def check(leaf: Any) -> Any:
        size = np.shape(leaf)[0] if np.ndim(leaf) else None
        if size is None or size % n:
            raise ValueError(f"shard_batch: a batch leaf of shape {list(np.shape(leaf))} cannot be split across "
                             f"{n} devices (its first axis must be a multiple of {n}): use a batch size that is")
        return leaf

    jax.tree_util.tree_map(check, batch)
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))
