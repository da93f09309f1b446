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

    ``backend="ray"`` spreads the envoys over Ray actors (``pip install 'fedjax-core[ray]'``), the rounds and
    the strategy staying in this process; ``ray_options`` are :class:`~fedjax_core.simulation.ray_backend.RayOptions`
    (``address``, ``actors``, ``cpus_per_actor``, ``gpus_per_actor``, ``jax_memory_fraction``, ``env``), and
    ``address=`` may be given on its own. ``close()`` ends the actors (and Ray, when this started it).
    """

    def __init__(self, shards: Mapping[str, ShardDescriptor] | Sequence[ShardDescriptor], client_id: str = "api", *,
                 vectorize: bool = True, max_cohort: int = 256, backend: str = "local", address: str | None = None,
                 ray_options: Mapping[str, Any] | None = None):
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
        hosts = _ray_hosts(backend, address, ray_options, named)
        self.client_id = client_id
        try:
            self.client = SimulatedDirector(named, vectorize=vectorize, max_cohort=max_cohort, ray=hosts)
        except BaseException:
            if hosts is not None:
                hosts.close()
            raise
        self.sample_shape, self.target_shape = self.client.dataset_info()

    @classmethod
    def from_arrays(cls, train: tuple[Any, Any], valid: tuple[Any, Any], partition: Partitioner,
                    client_id: str = "api", valid_partition: Partitioner | None = None,
                    **options: Any) -> SimulatedFederation:
        """Envoys over arrays already in memory: ``partition`` (``fedjax_core.partition``) splits the train and
        the valid samples among ``partition.n_envoys`` envoys by their labels (the targets, one class each);
        ``valid_partition``, if given, splits the valid samples instead (for instance with ``allow_empty=True``
        when there are fewer test samples than envoys). ``options`` go to the constructor."""
        valid_partition = partition if valid_partition is None else valid_partition
        for key, value in (("partition", partition), ("valid_partition", valid_partition)):
            if not isinstance(value, Partitioner):
                raise TypeError(f"{key} must be a fedjax_core.partition partitioner such as "
                                f"partition.dirichlet(n_envoys=100, alpha=0.3), got {type(value).__name__}")
        if valid_partition.n_envoys != partition.n_envoys:
            raise ValueError(f"valid_partition splits among {valid_partition.n_envoys} envoys but partition among "
                             f"{partition.n_envoys}: give both the same n_envoys")
        arrays = {}
        for split, pair in (("train", train), ("valid", valid)):
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"{split} must be a tuple (samples, targets) of arrays")
            samples, targets = np.asarray(pair[0]), np.asarray(pair[1])
            if len(samples) != len(targets):
                raise ValueError(f"{split}: {len(samples)} samples but {len(targets)} targets")
            arrays[split] = (samples, targets)
        splitters = {"train": partition, "valid": valid_partition}
        parts = {split: splitters[split](arrays[split][1].reshape(len(arrays[split][1]), -1)[:, 0]) for split in arrays}
        shards = {f"env_{i}": ArrayShard(arrays, {split: parts[split][i] for split in arrays},
                                         f"simulated shard {i} of {partition.n_envoys}")
                  for i in range(partition.n_envoys)}
        return cls(shards, client_id=client_id, **options)



def _ray_hosts(backend: str, address: str | None, ray_options: Mapping[str, Any] | None,
               shards: Mapping[str, ShardDescriptor]):
    """The Ray actors for ``backend="ray"`` (checked options first, then Ray), or None for ``"local"``."""
    if backend == "local":
        if address is not None or ray_options:
            raise ValueError("address and ray_options are for backend='ray'; drop them, or pass backend='ray'")
        return None
    if backend != "ray":
        raise ValueError(f"backend {backend!r} is not one of 'local' (every envoy in this process) or 'ray'")
    from pydantic import ValidationError

    from fedjax_core.simulation.ray_backend import RayEnvoyHosts, RayOptions

    settings = dict(ray_options or {})
    if address is not None:
        if settings.get("address", address) != address:
            raise ValueError(f"address={address!r} and ray_options['address']={settings['address']!r} differ: "
                             "give the Ray cluster's address once")
        settings["address"] = address
    try:
        options = RayOptions(**settings)
    except ValidationError as exc:
        problems = "; ".join(f"ray_options[{'.'.join(map(str, e['loc']))!r}]: {e['msg']}" for e in exc.errors())
        raise ValueError(f"SimulatedFederation(backend='ray'): {problems}") from None
    return RayEnvoyHosts(options, shards)
