"""Aggregation strategies as small (init, update, finalize) function triples, optax style.

The director folds each envoy's update into a running state as it arrives, so its memory
is O(model) whatever the number of envoys. Strategies are built in and chosen by name:
the director never runs user code.

FedAvg rule:
- floating-point leaves: the sample-weighted mean ``sum_k n_k x_k / sum_k n_k``,
  accumulated in float64 and cast back to the leaf's dtype;
- integer and bool leaves (step counters, optimizer counts): not averaged, since a mean
  of counters is not a counter; they take the elementwise maximum over the updates,
  i.e. the furthest-advanced counter.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from fedjax_core.records import TensorSpec


class AggregationState(NamedTuple):
    sums: dict[str, np.ndarray]
    maxima: dict[str, np.ndarray]
    total_weight: float
    count: int


class Aggregator(NamedTuple):
    """``init(specs)``, ``update(state, tensors, weight)``, ``finalize(state)``.

    ``update`` folds in place (arrays in ``state`` are reused) to keep memory at one model.
    """

    init: Callable[[Sequence[TensorSpec]], AggregationState]
    update: Callable[[AggregationState, Mapping[str, np.ndarray], float], AggregationState]
    finalize: Callable[[AggregationState], dict[str, np.ndarray]]


class AggregationError(ValueError):
    pass


def _is_float(dtype: str) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


_BLOCK = 1 << 20  # elements folded at a time: bounds the float64 temporary to 8 MiB


def _add_scaled(total: np.ndarray, x: np.ndarray, weight: float) -> None:
    """``total += weight * x`` in float64, block by block, so no tensor-sized temporary is made."""
    flat_total, flat_x = total.reshape(-1), np.asarray(x).reshape(-1)
    for start in range(0, flat_total.size, _BLOCK):
        block = slice(start, start + _BLOCK)
        flat_total[block] += np.multiply(flat_x[block], weight, dtype=np.float64)


def fedavg() -> Aggregator:
    """Federated averaging weighted by each envoy's training-sample count."""
    dtypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def init(specs: Sequence[TensorSpec]) -> AggregationState:
        dtypes.clear()
        dtypes.update({s.name: s.dtype for s in specs})
        shapes.clear()
        shapes.update({s.name: tuple(s.shape) for s in specs})
        sums = {s.name: np.zeros(s.shape, np.float64) for s in specs if _is_float(s.dtype)}
        return AggregationState(sums=sums, maxima={}, total_weight=0.0, count=0)

    def update(state: AggregationState, tensors: Mapping[str, np.ndarray], weight: float) -> AggregationState:
        if not weight > 0:
            raise AggregationError(f"an update's weight (training-sample count) must be > 0, got {weight}")
        for name in dtypes:
            try:
                x = tensors[name]
            except KeyError:
                raise AggregationError(f"update lacks tensor {name!r}") from None
            if tuple(x.shape) != shapes[name]:
                raise AggregationError(f"tensor {name!r} has shape {tuple(x.shape)}, expected {shapes[name]}")
            if name in state.sums:
                _add_scaled(state.sums[name], x, float(weight))
            elif name in state.maxima:
                np.maximum(state.maxima[name], x, out=state.maxima[name])
            else:
                state.maxima[name] = np.array(x, copy=True)
        return state._replace(total_weight=state.total_weight + float(weight), count=state.count + 1)

    def finalize(state: AggregationState) -> dict[str, np.ndarray]:
        if state.count == 0:
            raise AggregationError("no update to aggregate")
        out: dict[str, np.ndarray] = {}
        for name, dtype in dtypes.items():
            if name in state.sums:
                out[name] = np.empty(state.sums[name].shape, dtype)
                np.divide(state.sums[name], state.total_weight, out=out[name], casting="unsafe")
            else:
                out[name] = state.maxima[name].astype(dtype)
        return out

    return Aggregator(init=init, update=update, finalize=finalize)


STRATEGIES: dict[str, Callable[[], Aggregator]] = {"fedavg": fedavg}


def get_aggregator(name: str) -> Aggregator:
    """The built-in strategy called ``name``."""
    try:
        return STRATEGIES[name.lower()]()
    except KeyError:
        raise AggregationError(
            f"unknown aggregation {name!r}; built-in strategies: {', '.join(sorted(STRATEGIES))}"
        ) from None
