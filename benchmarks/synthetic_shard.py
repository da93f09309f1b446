"""A synthetic shard for benchmarks: a few random CIFAR-shaped samples, made on the spot.

Envoy config::

    shard_descriptor:
      template: synthetic_shard.SyntheticShardDescriptor
      params: {rank_worldsize: "1, 2", n_samples: 32}

Shapes match the tutorial director (``sample_shape: ['32', '32', '3']``,
``target_shape: ['1']``), so a benchmark federation looks like the real one to the
director while the experiment's tasks do no real work. Imports only numpy.
"""
from __future__ import annotations

import numpy as np

from fedjax_core.shard_descriptor import SPLIT_NAMES, ShardDescriptor, normalize_split_name


class SyntheticShardDescriptor(ShardDescriptor):
    """``n_samples`` random images (float32 NHWC in [0, 1)) and labels (int32, 0-9) per split."""

    def __init__(self, rank_worldsize: str = "1, 1", n_samples: int = 32, seed: int = 0) -> None:
        try:
            self.rank, self.world = (int(x) for x in str(rank_worldsize).split(","))
        except ValueError:
            raise ValueError(f"rank_worldsize must look like '1, 2'; got {rank_worldsize!r}") from None
        if not 1 <= self.rank <= self.world:
            raise ValueError(f"rank_worldsize {rank_worldsize!r}: rank must be in 1..{self.world}")
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1; got {n_samples!r}")
        self.n_samples = int(n_samples)
        self.seed = int(seed)

    def get_split(self, name: str) -> dict[str, np.ndarray]:
        split = normalize_split_name(name)
        rng = np.random.default_rng([self.seed, self.rank, SPLIT_NAMES.index(split)])
        return {
            self.sample_key: rng.random((self.n_samples, 32, 32, 3), dtype=np.float32),
            self.target_key: rng.integers(0, 10, size=(self.n_samples,), dtype=np.int32),
        }

    def split_sizes(self) -> dict[str, int]:
        return {name: self.n_samples for name in SPLIT_NAMES}

    @property
    def sample_shape(self) -> list[str]:
        return ["32", "32", "3"]

    @property
    def target_shape(self) -> list[str]:
        return ["1"]

    @property
    def dataset_description(self) -> str:
        return f"synthetic shard {self.rank}/{self.world}: {self.n_samples} random samples per split"
