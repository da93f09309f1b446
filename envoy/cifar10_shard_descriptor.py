"""CIFAR-10 shard descriptor for the tutorial envoys.

Reads the standard CIFAR-10 binary layout (`cifar-10-batches-bin/data_batch_1.bin`
... `data_batch_5.bin` for training, `test_batch.bin` for validation). Each record is
3073 bytes: one label byte, then 1024 red, 1024 green and 1024 blue pixel bytes, each
plane a row-major 32x32 image. Record counts come from file sizes, so the full archive
(10,000 records per file) and smaller subsets are read the same way.

Shard r of w is, by default (`partition: contiguous`), `numpy.array_split(split, w)[r - 1]`
of each split: contiguous, near-equal, with no sample dropped. Non-IID and unbalanced
shards come from `fedjax_core.partition` (see `partition_indices`): `partition: dirichlet`
(label skew, `alpha`), `partition: unbalanced` (sizes from a log-normal, `sigma`) and
`partition: labels` (`labels_per_shard` classes each), all drawn from `seed`. Only the
shard's own records are decoded, and only on the first `get_split` call; `split_sizes()`
of a contiguous shard needs no pixel read at all (the other partitions read the label bytes).

Where there is a network, `download: true` (with no usable `data_dir`) loads the
data through tensorflow-datasets instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedjax_core import partition as fedjax_partition
from fedjax_core.shard_descriptor import SPLIT_NAMES, ShardDescriptor, normalize_split_name

RECORD_BYTES = 3073  # 1 label byte + 32 * 32 * 3 pixel bytes
IMAGE_SIDE = 32
BATCHES_DIR_NAME = "cifar-10-batches-bin"
TRAIN_FILE_NAMES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE_NAME = "test_batch.bin"

_RANK_WORLDSIZE_RE = re.compile(r"^\s*(-?\d+)\s*,\s*(-?\d+)\s*$")


def parse_rank_worldsize(value: str | Sequence[int]) -> tuple[int, int]:
    """Parse '1, 2' (or '1,2', or [1, 2] as YAML may give) into (rank, world_size).

    Ranks count from 1, so rank must lie in 1..world_size.
    """
    rank = world_size = None
    if isinstance(value, str):
        match = _RANK_WORLDSIZE_RE.match(value)
        if match:
            rank, world_size = int(match.group(1)), int(match.group(2))
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        rank, world_size = int(value[0]), int(value[1])
    if rank is None or world_size is None:
        raise ValueError(
            f"rank_worldsize must look like '1, 2' (rank, world size); got {value!r}"
        )
    if world_size < 1:
        raise ValueError(
            f"rank_worldsize {value!r}: world size must be at least 1; got {world_size}"
        )
    if not 1 <= rank <= world_size:
        raise ValueError(
            f"rank_worldsize {value!r}: rank must be between 1 and {world_size} "
            f"(ranks count from 1); got {rank}"
        )
    return rank, world_size


def shard_bounds(num_records: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return [start, stop) of shard `rank` of `world_size`, as numpy.array_split slices it.

    The first `num_records % world_size` shards get one extra record.
    """
    base, extra = divmod(num_records, world_size)
    index = rank - 1
    start = index * base + min(index, extra)
    stop = start + base + (1 if index < extra else 0)
    return start, stop


PARTITIONS = ("contiguous", "dirichlet", "unbalanced", "labels")
NUM_CLASSES = 10


def shard_partitioner(partition: str, world_size: int, *, alpha: float = 0.5, sigma: float = 1.0,
                      labels_per_shard: int = 2, seed: int = 0,
                      num_classes: int = NUM_CLASSES) -> fedjax_partition.Partitioner:
    """The `fedjax_core.partition` partitioner a `partition:` setting names, over `world_size` shards.

    Empty shards are allowed here: the descriptor refuses only a shard without training records.
    contiguous -> contiguous; dirichlet -> dirichlet(alpha); unbalanced -> lognormal(sigma);
    labels -> pathological(labels_per_shard).
    """
    if partition == "contiguous":
        return fedjax_partition.contiguous(world_size, allow_empty=True)
    if partition == "dirichlet":
        return fedjax_partition.dirichlet(world_size, alpha, seed, num_classes, allow_empty=True)
    if partition == "unbalanced":
        return fedjax_partition.lognormal(world_size, sigma, seed, allow_empty=True)
    if partition == "labels":
        return fedjax_partition.pathological(world_size, labels_per_shard, seed, num_classes, allow_empty=True)
    raise ValueError(f"partition {partition!r} is not one of {', '.join(PARTITIONS)}")


