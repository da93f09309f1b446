"""The director's aggregation rules in numpy, optax-shaped.

A :class:`ServerStrategy` is a pair of pure functions:
``init(specs) -> state`` and ``aggregate(state, global_model, updates) -> (model, state)``,
where ``state`` is a dict of named tensors (momentum, moments) saved beside the round's
model, ``global_model`` maps names to the round's starting tensors and ``updates`` is the
round's :class:`RoundUpdates`. :func:`build` turns a :mod:`fedjax_core.strategies`
dataclass into one; the director never runs user code.

Which rule a leaf gets:
- ``params/...`` float leaves: the strategy's rule (a combiner: weighted mean, median,
  trimmed mean or Krum, then a server optimizer: none, momentum or FedOpt);
- other float leaves (optimizer state under CONTINUE_GLOBAL): the sample-weighted mean;
- integer and bool leaves (step and optimizer counters): the elementwise maximum, since a
  mean of counters is not a counter.

Cost: an update is checked as it arrives and stays spooled on disk; every rule reads the
round's spooled updates when the round closes, block by block with plain reads (nothing is
memory-mapped, so no page of an update counts in the director's resident memory), and yields
the new leaf block by block (:meth:`ServerStrategy.leaf`), which the director writes to the
next model file as it goes: the new model is never whole in the director's memory. Memory:
blocks (a few MiB, whatever the number of envoys), plus the server optimizer's new state
(FedAvgM: one model, FedAdam/FedYogi/FedAdagrad: two, in the leaf's dtype, at least float32);
nothing model-sized is ever float64. Time per round: O(envoys x model) reading (Krum:
O(envoys^2 x model)), about 0.05 s per 256 MiB update on a 2-core VM for FedAvg. The
weighted mean sums ``w·x`` per element in float64, in envoy-name order, then divides by the
total weight: a round gives the same bytes whatever order its uploads arrived in, and
identical uploads (frozen layers) or a single upload come back exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from fedjax_core import strategies as s
from fedjax_core.errors import InvalidRequestError
from fedjax_core.records import TensorSpec
from fedjax_core.tensors import ModelFile, is_float_dtype

log = logging.getLogger("fedjax.aggregation")

_BLOCK = 1 << 16  # elements per block: reads of 256 KiB (float32) and float64 temporaries of 512 KiB
_STACK = 1 << 20  # robust rules: (uploads x block) float64 stacks of at most 8 MiB, blocks of at most 4 x _BLOCK

Tensors = Mapping[str, np.ndarray]


class AggregationError(InvalidRequestError, ValueError):
    """Updates that cannot be aggregated (no updates, a non-positive weight, a missing tensor)."""


def is_float(dtype: str) -> bool:
    return is_float_dtype(dtype)


def is_param(spec: TensorSpec) -> bool:
    return spec.name.startswith("params/") and is_float(spec.dtype)


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(x).astype(dtype, copy=False)


# ------------------------------------------------------------------------------ reading
def _spec(tensors: Tensors, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a tensor, without reading (or mapping) a model file's data."""
    if isinstance(tensors, ModelFile):
        spec = tensors.spec(name)
        return tuple(spec.shape), np.dtype(spec.dtype)
    array = np.asarray(tensors[name])
    return array.shape, array.dtype


def _file_dtype(spec: TensorSpec) -> np.dtype:
    return np.dtype(spec.dtype).newbyteorder("<")  # as model files store it


def _read_block(tensors: Tensors, name: str, block: slice, buffer: np.ndarray) -> np.ndarray:
    """Elements ``block`` of the flattened tensor ``name``: a model file's are read into ``buffer`` (of the
    tensor's dtype; the file is opened for this read only, so any number of uploads hold no file open),
    an array's are a view."""
    if isinstance(tensors, ModelFile):
        return tensors.read_into(name, block.start, buffer[:block.stop - block.start])
    return np.asarray(tensors[name]).reshape(-1)[block]


def _blocks(tensors: Tensors, name: str, span: slice) -> Iterator[tuple[slice, np.ndarray]]:
    """``(block, values)`` over ``span`` of the flattened tensor ``name`` (values valid until the next)."""
    if isinstance(tensors, ModelFile):
        yield from tensors.blocks(name, _BLOCK, span.start, span.stop)
        return
    flat = np.asarray(tensors[name]).reshape(-1)
    for start in range(span.start, span.stop, _BLOCK):
        block = slice(start, min(start + _BLOCK, span.stop))
        yield block, flat[block]


# ----------------------------------------------------------------------------- updates
@dataclasses.dataclass(frozen=True)
class Upload:
    envoy: str
    weight: float  # the envoy's training-sample count
    tensors: Tensors  # in the director a ModelFile: the spooled update, read block by block


