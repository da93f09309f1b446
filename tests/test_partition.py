"""Tests for fedjax_core.partition: coverage, no duplicates, determinism, label and size behaviour, errors, plots."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedjax_core import partition

LABELS = np.random.default_rng(0).integers(0, 10, 3001).astype(np.int32)
IDS = np.random.default_rng(1).integers(100, 140, len(LABELS))

SEEDED = {
    "iid": lambda n, seed: partition.iid(n, seed=seed),
    "dirichlet": lambda n, seed: partition.dirichlet(n, alpha=0.5, seed=seed),
    "pathological": lambda n, seed: partition.pathological(n, max(3, -(-10 // n)), seed=seed),  # every class held
    "lognormal": lambda n, seed: partition.lognormal(n, 1.0, seed=seed),
}
ALL = {**SEEDED, "contiguous": lambda n, seed: partition.contiguous(n)}


def _check_partition(parts, n_samples, n_envoys):
    """Disjoint, covering, sorted int64 arrays, one per envoy."""
    assert len(parts) == n_envoys
    assert all(p.dtype == np.int64 and p.ndim == 1 and np.all(np.diff(p) > 0) for p in parts)
    together = np.concatenate(parts)
    assert len(together) == n_samples  # nothing repeated or dropped ...
    np.testing.assert_array_equal(np.sort(together), np.arange(n_samples))  # ... and everything covered


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("n_envoys", [1, 4, 7, 30])
def test_every_partitioner_covers_every_sample_once(name, n_envoys):
    p = ALL[name](n_envoys, 0)
    assert p.n_envoys == n_envoys
    _check_partition(p(LABELS), len(LABELS), n_envoys)


def test_natural_covers_every_sample_once_and_groups_by_id():
    p = partition.natural(IDS)
    parts = p(LABELS)
    _check_partition(parts, len(LABELS), p.n_envoys)
    np.testing.assert_array_equal(p.names, np.unique(IDS))
    assert p.n_envoys == len(np.unique(IDS))
    for name, part in zip(p.names, parts):
        np.testing.assert_array_equal(part, np.flatnonzero(IDS == name))
    words = partition.natural(np.array(["b", "a", "b", "c"]))
    assert list(words.names) == ["a", "b", "c"]
    assert [part.tolist() for part in words(np.zeros(4, int))] == [[1], [0, 2], [3]]


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_same_seed_same_parts_other_seed_other_parts(name):
    first, again, other = SEEDED[name](6, 4)(LABELS), SEEDED[name](6, 4)(LABELS), SEEDED[name](6, 5)(LABELS)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_partitioners_are_frozen_values():
    p = partition.dirichlet(5, 0.3, seed=1)
    assert p == partition.Dirichlet(n_envoys=5, alpha=0.3, seed=1) and hash(p) == hash(partition.dirichlet(5, 0.3, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.alpha = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        partition.natural(IDS).n_envoys = 3


def test_contiguous_is_array_split_and_iid_sizes_differ_by_at_most_one():
    for n_envoys in (1, 3, 7, 3001):
        expected = np.array_split(np.arange(len(LABELS)), n_envoys)
        assert all(np.array_equal(a, b) for a, b in zip(partition.contiguous(n_envoys)(LABELS), expected))
        sizes = [len(p) for p in partition.iid(n_envoys, seed=2)(LABELS)]
        assert max(sizes) - min(sizes) <= 1
    shuffled = partition.iid(3, seed=0)(LABELS)[0]
    assert not np.array_equal(shuffled, np.arange(len(shuffled)))  # a shuffle, not consecutive runs


def test_lognormal_sizes_spread_with_sigma():
    spread = {sigma: np.std([len(p) for p in partition.lognormal(50, sigma, seed=3)(LABELS)])
              for sigma in (0.0, 0.5, 2.0)}
    assert spread[0.0] < 1 and spread[0.0] < spread[0.5] < spread[2.0]
    assert min(len(p) for p in partition.lognormal(50, 3.0, seed=3)(LABELS)) >= 1  # never empty


def _classes_per_envoy(parts, labels):
    return (partition.label_counts(parts, labels) > 0).sum(axis=1)


def test_dirichlet_small_alpha_gives_few_classes_large_alpha_near_all():
    labels = np.random.default_rng(3).integers(0, 10, 20_000)
    few = _classes_per_envoy(partition.dirichlet(20, 0.05, seed=0, allow_empty=True)(labels), labels)
    many = _classes_per_envoy(partition.dirichlet(20, 100.0, seed=0)(labels), labels)
    assert few.mean() < 4 and many.mean() == 10


def test_pathological_gives_exactly_k_classes_per_envoy():
    for n_envoys, k in [(5, 2), (7, 3), (10, 1), (4, 10), (30, 2)]:
        parts = partition.pathological(n_envoys, k, seed=1)(LABELS)
        assert _classes_per_envoy(parts, LABELS).tolist() == [k] * n_envoys
    held = [set(LABELS[p].tolist()) for p in partition.pathological(5, 2)(LABELS)]
    assert held == [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}]


def test_label_counts_counts_each_class_per_envoy():
    parts = partition.dirichlet(6, 0.5, seed=0)(LABELS)
    counts = partition.label_counts(parts, LABELS)
    assert counts.shape == (6, 10)
    assert counts.tolist() == [np.bincount(LABELS[p], minlength=10).tolist() for p in parts]
    assert partition.label_counts(parts, LABELS, num_classes=12).shape == (6, 12)


def test_an_empty_envoy_is_an_error_unless_allowed():
    with pytest.raises(ValueError, match=r"Dirichlet: \d+ of 200 envoys got no samples .*larger alpha.*allow_empty"):
        partition.dirichlet(200, 0.01, seed=0)(LABELS[:300])
    parts = partition.dirichlet(200, 0.01, seed=0, allow_empty=True)(LABELS[:300])
    _check_partition(parts, 300, 200)
    assert any(len(p) == 0 for p in parts)
    with pytest.raises(ValueError, match="3 of 10 envoys got no samples"):
        partition.iid(10, seed=0)(LABELS[:7])
    with pytest.raises(ValueError, match="envoys got no samples"):
        partition.contiguous(4)(LABELS[:2])
    assert [len(p) for p in partition.contiguous(4, allow_empty=True)(LABELS[:2])] == [1, 1, 0, 0]
    rare = np.array([0] * 50 + [1] * 2)  # class 1 has fewer samples than holders
    with pytest.raises(ValueError, match="classes_per_envoy"):
        partition.pathological(8, 1, seed=0)(rare)


BAD = [
    (lambda: partition.iid(0), "n_envoys must be an integer >= 1"),
    (lambda: partition.contiguous(2.5), "n_envoys must be an integer >= 1"),
    (lambda: partition.iid(3, seed=-1), "seed must be an integer >= 0"),
    (lambda: partition.dirichlet(3, alpha=0), "alpha > 0"),
    (lambda: partition.dirichlet(3, alpha=float("nan")), "alpha > 0"),
    (lambda: partition.dirichlet(3, 0.5, num_classes=0), "num_classes must be"),
    (lambda: partition.lognormal(3, sigma=-1.0), "sigma >= 0"),
    (lambda: partition.pathological(3, 0), "classes_per_envoy >= 1"),
    (lambda: partition.pathological(3, 11)(LABELS), "classes_per_envoy from 1 to 10"),
    (lambda: partition.pathological(3, 2)(LABELS), "every class is held"),
    (lambda: partition.lognormal(10, 1.0)(LABELS[:5]), "at least one sample per envoy: 5 samples for 10 envoys"),
    (lambda: partition.dirichlet(3, 0.5)(LABELS.astype(float)), "integer class labels"),
    (lambda: partition.dirichlet(3, 0.5)(LABELS.reshape(-1, 1)), "1-D array"),
    (lambda: partition.pathological(3, 4)(LABELS - 1), "labels >= 0"),
    (lambda: partition.dirichlet(3, 0.5, num_classes=5)(LABELS), "labels go up to 9 but num_classes is 5"),
    (lambda: partition.natural([]), "non-empty 1-D array"),
    (lambda: partition.natural(IDS)(LABELS[:10]), "built from 3001 ids but called on 10 labels"),
    (lambda: partition.label_counts([np.arange(3)], np.array([[0, 1, 2]])), "1-D array"),
]


@pytest.mark.parametrize("call, match", BAD)
def test_bad_input_is_a_value_error_naming_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_ten_thousand_envoys_over_two_hundred_thousand_labels():
    labels = np.random.default_rng(4).integers(0, 10, 200_000)
    parts = partition.dirichlet(10_000, 0.3, seed=0, allow_empty=True)(labels)
    _check_partition(parts, len(labels), 10_000)
    _check_partition(partition.iid(10_000, seed=0)(labels), len(labels), 10_000)
    assert partition.label_counts(parts, labels).sum() == len(labels)


def test_plot_label_counts_draws_one_stacked_bar_per_envoy():
    import matplotlib
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parts = partition.dirichlet(8, 0.5, seed=0)(LABELS)
    ax = Figure().add_subplot()
    FigureCanvasAgg(ax.figure)
    assert partition.plot_label_counts(parts, LABELS, ax, envoy_names=[f"e{i}" for i in range(8)]) is ax
    assert len(ax.containers) == 10 and all(len(bars) == 8 for bars in ax.containers)  # a bar per class per envoy
    tops = np.sum([[bar.get_height() for bar in bars] for bars in ax.containers], axis=0)
    assert tops.tolist() == [len(p) for p in parts]
    ax.figure.canvas.draw()

    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    plt.switch_backend("Agg")
    try:
        new = partition.plot_label_counts(parts[:3], LABELS, class_names=[f"c{i}" for i in range(10)])
        assert isinstance(new, Axes) and len(new.containers) == 10 and len(new.containers[0]) == 3
        plt.close(new.figure)
    finally:
        plt.switch_backend(backend)


# The descriptor's per-shard algorithm before it moved here (envoy/cifar10_shard_descriptor.py at 741cd05),
# kept verbatim (less its checks) to pin the module to the same indices.
def _reference_shard(labels, rank, world_size, name, alpha=0.5, sigma=1.0, k=2, seed=0, num_classes=10):
    n = len(labels)
    if name == "contiguous":
        return np.array_split(np.arange(n), world_size)[rank - 1]
    rng = np.random.default_rng([seed, world_size])
    parts = []
    if name == "dirichlet":
        proportions = rng.dirichlet([alpha] * world_size, size=num_classes)
        for c in range(num_classes):
            members = np.random.default_rng([seed, world_size, c]).permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(proportions[c])[:-1] * len(members)).astype(np.int64)
            parts.append(np.split(members, cuts)[rank - 1])
        return np.sort(np.concatenate(parts))
    if name == "unbalanced":
        weights = rng.lognormal(0.0, sigma, world_size)
        sizes = 1 + np.floor(weights / weights.sum() * (n - world_size)).astype(np.int64)
        sizes[np.argsort(-weights, kind="stable")[: n - sizes.sum()]] += 1
        order = rng.permutation(n)
        stop = np.cumsum(sizes)
        return np.sort(order[stop[rank - 1] - sizes[rank - 1]:stop[rank - 1]])
    holders = {c: [i for i in range(world_size) if c in {(i * k + j) % num_classes for j in range(k)}]
               for c in range(num_classes)}
    for c, holding in holders.items():
        if rank - 1 in holding:
            members = np.random.default_rng([seed, world_size, c]).permutation(np.flatnonzero(labels == c))
            parts.append(np.array_split(members, len(holding))[holding.index(rank - 1)])
    return np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)


@pytest.mark.parametrize("world_size", [1, 3, 8])
@pytest.mark.parametrize("seed", [0, 5])
def test_same_indices_as_the_cifar10_descriptor_had(world_size, seed):
    labels = LABELS.copy()
    labels[labels == 9] = 8  # a class without samples
    cases = [("contiguous", {}, partition.contiguous(world_size)),
             ("dirichlet", {"alpha": 0.3}, partition.dirichlet(world_size, 0.3, seed, 10, allow_empty=True)),
             ("dirichlet", {"alpha": 50.0}, partition.dirichlet(world_size, 50.0, seed, 10, allow_empty=True)),
             ("unbalanced", {"sigma": 1.5}, partition.lognormal(world_size, 1.5, seed))]
    if world_size * 2 >= 10:
        cases.append(("labels", {"k": 2}, partition.pathological(world_size, 2, seed, 10, allow_empty=True)))
    cases.append(("labels", {"k": 10}, partition.pathological(world_size, 10, seed, 10, allow_empty=True)))
    for name, args, p in cases:
        for rank, part in enumerate(p(labels), 1):
            np.testing.assert_array_equal(part, _reference_shard(labels, rank, world_size, name, seed=seed, **args))


def test_the_docs_example_runs(tmp_path):
    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "partition_example.py"
    result = subprocess.run([sys.executable, str(example)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "classes per envoy:" in result.stdout and (tmp_path / "label_counts.png").stat().st_size > 0


def test_natural_keeps_a_read_only_copy_of_the_ids():
    ids = IDS.copy()
    p = partition.natural(ids)
    ids[:] = 0  # the caller's array stays writable and changing it changes nothing
    assert p.n_envoys == len(np.unique(IDS)) and not p.ids.flags.writeable
    np.testing.assert_array_equal(p.ids, IDS)
