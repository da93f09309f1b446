"""Vectorised cohorts: a round's participants run each task under one ``jax.vmap``.

A task registered with ``vectorized=True`` promises to be a pure JAX function of its state and a
dict of fixed-shape arrays that carries a ``mask`` (1.0 for a sample, 0.0 for padding), returning
``(new_state, metrics)`` (training) or ``metrics`` (validation) as arrays. Then the simulation
pads every participant's split to one length (the next power of two of the longest, so a few
lengths cover every round), stacks them, and runs the task once for the whole cohort: one
compilation per padded length, one dispatch per round. A task written as a Python loop, or a
task set with any task not vectorised, runs envoy by envoy instead (``envoys.VirtualEnvoys``).

Each participant's round otherwise goes as the workers' (``runtime.round_runner``): the same
starting state, the same reports in the same order, the same upload or check-in.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedjax_core import records as r

if TYPE_CHECKING:
    from fedjax_core.runtime.round_runner import RoundRunner


class CohortError(ValueError):
    """A vectorised task or its data that cannot run as one cohort; the message says what to change."""


def vectorizable(ti: Any) -> bool:
    """Whether every task of ``ti`` was registered with ``vectorized=True`` (and none takes the round's global
    model, which a cohort does not pass)."""
    return bool(ti.task_contract) and all(c.get("vectorized") and c.get("global_model") is None
                                          for c in ti.task_contract.values())


def padded_length(n: int) -> int:
    """The length a split of ``n`` samples is padded to: the next power of two (at least 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def stack_splits(splits: Sequence[Mapping[str, np.ndarray]], who: Sequence[str]) -> dict[str, np.ndarray]:
    """The participants' splits padded to one length and stacked: ``[rows, length, ...]`` per key, plus ``mask``
    ``[rows, length]``, where ``rows`` and ``length`` are the next powers of two of the envoys and of the longest
    split (so a few shapes cover every round; padding rows are all mask). Every split must hold the same keys,
    with equal sample counts per key."""
    if not splits:
        raise CohortError("a cohort needs at least one participant")
    keys = sorted(splits[0])
    sizes = []
    for envoy, split in zip(who, splits):
        if not isinstance(split, Mapping):
            raise CohortError(f"envoy {envoy!r}: a vectorised task's data loader must return a dict of arrays, got "
                              f"{type(split).__name__}")
        if sorted(split) != keys:
            raise CohortError(f"envoy {envoy!r}: its data has keys {sorted(split)}, envoy {who[0]!r}'s {keys}: "
                              "every envoy's loader must return the same keys")
        counts = {len(np.asarray(split[k])) for k in keys}
        if len(counts) != 1:
            raise CohortError(f"envoy {envoy!r}: its data arrays differ in length ({sorted(counts)}): every array of "
                              "a split holds one row per sample")
        sizes.append(counts.pop())
    length, rows = padded_length(max(sizes)), padded_length(len(splits))  # padding envoys are all mask
    out = {}
    for key in keys:
        arrays = [np.asarray(split[key]) for split in splits]
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) != 1:
            raise CohortError(f"data key {key!r} has different shapes per sample across the cohort ({sorted(shapes)}): "
                              "a vectorised task needs one shape; pad the samples in the DataInterface")
        stacked = np.zeros((rows, length, *arrays[0].shape[1:]), arrays[0].dtype)
        for i, a in enumerate(arrays):
            stacked[i, :len(a)] = a
        out[key] = stacked
    mask = np.zeros((rows, length), np.float32)
    for i, n in enumerate(sizes):
        mask[i, :n] = 1.0
    out["mask"] = mask
    return out


