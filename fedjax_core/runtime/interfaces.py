"""Model, task and data interfaces, as in the seed tutorial's interactive API.

They are plain containers: the notebook fills them, cloudpickle carries them to the
envoys, and the worker process there calls the registered tasks. A pickle names the
module that defines its class, so they live here: unpickling imports this module, not
the notebook API (which exports them as ``fedjax_core.api.interfaces``).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any


class ModelInterface:
    """The initial model (a flax TrainState) and, optionally, an optimizer handed to training tasks.

    ``framework_plugin`` is accepted for compatibility with the seed and ignored: flax
    states are handled natively.
    """

    def __init__(self, model: Any, optimizer: Any = None, framework_plugin: str | None = None):
        if not hasattr(model, "params"):
            raise TypeError(
                f"ModelInterface(model=...) needs a flax TrainState (something with .params), got {type(model).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.framework_plugin = framework_plugin


def takes_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` accepts a keyword argument ``name`` (by name, or through ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class TaskError(LookupError):
    """A task name the TaskInterface does not have, or a task registered wrongly."""


class TaskInterface:
    """Registry of federated tasks. Tasks registered with ``optimizer=`` train; the others validate."""

    def __init__(self):
        self.task_registry: dict[str, Callable] = {}
        self.task_contract: dict[str, dict[str, Any]] = {}
        self.task_settings: dict[str, dict[str, Any]] = {}

    def register_fl_task(self, model: str, data_loader: str, device: str, optimizer: str | None = None,
                         round_num: str | None = None, global_model: str | None = None,
                         mesh: str | None = None, vectorized: bool = False) -> Callable[[Callable], Callable]:
        """Decorator: register a task, mapping the platform's inputs to the function's parameter names.

        ``global_model`` names a parameter that receives the model the round started from
        (for FedProx: ``loss + fedjax_core.fedprox_term(params, global_state.params, mu)``).
        ``mesh`` names one that receives a ``jax.sharding.Mesh`` over the envoy's devices (axis
        ``data``; see ``fedjax_core.parallel``).

        ``vectorized=True`` promises a pure JAX function of the model state and a dict of arrays (the data
        loader's, one row per sample) that also holds ``mask`` (1.0 for a sample, 0.0 for padding),
        returning ``(new_state, metrics)`` or ``metrics`` as arrays: a simulation then runs a round's
        participants under one ``jax.vmap`` (docs/simulation.md). Elsewhere it runs as any task, with a
        mask of ones.
        """
        if not isinstance(vectorized, bool):
            raise TaskError(f"register_fl_task(vectorized=...) must be True or False, got {vectorized!r}")
        if vectorized and mesh is not None:
            raise TaskError("register_fl_task: a vectorized task cannot also take a mesh (a simulation spreads the "
                            "cohort itself); drop one of vectorized=True and mesh=")
        contract = {"model": model, "data_loader": data_loader, "device": device, "optimizer": optimizer,
                    "round_num": round_num, "global_model": global_model, "mesh": mesh}

        def decorator(fn: Callable) -> Callable:
            for role, name in contract.items():
                if name is not None and not takes_keyword(fn, name):
                    raise TaskError(
                        f"task {fn.__name__!r}: register_fl_task({role}={name!r}) names a parameter the function "
                        f"does not have; its parameters are {list(inspect.signature(fn).parameters)}")
            self.task_registry[fn.__name__] = fn
            self.task_contract[fn.__name__] = {**contract, "vectorized": vectorized}
            return fn

        return decorator

    def add_kwargs(self, **task_kwargs: Any) -> Callable[[Callable], Callable]:
        """Decorator placed above ``register_fl_task``: extra keyword arguments for that task."""
        def decorator(fn: Callable) -> Callable:
            self.task_settings[fn.__name__] = dict(task_kwargs)
            return fn
        return decorator

    def get_task(self, name: str) -> Callable:
        if name not in self.task_registry:
            known = ", ".join(sorted(self.task_registry)) or "none"
            raise TaskError(f"the TaskInterface has no task {name!r}; registered tasks: {known}")
        return self.task_registry[name]

    def accepts(self, name: str, kwarg: str) -> bool:
        """Whether task ``name`` takes a keyword argument ``kwarg``."""
        return takes_keyword(self.get_task(name), kwarg)

    def set_task_kwargs(self, name: str, **task_kwargs: Any) -> None:
        self.get_task(name)
        self.task_settings[name] = dict(task_kwargs)

    @property
    def train_tasks(self) -> list[str]:
        return [n for n, c in self.task_contract.items() if c["optimizer"] is not None]

    @property
    def validation_tasks(self) -> list[str]:
        return [n for n, c in self.task_contract.items() if c["optimizer"] is None]

    def check(self) -> None:
        """Refuse a task set that cannot run a federated round."""
        if not self.task_registry:
            raise TaskError("the TaskInterface has no tasks: register them with @TI.register_fl_task(...)")
        if not self.train_tasks:
            raise TaskError("the TaskInterface has no training task: register one with optimizer='optimizer'")
        for name in self.task_settings:
            if name not in self.task_registry:
                raise TaskError(
                    f"TI.add_kwargs was applied to {name!r}, which is not a registered task; "
                    "put @TI.add_kwargs(...) above @TI.register_fl_task(...)")


class DataInterface:
    """Wraps the envoy's shard descriptor into loaders for the tasks.

    Subclasses usually override the ``shard_descriptor`` setter and the loaders; the
    defaults hand over the shard's ``'train'`` and ``'valid'`` splits as they are.
    """

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs
        self._shard_descriptor = None

    @property
    def shard_descriptor(self):
        return self._shard_descriptor

    @shard_descriptor.setter
    def shard_descriptor(self, shard_descriptor) -> None:
        self._shard_descriptor = shard_descriptor

    def get_train_loader(self, **kwargs: Any) -> Any:
        return self._shard_descriptor.get_split("train")

    def get_valid_loader(self, **kwargs: Any) -> Any:
        return self._shard_descriptor.get_split("valid")

    def get_train_data_size(self) -> int:
        """Training-sample count: the FedAvg weight of this envoy."""
        return count_samples(self.get_train_loader())

    def get_valid_data_size(self) -> int:
        return count_samples(self.get_valid_loader())


def count_samples(loader: Any) -> int:
    """Samples in a loader: a mapping of equally long arrays counts its rows, not its keys."""
    if isinstance(loader, Mapping):
        lengths = {len(v) for v in loader.values()}
        if len(lengths) != 1:
            raise ValueError(f"the loader's arrays have different lengths {sorted(lengths)}; "
                             "override get_train_data_size/get_valid_data_size")
        return lengths.pop()
    return len(loader)
