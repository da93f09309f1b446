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

Cost: the weighted mean is folded as each update arrives, in float64, so FedAvg and the
server optimizers hold O(model) whatever the number of envoys (the FedOpt state adds one
or two model-sized tensors, kept in the leaf's dtype, at least float32, on disk). The robust
combiners read every spooled update block by block when the round closes: memory
O(envoys x block), time O(envoys x model) per round (Krum: O(envoys^2 x model)).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from fedjax_core import strategies as s
from fedjax_core.errors import InvalidRequestError
from fedjax_core.records import TensorSpec
from fedjax_core.tensors import is_float_dtype

log = logging.getLogger("fedjax.aggregation")

_BLOCK = 1 << 18  # elements per block: bounds float64 temporaries to 2 MiB per update

Tensors = Mapping[str, np.ndarray]


class AggregationError(InvalidRequestError, ValueError):
    """Updates that cannot be aggregated (no updates, a non-positive weight, a missing tensor)."""


def is_float(dtype: str) -> bool:
    return is_float_dtype(dtype)


def is_param(spec: TensorSpec) -> bool:
    return spec.name.startswith("params/") and is_float(spec.dtype)


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(x).astype(dtype, copy=False)


# ----------------------------------------------------------------------------- updates
def _add_scaled(total: np.ndarray, x: np.ndarray, weight: float) -> None:
    """``total += weight * x`` in float64, block by block, so no tensor-sized temporary is made."""
    flat_total, flat_x = total.reshape(-1), np.asarray(x).reshape(-1)
    for start in range(0, flat_total.size, _BLOCK):
        block = slice(start, start + _BLOCK)
        flat_total[block] += np.multiply(flat_x[block], weight, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Upload:
    envoy: str
    weight: float  # the envoy's training-sample count
    tensors: Tensors  # in the director a ModelFile: arrays mapped lazily from the spooled file


class RoundUpdates:
    """The accepted uploads of one round: folded into a running weighted mean as they arrive,
    and kept (as lazily mapped files) for the rules that need every upload."""

    def __init__(self, specs: Sequence[TensorSpec], fold_params: bool = True):
        self.specs = {spec.name: spec for spec in specs}
        self.uploads: list[Upload] = []
        self.total_weight = 0.0
        self._sums = {spec.name: np.zeros(spec.shape, np.float64) for spec in specs
                      if is_float(spec.dtype) and (fold_params or not is_param(spec))}
        self._maxima: dict[str, np.ndarray] = {}
        self.cache: dict[str, object] = {}  # per-round results a rule computes once (Krum's choice)

    def add(self, upload: Upload) -> None:
        if not upload.weight > 0:
            raise AggregationError(f"the update of {upload.envoy!r} has weight {upload.weight}; "
                                   "an update's weight (training-sample count) must be > 0")
        for name, spec in self.specs.items():  # check everything before folding anything
            if name not in upload.tensors:
                raise AggregationError(f"the update of {upload.envoy!r} lacks tensor {name!r}")
            shape = tuple(upload.tensors[name].shape)
            if shape != tuple(spec.shape):
                raise AggregationError(f"the update of {upload.envoy!r}: tensor {name!r} has shape "
                                       f"{shape}, expected {tuple(spec.shape)}")
        for name, spec in self.specs.items():
            x = upload.tensors[name]
            if name in self._sums:
                _add_scaled(self._sums[name], x, upload.weight)
            elif not is_float(spec.dtype):
                if name in self._maxima:
                    np.maximum(self._maxima[name], x, out=self._maxima[name])
                else:
                    self._maxima[name] = np.array(x, copy=True)
        self.uploads.append(upload)
        self.total_weight += upload.weight

    @property
    def count(self) -> int:
        return len(self.uploads)

    def mean(self, name: str, dtype: np.dtype | str = np.float64) -> np.ndarray:
        """The sample-weighted mean of a folded float leaf, divided straight into ``dtype`` (no temporary)."""
        out = np.empty(self._sums[name].shape, dtype)
        np.divide(self._sums[name], self.total_weight, out=out, casting="unsafe")
        return out

    def maximum(self, name: str) -> np.ndarray:
        return self._maxima[name]

    def sorted_uploads(self) -> list[Upload]:
        """Uploads in envoy-name order: robust rules do not depend on arrival order."""
        return sorted(self.uploads, key=lambda u: u.envoy)

    def blocks(self, name: str) -> Iterator[tuple[slice, np.ndarray]]:
        """``(slice, stack)`` over the flattened tensor ``name``: stack is (uploads x block) float64."""
        flats = [np.asarray(u.tensors[name]).reshape(-1) for u in self.sorted_uploads()]
        size = int(np.prod(self.specs[name].shape, dtype=np.int64))
        for start in range(0, max(size, 1), _BLOCK):
            block = slice(start, min(start + _BLOCK, size))
            yield block, np.stack([f[block] for f in flats]).astype(np.float64)


# --------------------------------------------------------------------------- combiners
Combiner = Callable[[RoundUpdates, str, np.dtype], np.ndarray]  # (updates, leaf, out dtype) -> combined leaf


def _blockwise(rule: Callable[[np.ndarray], np.ndarray]) -> Combiner:
    def combine(updates: RoundUpdates, name: str, dtype: np.dtype) -> np.ndarray:
        out = np.empty(int(np.prod(updates.specs[name].shape, dtype=np.int64)), dtype)
        for block, stack in updates.blocks(name):
            out[block] = rule(stack)
        return out.reshape(updates.specs[name].shape)
    return combine


def _weighted_mean(updates: RoundUpdates, name: str, dtype: np.dtype) -> np.ndarray:
    return updates.mean(name, dtype)


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
    def combine(updates: RoundUpdates, name: str, dtype: np.dtype) -> np.ndarray:
        if "krum" not in updates.cache:
            updates.cache["krum"] = krum_choice(updates, f, keep)
        chosen = updates.cache["krum"]
        ordered = updates.sorted_uploads()
        weights = np.array([ordered[i].weight for i in chosen], np.float64)
        out = np.zeros(updates.specs[name].shape, np.float64)
        for i, w in zip(chosen, weights):
            _add_scaled(out, ordered[i].tensors[name], float(w))
        return np.divide(out, weights.sum(), out=np.empty(out.shape, dtype), casting="unsafe")
    return combine


# -------------------------------------------------------------------- server optimizers
class ServerOptimizer(NamedTuple):
    """Per leaf: ``init(spec) -> state tensors``, ``update(name, x, target, state) -> (x_new, state)``.

    ``x`` is the round's global leaf (as stored) and ``target`` the combiner's result in float64.
    """

    init: Callable[[TensorSpec], dict[str, np.ndarray]]
    update: Callable[[str, np.ndarray, np.ndarray, Tensors], tuple[np.ndarray, dict[str, np.ndarray]]]


def _state_dtype(spec: TensorSpec) -> np.dtype:
    return np.promote_types(spec.dtype, np.float32)


def _zeros(*slots: str) -> Callable[[TensorSpec], dict[str, np.ndarray]]:
    return lambda spec: {f"{slot}/{spec.name}": np.zeros(spec.shape, _state_dtype(spec)) for slot in slots}


def _momentum(lr: float, beta: float) -> ServerOptimizer:
    """FedAvgM: v_t = β·v_{t−1} + (x_t − mean_t), x_{t+1} = x_t − η·v_t."""
    def update(name, x, target, state):
        key = f"momentum/{name}"
        x = np.asarray(x, np.float64)
        v = beta * np.asarray(state[key], np.float64) + (x - target)
        return x - lr * v, {key: v.astype(state[key].dtype)}
    return ServerOptimizer(init=_zeros("momentum"), update=update)


def _fedopt(eta: float, beta_1: float, tau: float,
            second_moment: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> ServerOptimizer:
    """Reddi et al. 2021, Algorithm 2 (no bias correction): x_{t+1} = x_t + η·m_t / (√v_t + τ)."""
    def update(name, x, target, state):
        m_key, v_key = f"m/{name}", f"v/{name}"
        x = np.asarray(x, np.float64)
        delta = target - x
        m = beta_1 * np.asarray(state[m_key], np.float64) + (1 - beta_1) * delta
        v = second_moment(np.asarray(state[v_key], np.float64), np.square(delta))
        return x + eta * m / (np.sqrt(v) + tau), {m_key: m.astype(state[m_key].dtype),
                                                   v_key: v.astype(state[v_key].dtype)}
    return ServerOptimizer(init=_zeros("m", "v"), update=update)


def _adam_v(beta_2: float):
    return lambda v, d2: beta_2 * v + (1 - beta_2) * d2


def _yogi_v(beta_2: float):
    return lambda v, d2: v - (1 - beta_2) * d2 * np.sign(v - d2)


def _adagrad_v(v: np.ndarray, d2: np.ndarray) -> np.ndarray:
    return v + d2


# ----------------------------------------------------------------------------- strategy
class ServerStrategy(NamedTuple):
    """``init(specs) -> state``; ``aggregate(state, global_model, updates) -> (model, state)``."""

    init: Callable[[Sequence[TensorSpec]], dict[str, np.ndarray]]
    aggregate: Callable[[Tensors, Tensors, RoundUpdates], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
    folds_params: bool  # whether RoundUpdates should fold params leaves into the running mean


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

    def aggregate(state: Tensors, global_model: Tensors, updates: RoundUpdates):
        if updates.count == 0:
            raise AggregationError("no update to aggregate")
        model: dict[str, np.ndarray] = {}
        new_state: dict[str, np.ndarray] = {}
        for name, spec in updates.specs.items():
            if not is_float(spec.dtype):
                model[name] = _cast(updates.maximum(name), spec.dtype)
            elif not is_param(spec):
                model[name] = updates.mean(name, spec.dtype)
            elif optimizer is None:  # straight into the leaf's dtype: no model-sized float64 temporaries
                model[name] = combine(updates, name, np.dtype(spec.dtype))
            else:
                target = combine(updates, name, np.dtype(np.float64))
                x_new, leaf_state = optimizer.update(name, global_model[name], target, state)
                model[name] = _cast(x_new, spec.dtype)
                new_state.update(leaf_state)
        return model, new_state

    return ServerStrategy(init=init, aggregate=aggregate, folds_params=not strategy.robust)
