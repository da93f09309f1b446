"""Seeded data partitioners: split a data set's samples among envoys, for simulations and shard descriptors.

A partitioner is a frozen dataclass; calling it on the samples' 1-D labels returns one sorted int64 index
array per envoy, disjoint and together covering every sample (nothing dropped, nothing repeated). Its draws
come from `numpy.random.default_rng([seed, n_envoys])` (and `[seed, n_envoys, c]` for class c), so any
process that builds the same partitioner over the same labels gets the same parts: an envoy can compute its
own shard alone. All envoys are computed at once, vectorised (10,000 envoys over 1e6 samples take well under
a second).

    from fedjax_core import partition
    parts = partition.dirichlet(n_envoys=100, alpha=0.3, seed=0)(labels)
    partition.label_counts(parts, labels)        # [100, classes]

A partition that leaves an envoy without samples raises ValueError unless built with `allow_empty=True`.
"""
from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Partitioner", "Contiguous", "IID", "Dirichlet", "Pathological", "LogNormal", "Natural",
           "contiguous", "iid", "dirichlet", "pathological", "lognormal", "natural",
           "label_counts", "plot_label_counts"]


class Partitioner(abc.ABC):
    """Base of the partitioners: `p(labels)` -> `p.n_envoys` sorted int64 index arrays into `labels`."""

    n_envoys: int
    allow_empty: bool = False
    _empty_hint = "fewer envoys"  # what to change when an envoy comes out empty

    def __call__(self, labels: Any) -> list[np.ndarray]:
        """Split the samples (one label each) among the envoys; see the class for how."""
        labels = _as_1d(labels, type(self).__name__)
        owner = self._assign(labels)  # owner[i]: the envoy of sample i
        counts = np.bincount(owner, minlength=self.n_envoys)
        empty = int(np.count_nonzero(counts == 0))
        if empty and not self.allow_empty:
            raise ValueError(
                f"{type(self).__name__}: {empty} of {self.n_envoys} envoys got no samples (from {len(labels)} "
                f"samples): use {self._empty_hint}, or pass allow_empty=True to keep empty envoys")
        order = np.argsort(owner, kind="stable").astype(np.int64, copy=False)  # by envoy, ascending within one
        return np.split(order, np.cumsum(counts)[:-1])

    @abc.abstractmethod
    def _assign(self, labels: np.ndarray) -> np.ndarray:
        """The envoy (0-based, int64) of every sample."""


@dataclass(frozen=True)
class Contiguous(Partitioner):
    """`numpy.array_split(range(n), n_envoys)`: consecutive runs of near-equal size, no randomness."""

    n_envoys: int
    allow_empty: bool = field(default=False, kw_only=True)
    _empty_hint = "fewer envoys than samples"

    def __post_init__(self) -> None:
        _check_envoys(self.n_envoys)

    def _assign(self, labels: np.ndarray) -> np.ndarray:
        return _runs(np.arange(self.n_envoys), _even_sizes(len(labels), self.n_envoys))


@dataclass(frozen=True)
class IID(Partitioner):
    """A seeded shuffle cut into `n_envoys` near-equal parts (sizes differ by at most one)."""

    n_envoys: int
    seed: int = 0
    allow_empty: bool = field(default=False, kw_only=True)
    _empty_hint = "fewer envoys than samples"

    def __post_init__(self) -> None:
        _check_envoys(self.n_envoys)
        _check_seed(self.seed)

    def _assign(self, labels: np.ndarray) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.n_envoys]).permutation(len(labels))
        owner = np.empty(len(labels), np.int64)
        owner[order] = _runs(np.arange(self.n_envoys), _even_sizes(len(labels), self.n_envoys))
        return owner


@dataclass(frozen=True)
class Dirichlet(Partitioner):
    """Label skew: per class c, proportions q_c ~ Dirichlet(alpha, ..., alpha) over the envoys.

    The class's samples, shuffled, are cut at the cumulative proportions. Small alpha (0.1): few classes
    per envoy; large alpha (100): near IID. `num_classes` defaults to max(label) + 1.
    """

    n_envoys: int
    alpha: float
    seed: int = 0
    num_classes: int | None = None
    allow_empty: bool = field(default=False, kw_only=True)
    _empty_hint = "fewer envoys or a larger alpha"

    def __post_init__(self) -> None:
        _check_envoys(self.n_envoys)
        _check_seed(self.seed)
        if not (_is_number(self.alpha) and 0 < self.alpha < math.inf):
            raise ValueError(f"dirichlet needs alpha > 0 (finite), got {self.alpha!r}: small alpha (0.1) gives "
                             "few classes per envoy, large alpha (100) near-IID envoys")
        _check_num_classes(self.num_classes)

    def _assign(self, labels: np.ndarray) -> np.ndarray:
        labels = _as_labels(labels, "dirichlet")
        num_classes = _class_count(labels, self.num_classes, "dirichlet")
        rng = np.random.default_rng([self.seed, self.n_envoys])
        proportions = rng.dirichlet(np.full(self.n_envoys, self.alpha), size=num_classes)
        owner = np.empty(len(labels), np.int64)
        envoys = np.arange(self.n_envoys)
        for c, members in enumerate(_by_class(labels, num_classes)):
            members = np.random.default_rng([self.seed, self.n_envoys, c]).permutation(members)
            cuts = (np.cumsum(proportions[c])[:-1] * len(members)).astype(np.int64)
            bounds = np.concatenate(([0], np.clip(cuts, 0, len(members)), [len(members)]))
            owner[members] = _runs(envoys, np.diff(bounds))
        return owner