def partition_indices(labels: np.ndarray, rank: int, world_size: int, partition: str = "contiguous", *,
                      alpha: float = 0.5, sigma: float = 1.0, labels_per_shard: int = 2, seed: int = 0,
                      num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Sorted record indices of shard `rank` (1-based) of `world_size` of a split with these labels.

    The shards of one (partition, parameters, seed, world size) are disjoint and together cover
    the split. The draws depend on the seed and world size only, not on the split, so a
    shard's train and valid splits share their skew. The algorithms are `fedjax_core.partition`'s
    (see `shard_partitioner`); a bad setting's error names the module's parameter and this one's.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"partition {partition!r} is not one of {', '.join(PARTITIONS)}")
    setting = {"dirichlet": f"alpha={alpha!r}, ", "unbalanced": f"sigma={sigma!r}, ",
               "labels": f"labels_per_shard={labels_per_shard!r}, "}.get(partition, "")
    try:
        parts = shard_partitioner(partition, world_size, alpha=alpha, sigma=sigma, labels_per_shard=labels_per_shard,
                                  seed=seed, num_classes=num_classes)(labels)
    except ValueError as exc:
        raise ValueError(f"partition: {partition} ({setting}seed={seed!r}, world size {world_size}): {exc}") from exc
    return parts[rank - 1]


def count_records(path: Path) -> int:
    """Number of CIFAR-10 records in `path`, from its size alone; rejects truncated files."""
    size = path.stat().st_size
    if size % RECORD_BYTES:
        raise ValueError(
            f"CIFAR-10 file {path} is {size} bytes, not a multiple of the {RECORD_BYTES}-byte "
            "record size: it is truncated or not a CIFAR-10 binary file"
        )
    return size // RECORD_BYTES


def decode_records(records: np.ndarray) -> dict[str, np.ndarray]:
    """Decode (n, 3073) uint8 records into float32 NHWC images / 255 and int32 labels.

    Returns {'image': (n, 32, 32, 3) float32 in [0, 1], 'label': (n,) int32}.
    """
    labels = records[:, 0].astype(np.int32)
    planes = records[:, 1:].reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE)  # (n, channel, row, col)
    images = planes.transpose(0, 2, 3, 1).astype(np.float32, order="C")  # NHWC
    images /= 255.0
    return {"image": images, "label": labels}


def _resolve_dir(data_dir: str | os.PathLike, base_dir: str | os.PathLike | None) -> Path:
    """Resolve a relative `data_dir` against `base_dir` (the config's folder), else the cwd."""
    path = Path(data_dir).expanduser()
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else Path.cwd()) / path
    return path.resolve()


def _find_batches_dir(path: Path) -> Path | None:
    """Return the folder holding the .bin files: `path` itself or `path/cifar-10-batches-bin`."""
    names = (*TRAIN_FILE_NAMES, TEST_FILE_NAME)
    for candidate in (path, path / BATCHES_DIR_NAME):
        if any((candidate / name).is_file() for name in names):
            return candidate
    return None