class RoundUpdates:
    """The accepted uploads of one round, checked as they arrive and read when the round closes.

    Integer and bool leaves are small: their running maximum is kept. Float leaves are left in the
    uploads (spooled files in the director) until a rule reads them, block by block."""

    def __init__(self, specs: Sequence[TensorSpec]):
        self.specs = {spec.name: spec for spec in specs}
        self.uploads: list[Upload] = []
        self.total_weight = 0.0
        self._maxima: dict[str, np.ndarray] = {}
        self.cache: dict[str, object] = {}  # per-round results a rule computes once (Krum's choice)

    def add(self, upload: Upload) -> None:
        if not upload.weight > 0:
            raise AggregationError(f"the update of {upload.envoy!r} has weight {upload.weight}; "
                                   "an update's weight (training-sample count) must be > 0")
        for name, spec in self.specs.items():  # check everything before keeping anything
            if name not in upload.tensors:
                raise AggregationError(f"the update of {upload.envoy!r} lacks tensor {name!r}")
            shape, dtype = _spec(upload.tensors, name)
            if shape != tuple(spec.shape):
                raise AggregationError(f"the update of {upload.envoy!r}: tensor {name!r} has shape "
                                       f"{shape}, expected {tuple(spec.shape)}")
            if isinstance(upload.tensors, ModelFile) and dtype != np.dtype(spec.dtype):
                raise AggregationError(f"the update of {upload.envoy!r}: tensor {name!r} is {dtype}, "
                                       f"expected {spec.dtype}")
        for name, spec in self.specs.items():
            if not is_float(spec.dtype):
                x = upload.tensors.read(name) if isinstance(upload.tensors, ModelFile) else upload.tensors[name]
                if name in self._maxima:
                    np.maximum(self._maxima[name], x, out=self._maxima[name])
                else:
                    self._maxima[name] = np.array(x, copy=True)
        self.uploads.append(upload)
        self.total_weight += upload.weight

    @property
    def count(self) -> int:
        return len(self.uploads)

    def maximum(self, name: str) -> np.ndarray:
        return self._maxima[name]

    def sorted_uploads(self) -> list[Upload]:
        """Uploads in envoy-name order: no rule depends on the order they arrived in."""
        return sorted(self.uploads, key=lambda u: u.envoy)

    def size(self, name: str) -> int:
        return math.prod(self.specs[name].shape)

    def weighted_mean(self, name: str, uploads: Sequence[Upload] | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """``(block, mean)`` over the flattened tensor ``name``: ``Σ w·x / Σ w`` in float64, summed in the
        order of ``uploads`` (default: :meth:`sorted_uploads`). ``mean`` is valid until the next block."""
        uploads = self.sorted_uploads() if uploads is None else list(uploads)
        total = sum(u.weight for u in uploads)
        size = self.size(name)
        buffer = np.empty(min(_BLOCK, size), _file_dtype(self.specs[name]))
        acc, term = np.empty(min(_BLOCK, size)), np.empty(min(_BLOCK, size))
        for start in range(0, size, _BLOCK):
            block = slice(start, min(start + _BLOCK, size))
            a, t = acc[:block.stop - start], term[:block.stop - start]
            for i, u in enumerate(uploads):
                np.multiply(_read_block(u.tensors, name, block, buffer), u.weight, out=t if i else a, dtype=np.float64)
                if i:
                    a += t
            a /= total
            yield block, a

    def blocks(self, name: str) -> Iterator[tuple[slice, np.ndarray]]:
        """``(block, stack)`` over the flattened tensor ``name``: stack is (uploads x block) float64, uploads in
        envoy-name order, and is valid until the next block. Blocks shrink as uploads grow (``_STACK``)."""
        uploads = self.sorted_uploads()
        size, step = self.size(name), max(1, min(4 * _BLOCK, _STACK // max(len(uploads), 1)))
        if size == 0:
            yield slice(0, 0), np.zeros((len(uploads), 0))
            return
        buffer = np.empty(min(step, size), _file_dtype(self.specs[name]))
        stack = np.empty((len(uploads), min(step, size)))
        for start in range(0, size, step):
            block = slice(start, min(start + step, size))
            out = stack[:, :block.stop - start]
            for row, u in zip(out, uploads):
                row[...] = _read_block(u.tensors, name, block, buffer)
            yield block, out


# --------------------------------------------------------------------------- combiners
Combiner = Callable[[RoundUpdates, str], Iterator[tuple[slice, np.ndarray]]]  # (updates, leaf) -> float64 blocks


def _blockwise(rule: Callable[[np.ndarray], np.ndarray]) -> Combiner:
    def combine(updates: RoundUpdates, name: str) -> Iterator[tuple[slice, np.ndarray]]:
        for block, stack in updates.blocks(name):
            yield block, rule(stack)
    return combine


def _weighted_mean(updates: RoundUpdates, name: str) -> Iterator[tuple[slice, np.ndarray]]:
    return updates.weighted_mean(name)


def _median(stack: np.ndarray) -> np.ndarray:
    return np.median(stack, axis=0)


def _trimmed_mean(beta: float) -> Callable[[np.ndarray], np.ndarray]:
    def rule(stack: np.ndarray) -> np.ndarray:  # scipy.stats.trim_mean(stack, beta, axis=0)
        n = stack.shape[0]
        cut = int(beta * n)
        return np.sort(stack, axis=0)[cut:n - cut].mean(axis=0)
    return rule


def krum_choice(updates: RoundUpdates, f: int, keep: int) -> list[int]:
    """Indices (into ``sorted_uploads()``) of the ``keep`` uploads with the lowest Krum scores.

    Distances are over every ``params/`` float leaf together, accumulated block by block.
    """
    n = updates.count
    dist = np.zeros((n, n), np.float64)
    for name, spec in updates.specs.items():
        if is_param(spec):
            for _, stack in updates.blocks(name):
                for i in range(n):
                    dist[i] += np.square(stack - stack[i]).sum(axis=1)
    neighbours = max(n - f - 2, 1)
    scores = [np.sort(np.delete(dist[i], i))[:neighbours].sum() for i in range(n)]
    chosen = sorted(np.argsort(scores, kind="stable")[:keep].tolist())
    log.info("krum kept %s (scores %s)", [updates.sorted_uploads()[i].envoy for i in chosen],
             [round(float(x), 6) for x in scores])
    return chosen


def _krum(f: int, keep: int) -> Combiner:
    def combine(updates: RoundUpdates, name: str) -> Iterator[tuple[slice, np.ndarray]]:
        if "krum" not in updates.cache:
            updates.cache["krum"] = krum_choice(updates, f, keep)
        ordered = updates.sorted_uploads()
        return updates.weighted_mean(name, [ordered[i] for i in updates.cache["krum"]])
    return combine


# -------------------------------------------------------------------- server optimizers
class ServerOptimizer(NamedTuple):
    """Per leaf: state ``slots`` (tensors named ``slot/leaf``, zeros at first, in the leaf's dtype, at
    least float32) and an elementwise ``step(x, target, state) -> (x_new, new_state)`` on float64
    blocks: ``x`` the round's global leaf, ``target`` the combiner's result, ``state`` slot -> block."""

    slots: tuple[str, ...]
    step: Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray]], tuple[np.ndarray, dict[str, np.ndarray]]]

    def init(self, spec: TensorSpec) -> dict[str, np.ndarray]:
        return {f"{slot}/{spec.name}": np.zeros(spec.shape, _state_dtype(spec)) for slot in self.slots}


