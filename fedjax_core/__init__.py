"""fedjax_core: a director/envoy federated-learning platform for JAX/Flax.

The notebook API is imported lazily, so the director and envoy daemons never import JAX.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Federation": "fedjax_core.api.federation",
    "FLExperiment": "fedjax_core.api.experiment",
    "ExperimentFailed": "fedjax_core.api.experiment",
    "ExperimentCancelled": "fedjax_core.api.experiment",
    "ModelInterface": "fedjax_core.runtime.interfaces",
    "TaskInterface": "fedjax_core.runtime.interfaces",
    "DataInterface": "fedjax_core.runtime.interfaces",
    "CustomTrainState": "fedjax_core.runtime.train_state",
    "ShardDescriptor": "fedjax_core.shard_descriptor",
    "DummyShardDescriptor": "fedjax_core.shard_descriptor",
    "fedprox_term": "fedjax_core.runtime.fedprox",
    "FedAvg": "fedjax_core.strategies",
    "FedAvgM": "fedjax_core.strategies",
    "FedAdam": "fedjax_core.strategies",
    "FedYogi": "fedjax_core.strategies",
    "FedAdagrad": "fedjax_core.strategies",
    "FedMedian": "fedjax_core.strategies",
    "FedTrimmedAvg": "fedjax_core.strategies",
    "Krum": "fedjax_core.strategies",
    "Periodic": "fedjax_core.sync",
    "Dynamic": "fedjax_core.sync",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedjax_core' has no attribute {name!r}")