class CIFAR10ShardDescriptor(ShardDescriptor):
    """Shard `rank` of `world_size` of CIFAR-10, read from local binary files.

    `rank_worldsize` is '1, 2' for shard 1 of 2. `data_dir` is the folder with the
    .bin files or its parent; a relative path resolves against `base_dir` (the
    envoy config's folder, passed in by the envoy) or else the cwd.
    """

    def __init__(
        self,
        rank_worldsize: str | Sequence[int] = "1, 1",
        data_dir: str | os.PathLike | None = None,
        download: bool = False,
        base_dir: str | os.PathLike | None = None,
        partition: str = "contiguous",
        alpha: float = 0.5,
        sigma: float = 1.0,
        labels_per_shard: int = 2,
        seed: int = 0,
    ) -> None:
        self.rank, self.world_size = parse_rank_worldsize(rank_worldsize)
        if partition not in PARTITIONS:
            raise ValueError(f"partition {partition!r} is not one of {', '.join(PARTITIONS)}")
        self.partition = partition
        self._partition_args = {"alpha": alpha, "sigma": sigma, "labels_per_shard": labels_per_shard, "seed": seed}
        self._indices: dict[str, np.ndarray] = {}
        self._cache: dict[str, dict[str, np.ndarray]] = {}
        # Per split: the files it is read from, with their record counts.
        self._files: dict[str, list[tuple[Path, int]]] = {}
        self.data_dir: Path | None = None
        self.download = False

        resolved = _resolve_dir(data_dir, base_dir) if data_dir is not None else None
        batches_dir = None
        if resolved is not None and resolved.is_dir():
            batches_dir = _find_batches_dir(resolved)
        if batches_dir is not None:
            self.data_dir = batches_dir
            self._files = self._scan_files(batches_dir)
        elif download:
            self.download = True
        else:
            raise FileNotFoundError(self._missing_data_message(resolved))

    @staticmethod
    def _missing_data_message(resolved: Path | None) -> str:
        hint = (
            "set shard_descriptor.params.data_dir to the folder holding the CIFAR-10 .bin files "
            f"(or its parent, which holds {BATCHES_DIR_NAME}/), "
            "or set download: true where there is a network"
        )
        if resolved is None:
            return f"no CIFAR-10 data_dir given: {hint}"
        if not resolved.is_dir():
            return f"CIFAR-10 data_dir {resolved} does not exist: {hint}"
        return (
            f"no CIFAR-10 .bin files in {resolved} or {resolved / BATCHES_DIR_NAME} "
            f"(expected data_batch_1.bin..data_batch_5.bin and {TEST_FILE_NAME}): {hint}"
        )

    @staticmethod
    def _scan_files(batches_dir: Path) -> dict[str, list[tuple[Path, int]]]:
        """List each split's files and record counts (from sizes; no pixel read)."""
        train = [batches_dir / name for name in TRAIN_FILE_NAMES if (batches_dir / name).is_file()]
        if not train:
            raise FileNotFoundError(
                f"no CIFAR-10 training files in {batches_dir}: expected data_batch_1.bin.."
                "data_batch_5.bin (at least one)"
            )
        test = batches_dir / TEST_FILE_NAME
        if not test.is_file():
            raise FileNotFoundError(f"CIFAR-10 validation file {test} is missing")
        return {
            "train": [(path, count_records(path)) for path in train],
            "valid": [(test, count_records(test))],
        }

    def split_sizes(self) -> dict[str, int]:
        """Records per split in this shard (contiguous local shards: from file sizes alone)."""
        if self.download:
            return {name: len(self.get_split(name)["label"]) for name in SPLIT_NAMES}
        return {name: len(self._shard_indices(name)) for name in SPLIT_NAMES}

    def label_counts(self) -> list[int]:
        """How many training records of each class (0-9) this shard holds."""
        labels = self.get_split("train")["label"] if self.download else self._split_labels("train")[
            self._shard_indices("train")]
        return np.bincount(labels, minlength=NUM_CLASSES).tolist()

    def _split_labels(self, split: str) -> np.ndarray:
        """The label byte of every record of the whole split (no pixel decoded)."""
        return np.concatenate([np.memmap(path, np.uint8, mode="r").reshape(-1, RECORD_BYTES)[:, 0].astype(np.int32)
                               for path, _ in self._files[split]])

    def _shard_indices(self, split: str) -> np.ndarray:
        if split not in self._indices:
            if self.partition == "contiguous":
                self._indices[split] = np.arange(*shard_bounds(self._total_records(split), self.rank,
                                                                self.world_size))
            else:
                self._indices[split] = self._partition(self._split_labels(split), split)
        return self._indices[split]

    def _partition(self, labels: np.ndarray, split: str) -> np.ndarray:
        indices = partition_indices(labels, self.rank, self.world_size, self.partition, **self._partition_args)
        if split == "train" and len(indices) == 0:
            raise ValueError(f"partition {self.partition!r} with {self._partition_args} leaves shard {self.rank} of "
                             f"{self.world_size} without training records: raise alpha or labels_per_shard, "
                             "or change the seed")
        return indices

    def _total_records(self, split: str) -> int:
        return sum(count for _, count in self._files[split])

    def get_split(self, name: str) -> dict[str, np.ndarray]:
        """Return {'image': float32 (n, 32, 32, 3) in [0, 1], 'label': int32 (n,)} of this shard.

        The shard is decoded on first use and cached.
        """
        split = normalize_split_name(name)
        if split not in self._cache:
            if self.download:
                self._cache.update(self._load_with_tfds())
            else:
                self._cache[split] = self._load_local(split)
        return dict(self._cache[split])

    def _load_local(self, split: str) -> dict[str, np.ndarray]:
        """Read and decode only this shard's records, which may span several files."""
        if self.partition != "contiguous":
            files = [np.memmap(path, np.uint8, mode="r").reshape(-1, RECORD_BYTES) for path, _ in self._files[split]]
            offsets = np.cumsum([0] + [count for _, count in self._files[split]])
            indices = self._shard_indices(split)
            records = [files[f][indices[(indices >= offsets[f]) & (indices < offsets[f + 1])] - offsets[f]]
                       for f in range(len(files))]
            return decode_records(np.concatenate(records))
        start, stop = shard_bounds(self._total_records(split), self.rank, self.world_size)
        chunks = []
        file_start = 0  # index of the file's first record within the whole split
        for path, count in self._files[split]:
            first = max(start, file_start) - file_start
            last = min(stop, file_start + count) - file_start
            if last > first:
                raw = np.fromfile(
                    path, dtype=np.uint8, count=(last - first) * RECORD_BYTES,
                    offset=first * RECORD_BYTES,
                )
                chunks.append(raw.reshape(-1, RECORD_BYTES))
            file_start += count
        records = np.concatenate(chunks) if chunks else np.empty((0, RECORD_BYTES), np.uint8)
        return decode_records(records)

    def _load_with_tfds(self) -> dict[str, dict[str, np.ndarray]]:
        """Download CIFAR-10 through tensorflow-datasets and keep this shard of both splits."""
        install_hint = (
            "download: true needs tensorflow-datasets: pip install tensorflow-datasets "
            "tensorflow-cpu, or point shard_descriptor.params.data_dir at a local copy of "
            f"{BATCHES_DIR_NAME}/"
        )
        try:
            import tensorflow as tf
        except ImportError as exc:
            raise ImportError(install_hint) from exc
        try:
            # Keep TensorFlow off the accelerators so it never takes memory beside JAX.
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:
            pass  # TensorFlow was initialised earlier; its device list can no longer change.
        try:
            import tensorflow_datasets as tfds
        except ImportError as exc:
            raise ImportError(install_hint) from exc

        splits = {}
        for name, tfds_split in (("train", "train"), ("valid", "test")):
            images, labels = tfds.as_numpy(
                tfds.load("cifar10", split=tfds_split, batch_size=-1, as_supervised=True)
            )
            keep = self._partition(labels.astype(np.int32), name)
            splits[name] = {
                "image": images[keep].astype(np.float32) / np.float32(255.0),
                "label": labels[keep].astype(np.int32),
            }
        return splits

    @property
    def sample_shape(self) -> list[str]:
        return [str(IMAGE_SIDE), str(IMAGE_SIDE), "3"]

    @property
    def target_shape(self) -> list[str]:
        return ["1"]

    @property
    def dataset_description(self) -> str:
        shard = f"CIFAR-10 shard {self.rank} of {self.world_size}"
        if self.partition != "contiguous":
            shard += f" ({self.partition}, " + ", ".join(
                f"{k}={v}" for k, v in self._partition_args.items()
                if k == "seed" or k == {"dirichlet": "alpha", "unbalanced": "sigma", "labels": "labels_per_shard"}[
                    self.partition]) + ")"
        if self.download:
            return f"{shard} from tensorflow-datasets 'cifar10'"
        sizes = self.split_sizes()
        return f"{shard} ({sizes['train']} train / {sizes['valid']} valid) from {self.data_dir}"

    def __repr__(self) -> str:
        return f"CIFAR10ShardDescriptor({self.dataset_description!r})"
