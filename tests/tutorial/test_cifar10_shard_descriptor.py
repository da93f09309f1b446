"""Tests for the tutorial's CIFAR-10 shard descriptor (envoy/cifar10_shard_descriptor.py).

They read the real CIFAR-10 subset in ../shared/data/cifar10-subset (beside the repo)
and small files written here, decoding the binary format independently to compare.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

import cifar10_shard_descriptor as cifar_module
from cifar10_shard_descriptor import PARTITIONS, CIFAR10ShardDescriptor, partition_indices
from fedjax_core.shard_descriptor import ShardDescriptor, load_shard_descriptor

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBSET_DIR = (REPO_ROOT / ".." / "shared" / "data" / "cifar10-subset").resolve()
BATCHES_DIR = SUBSET_DIR / "cifar-10-batches-bin"
TRAIN_FILES = [BATCHES_DIR / f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = BATCHES_DIR / "test_batch.bin"
RECORD = 3073


# --- an independent decoder and writer of the CIFAR-10 binary format ---------------


def reference_decode(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Decode files into (uint8 images (n, 32, 32, 3), labels (n,)) by slicing colour planes."""
    data = b"".join(path.read_bytes() for path in paths)
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    red = records[:, 1:1025].reshape(-1, 32, 32)
    green = records[:, 1025:2049].reshape(-1, 32, 32)
    blue = records[:, 2049:3073].reshape(-1, 32, 32)
    return np.stack([red, green, blue], axis=-1), records[:, 0].astype(np.int64)


def pixel_value(record: int, row: int, col: int, channel: int) -> int:
    """A known, position-dependent byte for hand-built records."""
    return (record * 97 + row * 7 + col * 3 + channel * 50) % 256


def write_records(path: Path, labels: list[int], first_record: int = 0) -> None:
    """Write CIFAR-10 records byte by byte: label, then the R, G and B planes row-major."""
    out = bytearray()
    for offset, label in enumerate(labels):
        record = first_record + offset
        out.append(label)
        for channel in range(3):
            for row in range(32):
                for col in range(32):
                    out.append(pixel_value(record, row, col, channel))
    path.write_bytes(bytes(out))


@pytest.fixture(scope="module")
def full_train():
    return reference_decode(TRAIN_FILES)


@pytest.fixture(scope="module")
def full_valid():
    return reference_decode([TEST_FILE])


def expected_sizes(total: int, world_size: int) -> list[int]:
    return [len(part) for part in np.array_split(np.arange(total), world_size)]


# --- the real subset ----------------------------------------------------------------


def test_subset_is_present():
    assert all(path.is_file() for path in TRAIN_FILES + [TEST_FILE]), SUBSET_DIR


def test_two_shard_sizes(full_train, full_valid):
    n_train, n_valid = len(full_train[1]), len(full_valid[1])
    assert (n_train, n_valid) == (5170, 1017)

    sizes = [CIFAR10ShardDescriptor(f"{r}, 2", str(BATCHES_DIR)).split_sizes() for r in (1, 2)]

    assert [s["train"] for s in sizes] == expected_sizes(n_train, 2) == [2585, 2585]
    assert [s["valid"] for s in sizes] == expected_sizes(n_valid, 2) == [509, 508]


def test_three_shard_sizes(full_train, full_valid):
    descriptors = [CIFAR10ShardDescriptor(f"{r},3", str(BATCHES_DIR)) for r in (1, 2, 3)]
    train = [d.split_sizes()["train"] for d in descriptors]
    valid = [d.split_sizes()["valid"] for d in descriptors]
    assert train == expected_sizes(len(full_train[1]), 3) == [1724, 1723, 1723]
    assert valid == expected_sizes(len(full_valid[1]), 3) == [339, 339, 339]
    # get_split agrees with split_sizes.
    assert [len(d.get_split("valid")["label"]) for d in descriptors] == valid


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_together_equal_the_full_splits(world_size, full_train, full_valid):
    descriptors = [
        CIFAR10ShardDescriptor(f"{r}, {world_size}", str(BATCHES_DIR))
        for r in range(1, world_size + 1)
    ]
    for split, (ref_pixels, ref_labels) in (("train", full_train), ("valid", full_valid)):
        shards = [d.get_split(split) for d in descriptors]
        images = np.concatenate([s["image"] for s in shards])
        labels = np.concatenate([s["label"] for s in shards])

        np.testing.assert_array_equal(labels, ref_labels)
        np.testing.assert_array_equal(np.rint(images * 255).astype(np.uint8), ref_pixels)
        np.testing.assert_array_equal(images, ref_pixels.astype(np.float32) / np.float32(255))
        # Each shard is the matching contiguous numpy.array_split slice.
        for shard, expected in zip(shards, np.array_split(ref_labels, world_size)):
            np.testing.assert_array_equal(shard["label"], expected)