def _state_dtype(spec: TensorSpec) -> np.dtype:
    return np.promote_types(spec.dtype, np.float32)


def _momentum(lr: float, beta: float) -> ServerOptimizer:
    """FedAvgM: v_t = β·v_{t−1} + (x_t − mean_t), x_{t+1} = x_t − η·v_t."""
    def step(x, target, state):
        v = beta * state["momentum"] + (x - target)
        return x - lr * v, {"momentum": v}
    return ServerOptimizer(slots=("momentum",), step=step)


def _fedopt(eta: float, beta_1: float, tau: float,
            second_moment: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> ServerOptimizer:
    """Reddi et al. 2021, Algorithm 2 (no bias correction): x_{t+1} = x_t + η·m_t / (√v_t + τ)."""
    def step(x, target, state):
        delta = target - x
        m = beta_1 * state["m"] + (1 - beta_1) * delta
        v = second_moment(state["v"], np.square(delta))
        return x + eta * m / (np.sqrt(v) + tau), {"m": m, "v": v}
    return ServerOptimizer(slots=("m", "v"), step=step)


def _adam_v(beta_2: float):
    return lambda v, d2: beta_2 * v + (1 - beta_2) * d2


def _yogi_v(beta_2: float):
    return lambda v, d2: v - (1 - beta_2) * d2 * np.sign(v - d2)


def _adagrad_v(v: np.ndarray, d2: np.ndarray) -> np.ndarray:
    return v + d2


def _stepped(optimizer: ServerOptimizer, spec: TensorSpec, combined: Iterator[tuple[slice, np.ndarray]],
             global_model: Tensors, state: Tensors, new_state: dict[str, np.ndarray]) -> Iterator[tuple[slice, np.ndarray]]:
    """One leaf's server step, block by block in float64: ``(block, x_new)``; the leaf's new state slots are
    allocated in ``new_state`` and filled as the blocks go by."""
    name = spec.name
    keys = {slot: f"{slot}/{name}" for slot in optimizer.slots}
    slots = {slot: new_state.setdefault(key, np.empty(spec.shape, _state_dtype(spec))).reshape(-1)
             for slot, key in keys.items()}
    for span, target in combined:
        readers = [_blocks(global_model, name, span)] + [_blocks(state, key, span) for key in keys.values()]
        for (block, x), *slot_blocks in zip(*readers):
            local = slice(block.start - span.start, block.stop - span.start)
            x_new, stepped = optimizer.step(x.astype(np.float64), target[local],
                                            {slot: b.astype(np.float64) for slot, (_, b) in zip(keys, slot_blocks)})
            for slot, values in stepped.items():
                slots[slot][block] = values
            yield block, x_new


def _in_dtype(dtype: np.dtype, blocks: Iterator[tuple[slice, np.ndarray]]) -> Iterator[tuple[slice, np.ndarray]]:
    """Blocks cast into ``dtype`` in one reused buffer (each valid until the next)."""
    buffer = np.empty(0, dtype)
    for block, values in blocks:
        if buffer.size < values.size:
            buffer = np.empty(values.size, dtype)
        out = buffer[:values.size]
        out[...] = values
        yield block, out


# ----------------------------------------------------------------------------- strategy
class ServerStrategy(NamedTuple):
    """``init(specs) -> state``; ``leaf(name, state, global_model, updates, new_state) -> blocks``: the new
    value of one leaf, ``(slice, values)`` over the flattened leaf in its dtype (each valid until the next),
    so that it can be written without ever being whole in memory; the leaf's server-optimizer state lands
    in ``new_state`` as the blocks are consumed. :meth:`aggregate` collects every leaf into arrays."""

    init: Callable[[Sequence[TensorSpec]], dict[str, np.ndarray]]
    leaf: Callable[[str, Tensors, Tensors, RoundUpdates, dict[str, np.ndarray]], Iterator[tuple[slice, np.ndarray]]]

    def aggregate(self, state: Tensors, global_model: Tensors,
                  updates: RoundUpdates) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(model, new_state)``: every leaf of ``updates.specs`` as an array."""
        model: dict[str, np.ndarray] = {}
        new_state: dict[str, np.ndarray] = {}
        for name, spec in updates.specs.items():
            out = np.empty(spec.shape, spec.dtype)
            flat = out.reshape(-1)
            for block, values in self.leaf(name, state, global_model, updates, new_state):
                flat[block] = values
            model[name] = out
        return model, new_state


def _parts(strategy: s.Strategy) -> tuple[Combiner, ServerOptimizer | None]:
    match strategy:
        case s.FedAvgM(server_learning_rate=lr, server_momentum=beta):
            return _weighted_mean, _momentum(lr, beta)
        case s.FedAdam(eta=eta, beta_1=b1, beta_2=b2, tau=tau):
            return _weighted_mean, _fedopt(eta, b1, tau, _adam_v(b2))
        case s.FedYogi(eta=eta, beta_1=b1, beta_2=b2, tau=tau):
            return _weighted_mean, _fedopt(eta, b1, tau, _yogi_v(b2))
        case s.FedAdagrad(eta=eta, tau=tau):
            return _weighted_mean, _fedopt(eta, 0.0, tau, _adagrad_v)
        case s.FedMedian():
            return _blockwise(_median), None
        case s.FedTrimmedAvg(beta=beta):
            return _blockwise(_trimmed_mean(beta)), None
        case s.Krum(num_malicious_clients=f, num_clients_to_keep=keep):
            return _krum(f, keep), None
        case s.FedAvg():
            return _weighted_mean, None
    raise AggregationError(f"no rule for strategy {strategy!r}")


def build(strategy: s.Strategy) -> ServerStrategy:
    """The numpy rule of a strategy dataclass."""
    combine, optimizer = _parts(strategy)

    def init(specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
        if optimizer is None:
            return {}
        return {k: v for spec in specs if is_param(spec) for k, v in optimizer.init(spec).items()}

    def leaf(name: str, state: Tensors, global_model: Tensors, updates: RoundUpdates,
             new_state: dict[str, np.ndarray]) -> Iterator[tuple[slice, np.ndarray]]:
        if updates.count == 0:
            raise AggregationError("no update to aggregate")
        spec = updates.specs[name]
        dtype = np.dtype(spec.dtype)
        if not is_float(spec.dtype):
            return iter([(slice(0, updates.size(name)), _cast(updates.maximum(name), spec.dtype).reshape(-1))])
        if not is_param(spec):
            return _in_dtype(dtype, updates.weighted_mean(name))
        if optimizer is None:
            return _in_dtype(dtype, combine(updates, name))
        return _in_dtype(dtype, _stepped(optimizer, spec, combine(updates, name), global_model, state, new_state))

    return ServerStrategy(init=init, leaf=leaf)
