"""An experiment's global model and strategy state per round, behind :class:`RoundModels`.

Closing a round reads round r's model and strategy state and writes round r + 1's
(:mod:`fedjax_core.director.closer`); it does so through this interface only, so the same close
runs on files (:class:`FileRoundModels`: ``model_round_NNNN.fjm`` and
``server_state_round_NNNN.fjm`` under :class:`~fedjax_core.director.files.ExperimentFiles`,
written atomically, byte for byte as the director always wrote them) or in memory
(:class:`MemoryRoundModels`: numpy arrays, for the simulation and tests).

Only these per-round models and states are here. Spooled uploads, code bundles, submission
staging, the best model and compressed downloads stay file-only
(:class:`~fedjax_core.director.files.ExperimentFiles`): they are the network path, streamed
to and from disk as bytes arrive or leave.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from fedjax_core.aggregation import ArraySource, TensorSource
from fedjax_core.director.files import ExperimentFiles
from fedjax_core.records import TensorSpec
from fedjax_core.tensors import TensorError
from fedjax_core.model_file import ModelFile, ModelFileWriter


class ModelSource(TensorSource, Protocol):
    """A :class:`~fedjax_core.aggregation.TensorSource` that also lists its tensors, in their stored order."""

    @property
    def specs(self) -> list[TensorSpec]: ...


class ModelWriter(Protocol):
    """Writes one model (or state) tensor by tensor; nothing is visible until :meth:`commit`, and leaving the
    ``with`` block on an exception discards it (as :class:`~fedjax_core.model_file.ModelFileWriter` does)."""

    def add_array(self, name: str, array: np.ndarray) -> None:
        """Add a whole tensor."""

    def add_blocks(self, name: str, dtype: np.dtype | str, shape: tuple[int, ...],
                   blocks: Iterable[tuple[slice, np.ndarray]]) -> None:
        """Add a tensor from ``(slice, values)`` blocks of its flattened values, in order (buffers may be reused)."""

    def copy_tensor(self, source: TensorSource, name: str) -> None:
        """Add tensor ``name`` of ``source`` as it is (the file writer's takes a ModelFile, or any source)."""

    def commit(self) -> list[TensorSpec]:
        """Check every tensor is complete and put the model in place at once; returns its specs."""

    def abort(self) -> None:
        """Discard what was written."""

    def __enter__(self) -> ModelWriter: ...

    def __exit__(self, exc_type, exc, tb) -> None: ...


class RoundModels(Protocol):
    """Each round's global model and the strategy's state beside it, per experiment."""

    def model(self, experiment: str, round_: int) -> ModelSource:
        """The model round ``round_`` starts from; FileNotFoundError if there is none."""

    def model_writer(self, experiment: str, round_: int) -> ModelWriter:
        """A writer whose commit makes round ``round_``'s model (replacing any before it)."""

    def state(self, experiment: str, round_: int) -> ModelSource | None:
        """The strategy's state at the start of round ``round_``, or None if none was written."""

    def state_writer(self, experiment: str, round_: int) -> ModelWriter:
        """A writer whose commit makes round ``round_``'s strategy state (replacing any before it)."""

    def carry_over(self, experiment: str, round_: int) -> None:
        """A round that did not average: round r + 1 starts from round r's model and strategy state."""

    def keep_best(self, experiment: str, round_: int) -> None:
        """Round r's model becomes the experiment's best model."""

    def best(self, experiment: str) -> ModelSource | None:
        """The best model so far (None before one is kept)."""

    def drop(self, experiment: str, round_: int) -> None:
        """Round r's model and strategy state, once round r + 1 runs (the best model keeps its own copy)."""

    def state_location(self, experiment: str, round_: int) -> str:
        """Where round ``round_``'s strategy state is (or would be) kept, for messages."""


class FileRoundModels:
    """:class:`RoundModels` on the experiment's model files, written atomically (``.partial``, then renamed)."""

    def __init__(self, files: ExperimentFiles):
        self.files = files

    def model(self, experiment: str, round_: int) -> ModelFile:
        return ModelFile(self.files.model(experiment, round_))

    def model_writer(self, experiment: str, round_: int) -> ModelFileWriter:
        return ModelFileWriter(self.files.model(experiment, round_))

    def state(self, experiment: str, round_: int) -> ModelFile | None:
        path = self.files.server_state(experiment, round_)
        return ModelFile(path) if path.exists() else None

    def state_writer(self, experiment: str, round_: int) -> ModelFileWriter:
        return ModelFileWriter(self.files.server_state(experiment, round_))

    def carry_over(self, experiment: str, round_: int) -> None:
        self.files.carry_over(experiment, round_)

    def keep_best(self, experiment: str, round_: int) -> None:
        self.files.copy_best(experiment, round_)

    def best(self, experiment: str) -> ModelFile | None:
        path = self.files.best(experiment)
        return ModelFile(path) if path.exists() else None

    def drop(self, experiment: str, round_: int) -> None:
        self.files.drop_superseded(experiment, round_)

    def state_location(self, experiment: str, round_: int) -> str:
        return str(self.files.server_state(experiment, round_))


class MemoryRoundModels:
    """:class:`RoundModels` in memory: each committed model is a dict of numpy arrays, never changed afterwards
    (a commit replaces the dict whole), so readers share it without copies. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[tuple[str, str, int], dict[str, np.ndarray]] = {}  # (kind, experiment, round) -> arrays

    def model(self, experiment: str, round_: int) -> ArraySource:
        found = self._get("model", experiment, round_)
        if found is None:
            raise FileNotFoundError(f"experiment {experiment!r} has no model of round {round_} in memory")
        return found

    def model_writer(self, experiment: str, round_: int) -> MemoryModelWriter:
        return MemoryModelWriter(self, ("model", experiment, round_))

    def state(self, experiment: str, round_: int) -> ArraySource | None:
        return self._get("state", experiment, round_)

    def state_writer(self, experiment: str, round_: int) -> MemoryModelWriter:
        return MemoryModelWriter(self, ("state", experiment, round_))

    def carry_over(self, experiment: str, round_: int) -> None:
        with self._lock:
            for kind in ("model", "state"):
                if (kind, experiment, round_) in self._kept:
                    self._kept[(kind, experiment, round_ + 1)] = self._kept[(kind, experiment, round_)]

    def keep_best(self, experiment: str, round_: int) -> None:
        with self._lock:
            self._kept[("best", experiment, 0)] = self._kept[("model", experiment, round_)]

    def best(self, experiment: str) -> ArraySource | None:
        return self._get("best", experiment, 0)

    def drop(self, experiment: str, round_: int) -> None:
        with self._lock:
            for kind in ("model", "state"):
                self._kept.pop((kind, experiment, round_), None)

    def state_location(self, experiment: str, round_: int) -> str:
        return f"in memory: experiment {experiment!r}, round {round_}"

    def _get(self, kind: str, experiment: str, round_: int) -> ArraySource | None:
        with self._lock:
            found = self._kept.get((kind, experiment, round_))
        return ArraySource(found) if found is not None else None

    def _install(self, key: tuple[str, str, int], arrays: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._kept[key] = arrays


class MemoryModelWriter:
    """A :class:`ModelWriter` into :class:`MemoryRoundModels`, with the file writer's checks: a tensor once,
    blocks in order, every tensor complete."""

    def __init__(self, target: MemoryRoundModels, key: tuple[str, str, int]):
        self._target, self._key = target, key
        self._arrays: dict[str, np.ndarray] | None = {}

    def add_array(self, name: str, array: np.ndarray) -> None:
        self._new(name)[name] = np.array(array, copy=True, order="C")

    def add_blocks(self, name: str, dtype: np.dtype | str, shape: tuple[int, ...],
                   blocks: Iterable[tuple[slice, np.ndarray]]) -> None:
        out = np.empty(tuple(int(d) for d in shape), np.dtype(dtype))
        flat, filled = out.reshape(-1), 0
        for block, values in blocks:
            values = np.asarray(values).reshape(-1)
            if block.start != filled or values.size != block.stop - block.start or block.stop > flat.size:
                raise TensorError(f"tensor {name!r}: block {block.start}:{block.stop} of {values.size} values "
                                  f"arrived after {filled} values")
            flat[block] = values
            filled = block.stop
        if filled != flat.size:
            raise TensorError(f"tensor {name!r}: got {filled} of {flat.size} values")
        self._new(name)[name] = out

    def copy_tensor(self, source: TensorSource, name: str) -> None:
        spec = source.spec(name)
        if spec.encoding is not None:
            raise TensorError(f"tensor {name!r} is encoded ({spec.encoding.codec}); memory keeps decoded arrays only")
        out = np.empty(math.prod(spec.shape), np.dtype(spec.dtype).newbyteorder("<"))
        self._new(name)[name] = source.read_into(name, 0, out).reshape(spec.shape)

    def commit(self) -> list[TensorSpec]:
        arrays = self._open()
        self._arrays = None
        self._target._install(self._key, arrays)
        return ArraySource(arrays).specs

    def abort(self) -> None:
        self._arrays = None

    def __enter__(self) -> MemoryModelWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            raise TensorError("this model was committed or aborted already")
        return self._arrays

    def _new(self, name: str) -> dict[str, np.ndarray]:
        arrays = self._open()
        if name in arrays:
            raise TensorError(f"tensor {name!r} sent twice")
        return arrays