def test_split_contents_dtypes_and_shapes():
    descriptor = CIFAR10ShardDescriptor("2, 2", str(BATCHES_DIR))
    for name in ("train", "valid", "val"):
        split = descriptor.get_split(name)
        assert set(split) == {"image", "label"}
        assert split["image"].dtype == np.float32 and split["label"].dtype == np.int32
        assert split["image"].shape[1:] == (32, 32, 3)
        assert split["image"].flags.c_contiguous
        assert 0.0 <= split["image"].min() and split["image"].max() <= 1.0
        assert split["label"].min() >= 0 and split["label"].max() <= 9
    # All ten classes appear in a shard of real data.
    assert len(np.unique(descriptor.get_split("train")["label"])) == 10


def test_describing_properties_and_dataset():
    descriptor = CIFAR10ShardDescriptor("1, 2", str(BATCHES_DIR))
    assert isinstance(descriptor, ShardDescriptor)
    assert descriptor.sample_shape == ["32", "32", "3"]
    assert descriptor.target_shape == ["1"]
    assert descriptor.dataset_description == (
        f"CIFAR-10 shard 1 of 2 (2585 train / 509 valid) from {BATCHES_DIR}"
    )

    dataset = descriptor.get_dataset("valid")
    assert len(dataset) == 509
    sample, target = dataset[0]
    assert sample.shape == (32, 32, 3) and sample.dtype == np.float32
    assert target.shape == (1,) and target.dtype == np.int32
    assert int(target[0]) == int(descriptor.get_split("valid")["label"][0])


def test_parent_folder_as_data_dir():
    from_parent = CIFAR10ShardDescriptor("1, 2", str(SUBSET_DIR))
    from_batches = CIFAR10ShardDescriptor("1, 2", str(BATCHES_DIR))
    assert from_parent.data_dir == from_batches.data_dir == BATCHES_DIR
    assert from_parent.split_sizes() == from_batches.split_sizes()


def test_relative_data_dir_resolves_against_base_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the cwd must not matter when base_dir is given
    descriptor = CIFAR10ShardDescriptor(
        "1, 2", data_dir="cifar10-subset", base_dir=str(SUBSET_DIR.parent)
    )
    assert descriptor.data_dir == BATCHES_DIR
    assert descriptor.split_sizes() == {"train": 2585, "valid": 509}


def test_relative_data_dir_without_base_dir_uses_cwd(monkeypatch):
    monkeypatch.chdir(SUBSET_DIR.parent)
    descriptor = CIFAR10ShardDescriptor("1, 1", data_dir="cifar10-subset")
    assert descriptor.data_dir == BATCHES_DIR


def test_loaded_from_envoy_config_with_relative_path():
    """As the envoy does it: template + params, base_dir = the config's folder (envoy/)."""
    envoy_dir = REPO_ROOT / "envoy"
    relative = Path("..") / ".." / "shared" / "data" / "cifar10-subset"
    descriptor = load_shard_descriptor(
        "cifar10_shard_descriptor.CIFAR10ShardDescriptor",
        {"rank_worldsize": "2, 2", "data_dir": str(relative)},
        envoy_dir,
    )
    assert descriptor.data_dir == BATCHES_DIR
    assert descriptor.split_sizes() == {"train": 2585, "valid": 508}


# --- decoding hand-built records ------------------------------------------------------


