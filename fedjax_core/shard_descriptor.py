"""Shard descriptors: how a data owner's local data is exposed to experiment code.

An envoy names a `ShardDescriptor` subclass in its config
(`shard_descriptor.template: module.ClassName`) together with constructor params.
The envoy daemon only asks it for `split_sizes()` and its shapes (to register with
the director); the experiment's worker process calls `get_split` / `get_dataset`
to read the actual arrays. Data never leaves the envoy.

This module imports only the standard library and numpy, so the envoy daemon can
load descriptors without importing JAX.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SPLIT_NAMES: tuple[str, ...] = ("train", "valid")
_SPLIT_ALIASES: dict[str, str] = {"train": "train", "valid": "valid", "val": "valid"}


def normalize_split_name(name: str) -> str:
    """Return the canonical split name ('train' or 'valid'); 'val' is an alias of 'valid'."""
    canonical = _SPLIT_ALIASES.get(name) if isinstance(name, str) else None
    if canonical is None:
        raise ValueError(
            f"unknown split {name!r}: accepted names are 'train' and 'valid' "
            "('val' is an alias of 'valid')"
        )
    return canonical


class ArrayDataset:
    """An indexable dataset of `(sample, target)` pairs over two equally long arrays.

    This is what `ShardDescriptor.get_dataset` returns, mirroring OpenFL's
    `get_dataset(name)[i]`. The whole arrays stay available as `.samples` and
    `.targets` for code that batches them directly.
    """

    def __init__(self, samples: np.ndarray, targets: np.ndarray) -> None:
        self.samples = np.asarray(samples)
        self.targets = np.asarray(targets)
        if len(self.samples) != len(self.targets):
            raise ValueError(
                f"samples and targets differ in length: {len(self.samples)} samples, "
                f"{len(self.targets)} targets"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return `(samples[index], targets[index])`; a scalar target becomes shape (1,)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset index must be an int; got {type(index).__name__}")
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for a dataset of {size} samples")
        target = self.targets[index]
        if np.ndim(target) == 0:
            # A per-sample label is scalar; target_shape ['1'] promises a 1-element array.
            target = np.reshape(target, (1,))
        return self.samples[index], target

    def __repr__(self) -> str:
        return (
            f"ArrayDataset({len(self)} samples, sample shape {self.samples.shape[1:]}, "
            f"target shape {self.targets.shape[1:]})"
        )


class ShardDescriptor(abc.ABC):
    """Base class for a data owner's local shard.

    Subclasses implement `get_split` and the three describing properties. The
    arrays of a split are stored under `sample_key` and `target_key`.
    """

    sample_key: str = "image"
    target_key: str = "label"

    @abc.abstractmethod
    def get_split(self, name: str) -> dict[str, np.ndarray]:
        """Return the arrays of split `name` ('train', 'valid' or its alias 'val')."""

    @property
    @abc.abstractmethod
    def sample_shape(self) -> list[str]:
        """Shape of one sample, as strings (e.g. ['32', '32', '3'])."""

    @property
    @abc.abstractmethod
    def target_shape(self) -> list[str]:
        """Shape of one target, as strings (e.g. ['1'])."""

    @property
    @abc.abstractmethod
    def dataset_description(self) -> str:
        """A one-line human description shown in the director's shard registry."""

    def get_dataset(self, name: str) -> ArrayDataset:
        """Return split `name` as an indexable `(sample, target)` dataset."""
        split = self.get_split(name)
        missing = [key for key in (self.sample_key, self.target_key) if key not in split]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.get_split({name!r}) has no key(s) {missing}; "
                f"it returned keys {sorted(split)} (set sample_key / target_key on the class)"
            )
        return ArrayDataset(split[self.sample_key], split[self.target_key])

    def split_sizes(self) -> dict[str, int]:
        """Return the number of samples per split, e.g. {'train': 2585, 'valid': 509}.

        This default loads each split; subclasses whose data is large should
        override it with something cheap, because the envoy calls it at registration.
        """
        return {name: len(self.get_split(name)[self.target_key]) for name in SPLIT_NAMES}


