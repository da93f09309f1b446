"""The director's aggregation engine: a round's uploads, the leaf policy, and streaming a strategy's rule.

A strategy (:mod:`fedjax_core.strategies`) gives the engine a :class:`Rule` for its
``params/...`` float leaves: a *combiner*, called once per round, that reduces the uploads
of a leaf to float64 blocks (the weighted mean, a median, Krum's choice...), and optionally
an elementwise *step* ``(x, target, state) -> (x_new, new_state)`` with the state *slots*
it keeps per leaf between rounds (momentum, moments; zeros at first). Rules are pure
functions over :class:`TensorSource` objects, which a model file (:class:`ModelFile`) and
in-memory arrays (:class:`ArraySource`) both are, so no rule knows where tensors live.

The engine applies the leaf policy, whatever the strategy:
- ``params/...`` float leaves: the strategy's rule;
- other float leaves (optimizer state under CONTINUE_GLOBAL): the sample-weighted mean;
- integer and bool leaves (step and optimizer counters): the elementwise maximum, since a
  mean of counters is not a counter.

:func:`stepper` prepares a round (``strategy.rule()``, then its combiner once) and returns
``leaf(name)``: the new leaf as ``(block, values, state)`` triples over the flattened leaf,
values in the leaf's dtype and state its new slot blocks. The director's closer
(:mod:`fedjax_core.director.closer`) writes the values to the next model file as they come;
:func:`aggregate` collects them into arrays (the in-process simulation's path).

Cost: an update is checked as it arrives and stays spooled on disk; every rule reads the
round's spooled updates when the round closes, block by block with plain reads (nothing is
memory-mapped, so no page of an update counts in the director's resident memory), and the
new leaf comes block by block, so the new model is never whole in the director's memory.
Memory: blocks (a few MiB, whatever the number of envoys), plus the new state of a rule with
slots (FedAvgM: one model, FedAdam/FedYogi/FedAdagrad: two, in the leaf's dtype, at least
float32); nothing model-sized is ever float64. Time per round: O(envoys x model) reading
(Krum: O(envoys^2 x model)), about 0.05 s per 256 MiB update on a 2-core VM for FedAvg. The
weighted mean sums ``w·x`` per element in float64, in envoy-name order, then divides by the
total weight: a round gives the same bytes whatever order its uploads arrived in, and
identical uploads (frozen layers) or a single upload come back exactly.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedjax_core.errors import InvalidRequestError
from fedjax_core.records import TensorSpec
from fedjax_core.tensors import is_float_dtype
from fedjax_core.model_file import BLOCK_ELEMENTS

if TYPE_CHECKING:
    from fedjax_core.strategies import Strategy

_BLOCK = 1 << 16  # elements per block: reads of 256 KiB (float32) and float64 temporaries of 512 KiB
_STACK = 1 << 20  # (uploads x block) float64 stacks of at most 8 MiB, blocks of at most 4 x _BLOCK

Blocks = Iterator[tuple[slice, np.ndarray]]  # (slice of the flattened tensor, values), each valid until the next
Combine = Callable[[str], Blocks]  # leaf name -> float64 blocks of the round's combined uploads
Step = Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray]], tuple[np.ndarray, dict[str, np.ndarray]]]
LeafBlock = tuple[slice, np.ndarray, dict[str, np.ndarray]]  # (block, new values, new state blocks by key)


class AggregationError(InvalidRequestError, ValueError):
    """Updates that cannot be aggregated (no updates, a non-positive weight, a missing tensor)."""


def is_float(dtype: str) -> bool:
    return is_float_dtype(dtype)


def is_param_leaf(name: str, dtype) -> bool:
    """Whether a tensor is one of the ``params/`` float leaves that rules, clipping and secure sums work on."""
    return name.startswith("params/") and is_float_dtype(dtype)


def is_param(spec: TensorSpec) -> bool:
    return is_param_leaf(spec.name, spec.dtype)


def state_dtype(spec: TensorSpec) -> np.dtype:
    """The dtype a leaf's state slots are stored in: the leaf's, at least float32."""
    return np.promote_types(spec.dtype, np.float32)


def _file_dtype(spec: TensorSpec) -> np.dtype:
    return np.dtype(spec.dtype).newbyteorder("<")  # as model files store it


# ------------------------------------------------------------------------------ sources
class TensorSource(Protocol):
    """Named tensors read block by block: :class:`fedjax_core.model_file.ModelFile` and :class:`ArraySource`."""

    def __contains__(self, name: object) -> bool: ...

    def spec(self, name: str) -> TensorSpec: ...

    def blocks(self, name: str, block_elements: int = BLOCK_ELEMENTS, start: int = 0,
               stop: int | None = None) -> Blocks:
        """``(slice, values)`` over elements ``[start, stop)`` of the flattened tensor."""

    def read_into(self, name: str, start: int, out: np.ndarray) -> np.ndarray:
        """Elements ``[start, start + out.size)`` of the flattened tensor copied into ``out``, returned."""


class ArraySource:
    """A :class:`TensorSource` over in-memory arrays (the simulation's models, tests). The arrays are
    read, never written."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self._flat = {}
        self._specs = {}
        for name, array in arrays.items():
            array = np.asarray(array)
            flat = np.ascontiguousarray(array).reshape(-1).view()
            flat.flags.writeable = False
            self._flat[name] = flat
            self._specs[name] = TensorSpec(name, array.dtype.name, tuple(array.shape))

    def __contains__(self, name: object) -> bool:
        return name in self._flat

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    @property
    def specs(self) -> list[TensorSpec]:
        """Every tensor's spec, in the order the arrays were given (as :attr:`ModelFile.specs` is file order)."""
        return list(self._specs.values())

    def blocks(self, name: str, block_elements: int = BLOCK_ELEMENTS, start: int = 0,
               stop: int | None = None) -> Blocks:
        flat = self._flat[name]
        stop = flat.size if stop is None else stop
        for first in range(start, stop, block_elements):
            block = slice(first, min(first + block_elements, stop))
            yield block, flat[block]

    def read_into(self, name: str, start: int, out: np.ndarray) -> np.ndarray:
        out[...] = self._flat[name][start:start + out.size]
        return out


def _read_whole(source: TensorSource, spec: TensorSpec) -> np.ndarray:
    out = np.empty(math.prod(spec.shape), _file_dtype(spec))
    return source.read_into(spec.name, 0, out).reshape(spec.shape)


# ----------------------------------------------------------------------------- updates
@dataclasses.dataclass(frozen=True)
class Upload:
    envoy: str
    weight: float  # the envoy's training-sample count
    tensors: TensorSource  # in the director a ModelFile: the spooled update, read block by block


class RoundUpdates:
    """The accepted uploads of one round, checked as they arrive and read when the round closes.

    Integer and bool leaves are small: their running maximum is kept. Float leaves are left in the
    uploads (spooled files in the director) until a rule reads them, block by block."""

    def __init__(self, specs: Sequence[TensorSpec], check: Callable[[Upload, Sequence[TensorSpec]], None] | None = None):
        self.specs = {spec.name: spec for spec in specs}
        self.check = check  # more checks of an upload before it is kept (CentralDP's clip_on="envoy" norm)
        self.uploads: list[Upload] = []
        self.total_weight = 0.0
        self._maxima: dict[str, np.ndarray] = {}

    def add(self, upload: Upload) -> None:
        if not upload.weight > 0:
            raise AggregationError(f"the update of {upload.envoy!r} has weight {upload.weight}; "
                                   "an update's weight (training-sample count) must be > 0")
        for name, spec in self.specs.items():  # check everything before keeping anything
            if name not in upload.tensors:
                raise AggregationError(f"the update of {upload.envoy!r} lacks tensor {name!r}")
            got = upload.tensors.spec(name)
            if tuple(got.shape) != tuple(spec.shape):
                raise AggregationError(f"the update of {upload.envoy!r}: tensor {name!r} has shape "
                                       f"{tuple(got.shape)}, expected {tuple(spec.shape)}")
            if np.dtype(got.dtype) != np.dtype(spec.dtype):
                raise AggregationError(f"the update of {upload.envoy!r}: tensor {name!r} is {got.dtype}, "
                                       f"expected {spec.dtype}")
        if self.check is not None:
            self.check(upload, list(self.specs.values()))
        for name, spec in self.specs.items():
            if not is_float(spec.dtype):
                x = _read_whole(upload.tensors, spec)
                if name in self._maxima:
                    np.maximum(self._maxima[name], x, out=self._maxima[name])
                else:
                    self._maxima[name] = x
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

    def weighted_mean(self, name: str, uploads: Sequence[Upload] | None = None) -> Blocks:
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
                values = u.tensors.read_into(name, start, buffer[:block.stop - start])
                np.multiply(values, u.weight, out=t if i else a, dtype=np.float64)
                if i:
                    a += t
            a /= total
            yield block, a

    def stacks(self, name: str) -> Blocks:
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
                row[...] = u.tensors.read_into(name, start, buffer[:block.stop - start])
            yield block, out


# ---------------------------------------------------------------------------------- rules
def weighted_mean(updates: RoundUpdates) -> Combine:
    """FedAvg's combiner: per leaf, the sample-weighted mean of every upload."""
    return updates.weighted_mean


def coordinatewise(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[RoundUpdates], Combine]:
    """A combiner from a per-coordinate rule ``fn(stack, weights) -> values``: ``stack`` is (uploads x block)
    float64 in envoy-name order, ``weights`` their sample counts (float64), ``values`` one per column."""
    def combiner(updates: RoundUpdates) -> Combine:
        weights = np.array([u.weight for u in updates.sorted_uploads()], np.float64)

        def combine(name: str) -> Blocks:
            for block, stack in updates.stacks(name):
                yield block, fn(stack, weights)
        return combine
    return combiner


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a strategy tells the engine about its ``params/...`` float leaves (the engine does the rest).

    ``combiner(updates) -> combine``: called once per round (Krum chooses its uploads there);
    ``combine(leaf)`` yields float64 ``(block, target)`` over the flattened leaf.
    ``slots``: the state the rule keeps per leaf between rounds, stored as ``slot/leaf`` tensors (zeros at
    first, in the leaf's dtype, at least float32).
    ``step(x, target, state) -> (x_new, new_state)``: elementwise on float64 blocks, ``x`` the round's global
    leaf, ``state`` and ``new_state`` slot -> block; without a step the next leaf is ``target``.
    """

    combiner: Callable[[RoundUpdates], Combine] = weighted_mean
    slots: tuple[str, ...] = ()
    step: Step | None = None

    def __post_init__(self) -> None:
        if self.slots and self.step is None:
            raise ValueError(f"a rule with state slots {self.slots} needs a step that computes them")


def init_state(strategy: Strategy, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """A strategy's state before its first round: every slot of every ``params/`` float leaf, zeros."""
    slots = strategy.rule().slots
    return {f"{slot}/{spec.name}": np.zeros(spec.shape, state_dtype(spec))
            for spec in specs if is_param(spec) for slot in slots}


def _in_dtype(dtype: np.dtype, blocks: Blocks) -> Iterator[LeafBlock]:
    """Blocks cast into ``dtype`` in one reused buffer (each valid until the next), with no state."""
    buffer = np.empty(0, dtype)
    for block, values in blocks:
        if buffer.size < values.size:
            buffer = np.empty(values.size, dtype)
        out = buffer[:values.size]
        out[...] = values
        yield block, out, {}


def _stepped(rule: Rule, spec: TensorSpec, targets: Blocks, global_model: TensorSource,
             state: TensorSource) -> Iterator[LeafBlock]:
    """One leaf's server step, block by block in float64: ``(block, x_new, {slot/leaf: new block})``."""
    name, buffer = spec.name, np.empty(0, spec.dtype)
    keys = {slot: f"{slot}/{name}" for slot in rule.slots}
    for span, target in targets:
        readers = [global_model.blocks(name, _BLOCK, span.start, span.stop)]
        readers += [state.blocks(key, _BLOCK, span.start, span.stop) for key in keys.values()]
        for (block, x), *slot_blocks in zip(*readers):
            local = slice(block.start - span.start, block.stop - span.start)
            x_new, stepped = rule.step(x.astype(np.float64), target[local],
                                       {slot: b.astype(np.float64) for slot, (_, b) in zip(keys, slot_blocks)})
            if buffer.size < x_new.size:
                buffer = np.empty(x_new.size, spec.dtype)
            out = buffer[:x_new.size]
            out[...] = x_new
            yield block, out, {keys[slot]: values for slot, values in stepped.items()}


def stepper(strategy: Strategy, state: TensorSource, global_model: TensorSource,
            updates: RoundUpdates, combiner: Callable[[RoundUpdates], Combine] | None = None
            ) -> Callable[[str], Iterator[LeafBlock]]:
    """Prepare a round (the strategy's combiner runs once here) and return ``leaf(name)``: the new value of
    one leaf of ``updates.specs`` as ``(block, values, state)`` over the flattened leaf, values in the leaf's
    dtype (valid until the next block) and state the leaf's new slot blocks, float64, by ``slot/leaf``.
    ``combiner``: one that replaces the strategy's (central DP's clipped, noised mean)."""
    if updates.count == 0:
        raise AggregationError("no update to aggregate")
    rule = strategy.rule()
    if combiner is not None:
        rule = dataclasses.replace(rule, combiner=combiner)
    combine = rule.combiner(updates)

    def leaf(name: str) -> Iterator[LeafBlock]:
        spec = updates.specs[name]
        if not is_float(spec.dtype):
            values = updates.maximum(name).astype(spec.dtype, copy=False).reshape(-1)
            return iter([(slice(0, values.size), values, {})])
        if not is_param(spec):
            return _in_dtype(np.dtype(spec.dtype), updates.weighted_mean(name))
        if rule.step is None:
            return _in_dtype(np.dtype(spec.dtype), combine(name))
        return _stepped(rule, spec, combine(name), global_model, state)
    return leaf


class NextState:
    """A round's new strategy state, gathered from the leaves' state blocks as they go by (:meth:`tee`)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def tee(self, spec: TensorSpec, leaf: Iterator[LeafBlock]) -> Blocks:
        """The leaf's ``(block, values)``, keeping its state blocks on the way."""
        for block, values, state in leaf:
            for key, new in state.items():
                if key not in self.arrays:
                    self.arrays[key] = np.empty(spec.shape, state_dtype(spec))
                self.arrays[key].reshape(-1)[block] = new
            yield block, values


def aggregate(strategy: Strategy, state: TensorSource, global_model: TensorSource,
              updates: RoundUpdates) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(model, new_state)`` in memory: every leaf of ``updates.specs`` as an array, and the strategy's new
    state (``init_state`` before the first round). The in-process simulation's path; the director's closer
    streams the same leaves to a file instead. Same bytes as the director's, whatever the sources are."""
    leaf = stepper(strategy, state, global_model, updates)
    model, new_state = {}, NextState()
    for name, spec in updates.specs.items():
        out = np.empty(spec.shape, spec.dtype)
        flat = out.reshape(-1)
        for block, values in new_state.tee(spec, leaf(name)):
            flat[block] = values
        model[name] = out
    return model, new_state.arrays
