"""A simulated envoy's shard: index arrays into arrays the notebook already holds (nothing is copied up front)."""
from __future__ import annotations

import numpy as np

from fedjax_core.shard_descriptor import ShardDescriptor, normalize_split_name


class ArrayShard(ShardDescriptor):
    """The samples ``indices[split]`` of ``arrays[split] = (samples, targets)``: what a partitioner gave one envoy."""

    def __init__(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]], indices: dict[str, np.ndarray],
                 description: str = "simulated shard"):
        self._arrays, self._indices, self._description = arrays, indices, description

    def get_split(self, name: str) -> dict[str, np.ndarray]:
        split = normalize_split_name(name)
        samples, targets = self._arrays[split]
        index = self._indices[split]
        return {self.sample_key: samples[index], self.target_key: targets[index]}

    def split_sizes(self) -> dict[str, int]:
        return {split: len(index) for split, index in self._indices.items()}

    def label_counts(self) -> list[int]:
        """Training samples per class, when the targets are integer class labels."""
        targets = self._arrays["train"][1]
        if not np.issubdtype(targets.dtype, np.integer) or targets.size != len(targets):
            return []
        labels = targets.reshape(-1)
        return np.bincount(labels[self._indices["train"]], minlength=int(labels.max()) + 1 if labels.size else 0).tolist()

    @property
    def sample_shape(self) -> list[str]:
        return [str(d) for d in self._arrays["train"][0].shape[1:]]

    @property
    def target_shape(self) -> list[str]:
        return [str(d) for d in self._arrays["train"][1].shape[1:]] or ["1"]

    @property
    def dataset_description(self) -> str:
        return self._description