def test_decodes_hand_built_records(tmp_path):
    write_records(tmp_path / "data_batch_1.bin", labels=[3, 9])
    write_records(tmp_path / "test_batch.bin", labels=[7], first_record=5)

    descriptor = CIFAR10ShardDescriptor("1, 1", str(tmp_path))
    train = descriptor.get_split("train")
    image, label = train["image"], train["label"]

    assert image.shape == (2, 32, 32, 3) and image.dtype == np.float32
    assert label.dtype == np.int32 and label.tolist() == [3, 9]
    # Spot checks: image[record, row, col, channel] is byte / 255.
    assert image[0, 0, 0, 0] == np.float32(0) / np.float32(255)  # R of (0, 0): 0
    assert image[0, 0, 0, 1] == np.float32(50) / np.float32(255)  # G of (0, 0): 50
    assert image[0, 0, 0, 2] == np.float32(100) / np.float32(255)  # B of (0, 0): 100
    assert image[0, 1, 0, 0] == np.float32(7) / np.float32(255)  # next row: +7
    assert image[0, 0, 1, 0] == np.float32(3) / np.float32(255)  # next column: +3
    assert image[1, 31, 31, 2] == np.float32((97 + 217 + 93 + 100) % 256) / np.float32(255)
    # Every pixel of both records.
    for record in range(2):
        for row in range(32):
            for col in range(32):
                for channel in range(3):
                    expected = np.float32(pixel_value(record, row, col, channel)) / np.float32(255)
                    assert image[record, row, col, channel] == expected

    valid = descriptor.get_split("val")
    assert valid["label"].tolist() == [7]
    assert valid["image"][0, 2, 4, 1] == np.float32(pixel_value(5, 2, 4, 1)) / np.float32(255)


def test_shards_span_files_and_missing_batches_are_skipped(tmp_path):
    # Records are labelled by their index; data_batch_2 is absent on purpose.
    write_records(tmp_path / "data_batch_1.bin", labels=[0, 1, 2])
    write_records(tmp_path / "data_batch_3.bin", labels=[3, 4], first_record=3)
    write_records(tmp_path / "test_batch.bin", labels=[0])

    first = CIFAR10ShardDescriptor("1, 2", str(tmp_path)).get_split("train")
    second = CIFAR10ShardDescriptor("2, 2", str(tmp_path)).get_split("train")
    assert first["label"].tolist() == [0, 1, 2]
    assert second["label"].tolist() == [3, 4]
    expected = np.float32(pixel_value(3, 0, 0, 0)) / np.float32(255)
    assert second["image"][0, 0, 0, 0] == expected


# --- reading only what is needed --------------------------------------------------------


def _forbid_pixel_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pixel data was read")

    monkeypatch.setattr(np, "fromfile", refuse)
    monkeypatch.setattr(np, "memmap", refuse)


def test_split_sizes_reads_no_pixels(monkeypatch):
    _forbid_pixel_reads(monkeypatch)
    descriptor = CIFAR10ShardDescriptor("1, 2", str(BATCHES_DIR))
    assert descriptor.split_sizes() == {"train": 2585, "valid": 509}
    assert "2585 train" in descriptor.dataset_description
    with pytest.raises(AssertionError, match="pixel data was read"):
        descriptor.get_split("train")  # shows the guard really blocks reads


def test_split_sizes_from_file_sizes_only(tmp_path):
    # Zero-filled files of the right size: the counts come from sizes alone.
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(RECORD * 7))
    (tmp_path / "test_batch.bin").write_bytes(bytes(RECORD * 4))
    sizes = [CIFAR10ShardDescriptor(f"{r}, 3", str(tmp_path)).split_sizes() for r in (1, 2, 3)]
    assert [s["train"] for s in sizes] == [3, 2, 2]
    assert [s["valid"] for s in sizes] == [2, 1, 1]