@dataclass(frozen=True)
class Pathological(Partitioner):
    """k classes per envoy: envoy i holds classes (i * k + j) % num_classes for j < k.

    Each class's samples, shuffled with the seed, are split evenly (numpy.array_split) among the envoys
    holding it. Needs 1 <= k <= num_classes and n_envoys * k >= num_classes, so every class is held.
    """

    n_envoys: int
    classes_per_envoy: int
    seed: int = 0
    num_classes: int | None = None
    allow_empty: bool = field(default=False, kw_only=True)
    _empty_hint = "fewer envoys or a larger classes_per_envoy"

    def __post_init__(self) -> None:
        _check_envoys(self.n_envoys)
        _check_seed(self.seed)
        k = self.classes_per_envoy
        if not (_is_int(k) and k >= 1):
            raise ValueError(f"pathological needs classes_per_envoy >= 1 (an integer), got {k!r}")
        _check_num_classes(self.num_classes)

    def _assign(self, labels: np.ndarray) -> np.ndarray:
        labels = _as_labels(labels, "pathological")
        num_classes = _class_count(labels, self.num_classes, "pathological")
        k, n = int(self.classes_per_envoy), self.n_envoys
        if k > num_classes or n * k < num_classes:
            raise ValueError(f"pathological needs classes_per_envoy from 1 to {num_classes} with n_envoys x "
                             f"classes_per_envoy >= {num_classes} so every class is held, got "
                             f"classes_per_envoy={k} for {n} envoys: change classes_per_envoy or n_envoys")
        holder = np.repeat(np.arange(n, dtype=np.int64), k)
        held = (holder * k + np.tile(np.arange(k), n)) % num_classes
        holders = _by_class(held, num_classes, holder)  # per class, its envoys in ascending order
        owner = np.empty(len(labels), np.int64)
        for c, members in enumerate(_by_class(labels, num_classes)):
            members = np.random.default_rng([self.seed, n, c]).permutation(members)
            owner[members] = _runs(holders[c], _even_sizes(len(members), len(holders[c])))
        return owner


@dataclass(frozen=True)
class LogNormal(Partitioner):
    """Unequal sizes: envoy sizes proportional to w ~ LogNormal(0, sigma), at least one sample each.

    The samples are shuffled with the seed, so labels play no part. sigma = 0 gives equal sizes (up to one).
    """

    n_envoys: int
    sigma: float
    seed: int = 0
    allow_empty: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        _check_envoys(self.n_envoys)
        _check_seed(self.seed)
        if not (_is_number(self.sigma) and 0 <= self.sigma < math.inf):
            raise ValueError(f"lognormal needs sigma >= 0 (finite), got {self.sigma!r}: 0 gives equal sizes, "
                             "1 to 2 strongly unequal ones")

    def _assign(self, labels: np.ndarray) -> np.ndarray:
        n, envoys = len(labels), self.n_envoys
        if n < envoys:
            raise ValueError(f"lognormal needs at least one sample per envoy: {n} samples for {envoys} envoys; "
                             "use fewer envoys")
        rng = np.random.default_rng([self.seed, envoys])
        weights = rng.lognormal(0.0, self.sigma, envoys)
        sizes = 1 + np.floor(weights / weights.sum() * (n - envoys)).astype(np.int64)
        sizes[np.argsort(-weights, kind="stable")[: n - sizes.sum()]] += 1  # hand out what flooring left
        owner = np.empty(n, np.int64)
        owner[rng.permutation(n)] = _runs(np.arange(envoys), sizes)
        return owner


@dataclass(frozen=True, eq=False)
class Natural(Partitioner):
    """One envoy per distinct owner id (a column of the data set), envoys in sorted id order.

    `ids[i]` is sample i's owner; `names[e]` is envoy e's id. Calling it checks that the labels have one
    entry per id. Never leaves an envoy empty.
    """

    ids: Any = field(repr=False)
    n_envoys: int = field(init=False)
    names: np.ndarray = field(init=False, repr=False)
    _owner: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ids = np.array(self.ids)  # a copy, made read-only below: the caller's array stays writable
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError(f"natural needs ids as a non-empty 1-D array (one owner id per sample), got shape "
                             f"{ids.shape}")
        names, owner = np.unique(ids, return_inverse=True)
        for name, value in (("ids", ids), ("names", names), ("_owner", owner.reshape(-1).astype(np.int64))):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "n_envoys", len(names))

    def _assign(self, labels: np.ndarray) -> np.ndarray:
        if len(labels) != len(self._owner):
            raise ValueError(f"natural was built from {len(self._owner)} ids but called on {len(labels)} labels: "
                             "pass one id per sample, in the labels' order")
        return self._owner


