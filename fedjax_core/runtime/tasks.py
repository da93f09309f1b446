"""Calling a task registered on a TaskInterface, as its contract says, and normalising what it returns."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedjax_core.runtime.interfaces import TaskInterface


class TaskResultError(TypeError):
    pass


def run_task(ti: TaskInterface, name: str, state: Any, loader: Any, device: str, optimizer: Any,
             round_num: int, round_kwargs: Mapping[str, Any] | None = None,
             global_state: Any = None, mesh: Any = None) -> tuple[Any, dict[str, float]]:
    """Run task ``name``; returns ``(state_after, metrics)``.

    Keyword arguments: the task's ``add_kwargs``, overridden by ``round_kwargs`` (this round's
    entry of the experiment's ``round_config``). A task registered with ``global_model=`` also
    gets ``global_state``, the model the round started from; one registered with ``mesh=`` gets
    ``mesh``, the envoy's device mesh.

    A task may update ``state`` in place (the seed's ``state.update_state(new_state)``) and
    return a dict of metrics, or return ``(new_state, metrics)``.
    """
    fn = ti.get_task(name)
    contract = ti.task_contract[name]
    if contract.get("vectorized"):
        loader = with_mask(name, loader)
    kwargs: dict[str, Any] = {contract["model"]: state, contract["data_loader"]: loader, contract["device"]: device}
    if contract["optimizer"] is not None:
        kwargs[contract["optimizer"]] = optimizer
    if contract.get("round_num") is not None:
        kwargs[contract["round_num"]] = round_num
    if contract.get("global_model") is not None:
        kwargs[contract["global_model"]] = global_state
    if contract.get("mesh") is not None:
        kwargs[contract["mesh"]] = mesh
    kwargs.update(ti.task_settings.get(name, {}))
    kwargs.update(round_kwargs or {})
    result = fn(**kwargs)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping):
        new_state, metrics = result
    elif isinstance(result, Mapping):
        new_state, metrics = state, result
    else:
        raise TaskResultError(
            f"task {name!r} returned {type(result).__name__}; return a dict of metrics "
            "(after state.update_state(new_state)) or a tuple (new_state, metrics)")
    return new_state, {key: _scalar(name, key, value) for key, value in metrics.items()}


def with_mask(task: str, loader: Any) -> dict[str, Any]:
    """A vectorized task's data: the loader's arrays and a ``mask`` of ones (no row is padding)."""
    if not isinstance(loader, Mapping) or not loader:
        raise TaskResultError(f"task {task!r} is vectorized: its data loader must return a dict of arrays with one "
                              f"row per sample, got {type(loader).__name__}")
    rows = len(next(iter(loader.values())))
    return {**loader, "mask": np.ones(rows, np.float32)}


def _scalar(task: str, key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TaskResultError(f"task {task!r} metric {key!r} is {type(value).__name__}, not a number") from None