def _parse_shape(shape: Sequence[str | int], what: str) -> tuple[int, ...]:
    """Turn ['32', '32', '3'] or [32, 32, 3] into (32, 32, 3), rejecting non-positive sizes."""
    error = ValueError(
        f"{what} must be a list of positive integers such as ['32', '32', '3']; got {shape!r}"
    )
    if isinstance(shape, (str, bytes)):
        raise error
    try:
        dims = tuple(int(dim) for dim in shape)
    except (TypeError, ValueError):
        raise error from None
    if any(dim <= 0 for dim in dims):
        raise error
    return dims


def checked_description(shard: ShardDescriptor) -> dict[str, Any]:
    """What an envoy tells the director about ``shard``, each value checked as it comes from the descriptor:
    ``description`` (str), ``sample_shape`` / ``target_shape`` (tuples of digit strings), ``train_size`` /
    ``valid_size`` (ints >= 0) and ``label_counts`` (a tuple of ints >= 0, one per class; empty when the
    descriptor has no ``label_counts()``). ValueError names the method and says what it should return."""
    name = type(shard).__name__

    def bad(method: str, got: Any, want: str) -> ValueError:
        shown = repr(got) if len(repr(got)) <= 120 else repr(got)[:117] + "..."
        return ValueError(f"{name}.{method} returned {shown} ({type(got).__name__}); it must return {want}")

    def count(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 0

    description = shard.dataset_description
    if not isinstance(description, str):
        raise bad("dataset_description", description, "a str (one line shown in the shard registry)")
    shapes = {}
    for method in ("sample_shape", "target_shape"):
        shape = getattr(shard, method)
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not all(
                (isinstance(d, str) and d.isdigit() and int(d) > 0) or (count(d) and d > 0) for d in shape):
            raise bad(method, shape, "a list of positive sizes as strings, e.g. ['32', '32', '3']")
        shapes[method] = tuple(str(int(d)) for d in shape)
    sizes = shard.split_sizes()
    if not isinstance(sizes, Mapping) or not all(count(sizes.get(split)) for split in SPLIT_NAMES):
        raise bad("split_sizes()", sizes, "a dict with the number of samples of each split, e.g. "
                                          "{'train': 2585, 'valid': 509}")
    counts: Any = shard.label_counts() if callable(getattr(shard, "label_counts", None)) else ()
    if isinstance(counts, np.ndarray) and counts.ndim == 1:
        counts = counts.tolist()
    if isinstance(counts, Mapping) or not isinstance(counts, Sequence) or not all(count(n) for n in counts):
        raise bad("label_counts()", counts, "a list with one count per class, indexed by label, e.g. "
                                            "[261, 266, ...] (from a dict: [counts.get(i, 0) for i in range(n)])")
    return {"description": description, **shapes, "train_size": int(sizes["train"]),
            "valid_size": int(sizes["valid"]), "label_counts": tuple(int(n) for n in counts)}


class DummyShardDescriptor(ShardDescriptor):
    """A shard of zeros with given shapes: lets notebook code be checked without real data."""

    def __init__(
        self,
        sample_shape: Sequence[str | int],
        target_shape: Sequence[str | int],
        size: int,
    ) -> None:
        self._sample_dims = _parse_shape(sample_shape, "sample_shape")
        self._target_dims = _parse_shape(target_shape, "target_shape")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(f"size must be a non-negative int; got {size!r}")
        self._size = int(size)

    def get_split(self, name: str) -> dict[str, np.ndarray]:
        """Return `size` zero samples (float32) and zero targets (int32) for either split."""
        normalize_split_name(name)
        return {
            self.sample_key: np.zeros((self._size, *self._sample_dims), dtype=np.float32),
            self.target_key: np.zeros((self._size, *self._target_dims), dtype=np.int32),
        }

    def split_sizes(self) -> dict[str, int]:
        """Both splits hold `size` samples."""
        return {name: self._size for name in SPLIT_NAMES}

    @property
    def sample_shape(self) -> list[str]:
        return [str(dim) for dim in self._sample_dims]

    @property
    def target_shape(self) -> list[str]:
        return [str(dim) for dim in self._target_dims]

    @property
    def dataset_description(self) -> str:
        return f"Dummy shard of {self._size} zero samples per split"


def _describe_params(cls: type) -> str:
    """Render a constructor's parameters as '(a, b=1, *, c=None)' for error messages."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return "(...)"
    plain = [
        param.replace(annotation=inspect.Parameter.empty)
        for param in signature.parameters.values()
    ]
    return str(signature.replace(parameters=plain, return_annotation=inspect.Signature.empty))


def _accepts_base_dir(cls: type) -> bool:
    """True when the class's constructor has an explicit `base_dir` keyword parameter."""
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("base_dir")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _import_descriptor_module(template: str, module_name: str, base_dir: pathlib.Path) -> Any:
    """Import `module_name` with `base_dir` first on sys.path, turning failures into clear errors.

    `base_dir` stays on sys.path afterwards, since a descriptor may import its
    sibling modules lazily.
    """
    search_dir = str(base_dir)
    if search_dir in sys.path:
        sys.path.remove(search_dir)
    sys.path.insert(0, search_dir)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise ImportError(
                f"shard_descriptor.template {template!r}: no module named {missing!r} "
                f"(searched {search_dir} and sys.path)"
            ) from exc
        raise ImportError(
            f"shard_descriptor.template {template!r}: module {module_name!r} needs a package "
            f"that is not installed: {exc}"
        ) from exc
    except Exception as exc:
        raise ImportError(
            f"shard_descriptor.template {template!r}: importing module {module_name!r} failed "
            f"with {type(exc).__name__}: {exc}"
        ) from exc


def load_shard_descriptor(
    template: str, params: Mapping[str, Any] | None, base_dir: pathlib.Path
) -> ShardDescriptor:
    """Build the shard descriptor an envoy config names.

    `template` is 'module.ClassName' (the module may be dotted; the class follows
    the last dot). The module is imported with `base_dir`, the envoy config's
    folder, first on sys.path, so a descriptor file beside the config is found.
    If the class's constructor takes `base_dir`, it receives it so that relative
    data paths resolve against the config folder rather than the cwd.

    Raises ImportError when the module cannot be imported, and ValueError when the
    template is malformed, names no ShardDescriptor subclass, or `params` do not
    fit the constructor; every message names the template or the class.
    """
    module_name, class_name = "", ""
    if isinstance(template, str):
        module_name, _, class_name = template.rpartition(".")
    if not module_name or not class_name:
        raise ValueError(
            f"shard_descriptor.template must look like 'module.ClassName'; got {template!r}"
        )
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError(
            f"shard_descriptor.params must be a mapping of constructor arguments; "
            f"got {type(params).__name__}"
        )
    base_dir = pathlib.Path(base_dir).resolve()

    module = _import_descriptor_module(template, module_name, base_dir)
    cls = getattr(module, class_name, None)
    if cls is None:
        where = getattr(module, "__file__", None) or module_name
        raise ValueError(
            f"shard_descriptor.template {template!r}: module {module_name!r} ({where}) "
            f"has no class {class_name!r}"
        )
    if not (isinstance(cls, type) and issubclass(cls, ShardDescriptor)):
        raise ValueError(
            f"shard_descriptor.template {template!r} is not a ShardDescriptor subclass "
            f"(it is {cls!r}); subclass fedjax_core.shard_descriptor.ShardDescriptor"
        )
    if inspect.isabstract(cls):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        raise ValueError(
            f"shard_descriptor.template {template!r} is abstract: implement {missing}"
        )

    kwargs = dict(params)
    if "base_dir" not in kwargs and _accepts_base_dir(cls):
        kwargs["base_dir"] = base_dir
    try:
        return cls(**kwargs)
    except TypeError as exc:
        # A config problem, reported like the other config errors (ValueError).
        raise ValueError(
            f"shard_descriptor.params do not fit {cls.__name__}{_describe_params(cls)}: {exc}"
        ) from exc