def test_reads_only_the_shard_and_caches_it(monkeypatch):
    real_fromfile = np.fromfile
    bytes_read = []

    def counting_fromfile(*args, **kwargs):
        data = real_fromfile(*args, **kwargs)
        bytes_read.append(data.size)
        return data

    monkeypatch.setattr(np, "fromfile", counting_fromfile)
    descriptor = CIFAR10ShardDescriptor("2, 3", str(BATCHES_DIR))
    first = descriptor.get_split("train")
    assert sum(bytes_read) == 1723 * RECORD

    _forbid_pixel_reads(monkeypatch)
    again = descriptor.get_split("train")  # served from the cache
    assert again["image"] is first["image"]


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        ("1", r"rank_worldsize must look like '1, 2' \(rank, world size\); got '1'"),
        ("a, b", r"must look like '1, 2'.*got 'a, b'"),
        ("0, 2", r"'0, 2': rank must be between 1 and 2.*got 0"),
        ("3, 2", r"'3, 2': rank must be between 1 and 2.*got 3"),
        ("1, 0", r"'1, 0': world size must be at least 1; got 0"),
        ([1, 2, 3], r"must look like '1, 2'"),
        (12, r"must look like '1, 2'"),
    ],
)
def test_bad_rank_worldsize(value, message):
    with pytest.raises(ValueError, match=message):
        CIFAR10ShardDescriptor(value, str(BATCHES_DIR))


@pytest.mark.parametrize("value", ["1, 2", "1,2", " 1 ,2 ", [1, 2], (1, 2)])
def test_rank_worldsize_forms(value):
    descriptor = CIFAR10ShardDescriptor(value, str(BATCHES_DIR))
    assert (descriptor.rank, descriptor.world_size) == (1, 2)


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10ShardDescriptor("1, 2", str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "shard_descriptor.params.data_dir" in message
    assert "download: true" in message


def test_missing_relative_data_dir_names_resolved_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "data" / "cifar"))):
        CIFAR10ShardDescriptor("1, 2", "data/cifar", base_dir=str(tmp_path))


def test_no_data_dir_and_no_download():
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 data_dir given"):
        CIFAR10ShardDescriptor("1, 2")


def test_folder_without_bin_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 .bin files"):
        CIFAR10ShardDescriptor("1, 1", str(tmp_path))


def test_missing_test_batch(tmp_path):
    write_records(tmp_path / "data_batch_1.bin", labels=[1])
    with pytest.raises(FileNotFoundError, match="test_batch.bin"):
        CIFAR10ShardDescriptor("1, 1", str(tmp_path))


def test_missing_training_batches(tmp_path):
    write_records(tmp_path / "test_batch.bin", labels=[1])
    with pytest.raises(FileNotFoundError, match="data_batch_1.bin"):
        CIFAR10ShardDescriptor("1, 1", str(tmp_path))


def test_truncated_file(tmp_path):
    write_records(tmp_path / "data_batch_1.bin", labels=[1, 2])
    truncated = tmp_path / "data_batch_2.bin"
    truncated.write_bytes(bytes(RECORD * 2 + 100))
    write_records(tmp_path / "test_batch.bin", labels=[1])
    with pytest.raises(ValueError) as info:
        CIFAR10ShardDescriptor("1, 1", str(tmp_path))
    message = str(info.value)
    assert str(truncated) in message
    assert str(RECORD * 2 + 100) in message
    assert "3073" in message


def test_unknown_split_name():
    descriptor = CIFAR10ShardDescriptor("1, 2", str(BATCHES_DIR))
    with pytest.raises(ValueError, match="'train' and 'valid'"):
        descriptor.get_split("test")


def test_download_without_tensorflow_datasets(monkeypatch, tmp_path):
    # A None entry in sys.modules makes `import` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    descriptor = CIFAR10ShardDescriptor("1, 2", str(tmp_path / "absent"), download=True)
    assert "tensorflow-datasets" in descriptor.dataset_description
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        descriptor.get_split("train")