class Cohort:
    """Runs one round's TRAIN or VALIDATE tasks for several envoys at once, through their runners."""

    def __init__(self, ti: Any, optimizer: Any):
        self.ti, self.optimizer = ti, optimizer
        self._functions: dict[tuple, Any] = {}  # compiled vmapped tasks

    def play(self, runners: Sequence[RoundRunner], tasks: Sequence[r.Task],
             dropout: Callable[[str, BaseException], None]) -> None:
        """Each runner does its task (all TRAIN, or all VALIDATE); starting states, reports, uploads and
        check-ins go as in ``RoundRunner.run_round``; one whose upload or check-in fails drops out (``dropout``)."""
        import jax

        task, n = tasks[0], len(runners)
        names = [runner.link.envoy_name for runner in runners]
        if all(t.from_global for t in tasks) and task.opt_treatment != r.OptTreatment.CONTINUE_LOCAL \
                and not task.personal:
            state, fresh = runners[0].start(tasks[0])  # one model to restore: every participant starts from it
            for runner, t in zip(runners[1:], tasks[1:]):
                runner.start_like(t, runners[0].global_state)
            states, shared = state, True
        else:
            started = [runner.start(t) for runner, t in zip(runners, tasks)]
            if len({f for _, f in started}) != 1:
                raise CohortError("a cohort's participants must all start from the round's model, or all from "
                                  "their own")
            states, shared, fresh = _stack_states([s for s, _ in started], padded_length(n)), False, started[0][1]
        valid = stack_splits([runner.valid_loader for runner in runners], names)
        if fresh:
            validation = self._run(self.ti.validation_tasks, states, shared, valid, task, train=False)
            for i, runner in enumerate(runners):
                runner.reports.send(runner.experiment, task.round, r.Stage.AGGREGATED, _row(validation, i),
                                    runner.n_valid)
        if task.kind == r.TaskKind.VALIDATE:
            return
        train = stack_splits([runner.train_loader for runner in runners], names)
        trained, train_metrics = self._run(self.ti.train_tasks, states, shared, train, task, train=True)
        local = self._run(self.ti.validation_tasks, trained, False, valid, task, train=False)
        for i, runner in enumerate(runners):
            state = jax.tree_util.tree_map(lambda a, i=i: a[i], trained)
            runner.reports.send(runner.experiment, task.round, r.Stage.TRAIN, _row(train_metrics, i), runner.n_train)
            runner.reports.send(runner.experiment, task.round, r.Stage.LOCAL, _row(local, i), runner.n_valid)
            try:
                runner.finish(tasks[i], state, _row(train_metrics, i))
            except Exception as exc:
                dropout(names[i], exc)

    def _run(self, names: list[str], states: Any, shared: bool, data: dict[str, np.ndarray], task: r.Task,
             train: bool):
        """Each task of ``names`` under one vmap over the cohort (``shared``: one state for every envoy, else one
        each on axis 0); training tasks hand their states on, one per envoy."""
        round_kwargs = json.loads(task.task_kwargs) if task.task_kwargs else {}
        metrics: dict[str, dict[str, np.ndarray]] = {}
        for name in names:
            result = self._compiled(name, task.round, round_kwargs.get(name, {}), shared)(states, data)
            shared = False
            if train:
                if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping)):
                    raise CohortError(f"vectorised training task {name!r} must return (new_state, metrics)")
                states, metrics[name] = result
            else:
                if not isinstance(result, Mapping):
                    raise CohortError(f"vectorised validation task {name!r} must return a dict of metrics")
                metrics[name] = result
        metrics = {task_: {k: np.asarray(v) for k, v in values.items()} for task_, values in metrics.items()}
        return (states, metrics) if train else metrics

    def _compiled(self, name: str, round_num: int, round_kwargs: Mapping[str, Any], shared: bool):
        """Task ``name`` with its platform arguments bound, vmapped over the cohort (state and data on axis 0) and
        jitted; kept per round only when the task takes the round number or this round's kwargs differ."""
        import jax

        roles = self.ti.task_contract[name]
        takes_round = roles.get("round_num") is not None
        key = (name, round_num if takes_round else None, json.dumps(round_kwargs, sort_keys=True), shared)
        if key not in self._functions:
            bound = {roles["device"]: "cpu", **self.ti.task_settings.get(name, {}), **round_kwargs}
            if roles.get("optimizer") is not None:
                bound[roles["optimizer"]] = self.optimizer
            if takes_round:
                bound[roles["round_num"]] = round_num
            fn = self.ti.get_task(name)

            def one(state, data, fn=fn, bound=bound):
                return fn(**{roles["model"]: state, roles["data_loader"]: data, **bound})

            self._functions[key] = jax.jit(jax.vmap(one, in_axes=(None if shared else 0, 0)))
        return self._functions[key]


def _stack_states(states: Sequence[Any], rows: int) -> Any:
    """The states stacked on a new axis 0, padded to ``rows`` with copies of the first (padding envoys)."""
    import jax
    import jax.numpy as jnp

    padded = [*states, *[states[0]] * (rows - len(states))]
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *padded)


def _row(metrics: Mapping[str, Mapping[str, np.ndarray]], i: int) -> dict[str, dict[str, float]]:
    return {task: {name: float(values[i]) for name, values in m.items()} for task, m in metrics.items()}