# The names the docs use: partition.dirichlet(n_envoys, alpha, seed=0) and so on.
contiguous, iid, dirichlet, pathological, lognormal, natural = Contiguous, IID, Dirichlet, Pathological, LogNormal, \
    Natural


def label_counts(parts: Sequence[np.ndarray], labels: Any, num_classes: int | None = None) -> np.ndarray:
    """Samples of each class per envoy: an int64 array [len(parts), num_classes] (default max(label) + 1)."""
    labels = _as_labels(_as_1d(labels, "label_counts"), "label_counts")
    num_classes = _class_count(labels, num_classes, "label_counts")
    sizes = [len(p) for p in parts]
    index = np.concatenate([np.asarray(p, np.int64) for p in parts]) if parts else np.empty(0, np.int64)
    cell = np.repeat(np.arange(len(parts), dtype=np.int64), sizes) * num_classes + labels[index]
    return np.bincount(cell, minlength=len(parts) * num_classes).reshape(len(parts), num_classes)


def plot_label_counts(parts: Sequence[np.ndarray], labels: Any, ax: Any = None, *, num_classes: int | None = None,
                      class_names: Sequence[str] | None = None, envoy_names: Sequence[Any] | None = None,
                      title: str | None = None) -> Any:
    """A stacked bar chart of `label_counts`: one bar per envoy, one colour per class; returns the Axes.

    Without `ax` it draws on a new pyplot figure. For thousands of envoys, plot a slice (`parts[:50]`).
    """
    counts = label_counts(parts, labels, num_classes)
    import matplotlib
    import matplotlib.ticker

    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(min(max(6.0, 0.3 * len(parts)), 30.0), 4.0))
    n_envoys, n_classes = counts.shape
    cmap = matplotlib.colormaps["tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "viridis"]
    x, bottom = np.arange(n_envoys), np.zeros(n_envoys, np.int64)
    for c in range(n_classes):
        color = cmap(c) if n_classes <= 20 else cmap(c / max(n_classes - 1, 1))
        name = str(class_names[c]) if class_names is not None else str(c)
        ax.bar(x, counts[:, c], bottom=bottom, width=0.8, color=color, label=name)
        bottom += counts[:, c]
    if envoy_names is not None:
        ax.set_xticks(x, [str(name) for name in envoy_names], rotation=90 if n_envoys > 10 else 0)
    else:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("envoy")
    ax.set_ylabel("samples")
    ax.set_title(title if title is not None else f"Label counts of {n_envoys} envoys")
    if n_classes <= 20:
        ax.legend(title="class", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


# --------------------------------------------------------------------------- helpers


def _runs(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """values[0] sizes[0] times, then values[1] sizes[1] times, ... (int64)."""
    return np.repeat(np.asarray(values, np.int64), sizes)


def _even_sizes(total: int, parts: int) -> np.ndarray:
    """Part sizes of numpy.array_split(range(total), parts): the first total % parts get one more."""
    base, extra = divmod(total, parts)
    sizes = np.full(parts, base, np.int64)
    sizes[:extra] += 1
    return sizes


def _by_class(labels: np.ndarray, num_classes: int, values: np.ndarray | None = None) -> list[np.ndarray]:
    """Per class c, values[labels == c] in order (default values: the indices, as np.flatnonzero gives)."""
    order = np.argsort(labels, kind="stable")
    grouped = order if values is None else values[order]
    return np.split(grouped, np.cumsum(np.bincount(labels, minlength=num_classes))[:-1])


def _as_1d(labels: Any, who: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{who} needs labels as a 1-D array (one entry per sample), got shape {array.shape}")
    return array


def _as_labels(labels: np.ndarray, who: str) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{who} needs integer class labels (0, 1, ...), got dtype {labels.dtype}: "
                         "convert them, e.g. np.unique(labels, return_inverse=True)[1]")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{who} needs class labels >= 0, got {labels.min()}")
    return labels.astype(np.int64, copy=False)


def _class_count(labels: np.ndarray, num_classes: int | None, who: str) -> int:
    seen = int(labels.max()) + 1 if len(labels) else 0
    if num_classes is None:
        return max(seen, 1)
    if seen > num_classes:
        raise ValueError(f"{who}: labels go up to {seen - 1} but num_classes is {num_classes}: "
                         "raise num_classes or leave it None")
    return int(num_classes)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_envoys(n_envoys: Any) -> None:
    if not (_is_int(n_envoys) and n_envoys >= 1):
        raise ValueError(f"n_envoys must be an integer >= 1, got {n_envoys!r}")


def _check_seed(seed: Any) -> None:
    if not (_is_int(seed) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _check_num_classes(num_classes: Any) -> None:
    if num_classes is not None and not (_is_int(num_classes) and num_classes >= 1):
        raise ValueError(f"num_classes must be an integer >= 1 or None (max label + 1), got {num_classes!r}")