def test_local_data_wins_over_download(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    descriptor = CIFAR10ShardDescriptor("1, 2", str(BATCHES_DIR), download=True)
    assert descriptor.split_sizes() == {"train": 2585, "valid": 509}
    assert descriptor.data_dir == BATCHES_DIR


def test_shard_bounds_match_array_split():
    for total in (0, 1, 5, 1017, 5170):
        for world_size in (1, 2, 3, 7):
            parts = np.array_split(np.arange(total), world_size)
            for rank in range(1, world_size + 1):
                start, stop = cifar_module.shard_bounds(total, rank, world_size)
                np.testing.assert_array_equal(np.arange(start, stop), parts[rank - 1])


# --------------------------------------------------------------------------- partitions

PARTITION_ARGS = {"contiguous": {}, "dirichlet": {"alpha": 0.3}, "unbalanced": {"sigma": 1.0},
                  "labels": {"labels_per_shard": 3}}


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("world_size", [1, 2, 4, 7])
def test_partitions_are_disjoint_cover_the_split_and_repeat_for_a_seed(partition, world_size):
    labels = np.random.default_rng(0).integers(0, 10, 1017).astype(np.int32)
    args = PARTITION_ARGS[partition]
    if partition == "labels" and world_size * 3 < 10:
        with pytest.raises(ValueError, match="every class is held"):
            partition_indices(labels, 1, world_size, partition, **args)
        return
    shards = [partition_indices(labels, r, world_size, partition, seed=5, **args) for r in range(1, world_size + 1)]
    together = np.concatenate(shards)
    assert len(together) == len(labels) and set(together.tolist()) == set(range(len(labels)))  # disjoint, covering
    again = [partition_indices(labels, r, world_size, partition, seed=5, **args) for r in range(1, world_size + 1)]
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    if partition != "contiguous" and world_size > 1:
        other = [partition_indices(labels, r, world_size, partition, seed=6, **args) for r in range(1, world_size + 1)]
        assert not all(np.array_equal(a, b) for a, b in zip(shards, other))  # the seed matters


def _skew(labels, shards):
    """Mean total-variation distance between each shard's label distribution and the split's."""
    overall = np.bincount(labels, minlength=10) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[s], minlength=10) / max(len(s), 1) - overall).sum()
                    for s in shards])


def test_dirichlet_alpha_controls_the_label_skew():
    labels = np.random.default_rng(1).integers(0, 10, 5000).astype(np.int32)
    skew = {alpha: _skew(labels, [partition_indices(labels, r, 4, "dirichlet", alpha=alpha) for r in range(1, 5)])
            for alpha in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0] and skew[100.0] < 0.05 and skew[0.1] > 0.4


def test_labels_partition_gives_each_shard_its_classes_and_unbalanced_varies_sizes():
    labels = np.random.default_rng(2).integers(0, 10, 2000).astype(np.int32)
    held = [set(labels[partition_indices(labels, r, 5, "labels", labels_per_shard=2)].tolist()) for r in range(1, 6)]
    assert held == [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}]
    sizes = [len(partition_indices(labels, r, 4, "unbalanced", sigma=1.5)) for r in range(1, 5)]
    assert min(sizes) >= 1 and max(sizes) > 2 * min(sizes)
    assert [len(partition_indices(labels, r, 4, "unbalanced", sigma=0.0)) for r in range(1, 5)] == [500] * 4


def test_a_dirichlet_shard_of_the_subset_reads_its_records_and_counts_its_labels():
    shards = [CIFAR10ShardDescriptor(f"{r}, 3", str(SUBSET_DIR), partition="dirichlet", alpha=0.5, seed=3)
              for r in (1, 2, 3)]
    train = [s.get_split("train") for s in shards]
    assert sum(len(t["label"]) for t in train) == 5170
    for s, t in zip(shards, train):
        assert s.label_counts() == np.bincount(t["label"], minlength=10).tolist()
        assert s.split_sizes()["train"] == len(t["label"])
        assert "dirichlet, alpha=0.5, seed=3" in s.dataset_description
    # the records are the right ones: each shard's images are rows of the full split, in order
    full = CIFAR10ShardDescriptor("1, 1", str(SUBSET_DIR)).get_split("train")
    idx = partition_indices(full["label"], 2, 3, "dirichlet", alpha=0.5, seed=3)
    np.testing.assert_array_equal(train[1]["image"], full["image"][idx])
    np.testing.assert_array_equal(train[1]["label"], full["label"][idx])


def test_bad_partition_settings_are_named():
    with pytest.raises(ValueError, match="partition 'iid' is not one of contiguous, dirichlet"):
        CIFAR10ShardDescriptor("1, 2", str(SUBSET_DIR), partition="iid")
    with pytest.raises(ValueError, match="alpha > 0"):
        CIFAR10ShardDescriptor("1, 2", str(SUBSET_DIR), partition="dirichlet", alpha=0).split_sizes()
