"""``SimulatedFederation``: a federation of virtual envoys in the notebook's process, for ``FLExperiment`` as is."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_core.api.federation import FederationView
from fedjax_core.partition import Partitioner
from fedjax_core.shard_descriptor import ShardDescriptor
from fedjax_core.simulation.director import SimulatedDirector
from fedjax_core.simulation.shards import ArrayShard
from fedjax_core.spec import check_name


class SimulatedFederation(FederationView):
    """Envoys that exist only in this process: ``FLExperiment(federation=SimulatedFederation(shards), ...)`` runs
    the experiment's rounds here, with the director's round machine, sampling and strategies and the workers'
    own round code, and the notebook follows it as it follows a federation (events, status, models).

    ``shards``: ``{envoy name: ShardDescriptor}``, or a list of them (named ``env_0``, ``env_1``, ...).
    Tasks run one envoy at a time, each envoy's data loaders keeping their place between rounds as a
    worker's do, so an experiment trains to the model a federation of the same shards would.

    When every task was registered with ``vectorized=True``, a round's participants instead run each task
    together under one ``jax.vmap``, ``max_cohort`` envoys at a time (``vectorize=False``: envoy by envoy).
    """

    def __init__(self, shards: Mapping[str, ShardDescriptor] | Sequence[ShardDescriptor], client_id: str = "api", *,
                 vectorize: bool = True, max_cohort: int = 256):
        if isinstance(shards, Mapping):
            named = dict(shards)
        elif isinstance(shards, Sequence) and not isinstance(shards, (str, bytes)):
            named = {f"env_{i}": shard for i, shard in enumerate(shards)}
        else:
            raise TypeError(f"shards must be a dict {{envoy name: ShardDescriptor}} or a list of ShardDescriptors, "
                            f"got {type(shards).__name__}")
        if not named:
            raise ValueError("a SimulatedFederation needs at least one shard")
        for name, shard in named.items():
            check_name("envoy", name)
            if not isinstance(shard, ShardDescriptor):
                raise TypeError(f"shard of envoy {name!r} is a {type(shard).__name__}, not a "
                                "fedjax_core.ShardDescriptor (SimulatedFederation.from_arrays builds them from arrays)")
        if not isinstance(vectorize, bool):
            raise TypeError(f"vectorize must be True or False, got {vectorize!r}")
        if isinstance(max_cohort, bool) or not isinstance(max_cohort, int) or max_cohort < 1:
            raise ValueError(f"max_cohort must be an integer >= 1 (envoys run together per vmap), got {max_cohort!r}")
        self.client_id = client_id
        self.client = SimulatedDirector(named, vectorize=vectorize, max_cohort=max_cohort)
        self.sample_shape, self.target_shape = self.client.dataset_info()

    @classmethod
    def from_arrays(cls, train: tuple[Any, Any], valid: tuple[Any, Any], partition: Partitioner,
                    client_id: str = "api", **options: Any) -> SimulatedFederation:
        """Envoys over arrays already in memory: ``partition`` (``fedjax_core.partition``) splits the train and
        the valid samples among ``partition.n_envoys`` envoys by their labels (the targets, one class each)."""
        if not isinstance(partition, Partitioner):
            raise TypeError(f"partition must be a fedjax_core.partition partitioner such as "
                            f"partition.dirichlet(n_envoys=100, alpha=0.3), got {type(partition).__name__}")
        arrays = {}
        for split, pair in (("train", train), ("valid", valid)):
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"{split} must be a tuple (samples, targets) of arrays")
            samples, targets = np.asarray(pair[0]), np.asarray(pair[1])
            if len(samples) != len(targets):
                raise ValueError(f"{split}: {len(samples)} samples but {len(targets)} targets")
            arrays[split] = (samples, targets)
        parts = {split: partition(arrays[split][1].reshape(len(arrays[split][1]), -1)[:, 0]) for split in arrays}
        shards = {f"env_{i}": ArrayShard(arrays, {split: parts[split][i] for split in arrays},
                                         f"simulated shard {i} of {partition.n_envoys}")
                  for i in range(partition.n_envoys)}
        return cls(shards, client_id=client_id, **options)

