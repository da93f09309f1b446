"""A simulation's participants: the envoys' tasks, run by the workers' own round code, wherever they run.

:class:`Participants` keeps one :class:`~fedjax_core.runtime.round_runner.RoundRunner` per envoy that
has taken part (its loaders keep their place between rounds, as a worker's do) and runs the tasks a
round asks for: as vectorised cohorts when every task is vectorised, else envoy by envoy. What the
runners send the director (the round's model asked for, metric reports, check-ins, uploads, and
dropouts) goes to a :class:`DirectorSide`: the simulated director itself in the notebook's process
(``envoys.VirtualEnvoys``), or a record of calls that a Ray actor sends back (``ray_backend``).
"""
from __future__ import annotations

import copy
import traceback
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from fedjax_core import records as r
from fedjax_core.director import limits
from fedjax_core.runtime.round_runner import OptimizerInit, RoundRunner
from fedjax_core.shard_descriptor import ShardDescriptor
from fedjax_core.simulation.cohort import Cohort, CohortError, vectorizable


class DirectorSide(Protocol):
    """Where a participant's calls go; each may raise, which drops the participant out of the round."""

    def round_model(self, envoy: str, round_: int) -> dict[str, np.ndarray]: ...

    def report(self, envoy: str, round_: int, stage: str, metrics: dict[str, dict[str, float]],
               sample_count: int) -> None: ...

    def check_in(self, envoy: str, round_: int, divergence: float) -> bool: ...

    def upload(self, envoy: str, round_: int, sample_count: int, tensors: Mapping[str, np.ndarray],
               encodings: Mapping[str, r.Encoding], applied: tuple[float, float] = (0.0, 0.0)) -> None: ...

    def dropped(self, envoy: str, error: str) -> None: ...

    def open(self) -> bool:
        """Whether the round still takes work (False once it closed, or the experiment ended)."""
        ...


class _Link:
    """One envoy's calls to the director, as ``envoy/client.EnvoyClient`` makes them over gRPC."""

    def __init__(self, side: DirectorSide, envoy: str):
        self.side, self.envoy_name = side, envoy

    def round_model(self, experiment: str, round_: int) -> dict[str, np.ndarray]:
        return self.side.round_model(self.envoy_name, round_)

    def check_in(self, experiment: str, round_: int, divergence: float) -> bool:
        return self.side.check_in(self.envoy_name, round_, divergence)

    def upload(self, experiment: str, round_: int, sample_count: int, tensors: Mapping[str, np.ndarray],
               encodings: Mapping[str, r.Encoding], applied: tuple[float, float] = (0.0, 0.0)) -> None:
        self.side.upload(self.envoy_name, round_, sample_count, tensors, encodings, applied)

    # the runner's Reports: sent as they come, nothing to wait for
    def send(self, experiment: str, round_: int, stage: str, metrics: dict[str, dict[str, float]],
             sample_count: int) -> None:
        self.side.report(self.envoy_name, round_, stage, metrics, sample_count)

    def wait(self, raise_first: bool = True) -> None:
        pass


def error_text(exc: BaseException) -> str:
    """A task's failure as a dropout note: the exception and the end of its traceback, clipped."""
    text = "".join(traceback.format_exception(exc))
    return limits.clip_error(f"{type(exc).__name__}: {exc}\n{text[-3000:]}")


def starts_alike(task: r.Task) -> bool:
    """Whether every participant given ``task`` starts from the same state: the round's model, with the optimizer
    state the template has (RESET) or the model carries (CONTINUE_GLOBAL), not one of its own (CONTINUE_LOCAL), and
    no personal layers (each envoy lays its own over the model)."""
    return (task.kind in (r.TaskKind.TRAIN, r.TaskKind.VALIDATE) and task.from_global
            and task.opt_treatment != r.OptTreatment.CONTINUE_LOCAL and not task.personal)


def settle(runner: RoundRunner, keep_local: bool) -> None:
    """An envoy done with its task keeps only what its next one needs, on the host: its own model with
    ``keep_local`` (CONTINUE_LOCAL, periodic and dynamic averaging: a SYNC task may still upload it, measured from
    the round's model), else nothing of this round's."""
    import jax

    runner.global_state = None
    if keep_local:
        runner.local_state = jax.device_get(runner.local_state)
    else:
        runner.local_state, runner.global_tensors = runner.template, None


class Participants:
    """The envoys of one experiment that run in this process (all of a simulation's, or a Ray actor's share)."""

    def __init__(self, side: DirectorSide, experiment: str, objects: Mapping[str, Any],
                 shards: Mapping[str, ShardDescriptor], vectorize: bool = True, max_cohort: int = 256):
        from fedjax_core.runtime.model_tensors import canonicalize

        self.side, self.experiment, self.shards = side, experiment, shards
        self.model_interface = objects["model_interface"]
        self.ti, self.data = objects["task_interface"], objects["data_interface"]
        self.template = canonicalize(self.model_interface.model)
        self.fresh_opt_state = OptimizerInit()  # one compiled init for every envoy
        self.runners: dict[str, RoundRunner] = {}
        self.cohort = Cohort(self.ti, self.model_interface.optimizer) if vectorize and vectorizable(self.ti) else None
        self.max_cohort = max_cohort

    def play(self, asked: list[tuple[str, r.Task]], keep_local: bool) -> None:
        """The tasks asked for: TRAIN and VALIDATE ones as vectorised cohorts (at most ``max_cohort`` envoys each)
        when every task is vectorised, the others envoy by envoy; stops once the round no longer takes work. Each
        envoy that is done keeps only what it needs next (``settle``), so memory holds one cohort's states."""
        if self.cohort is not None:
            together = [(e, t) for e, t in asked if t.kind in (r.TaskKind.TRAIN, r.TaskKind.VALIDATE)]
            asked = [(e, t) for e, t in asked if t.kind not in (r.TaskKind.TRAIN, r.TaskKind.VALIDATE)]
            for first in range(0, len(together), self.max_cohort):
                chunk = together[first:first + self.max_cohort]
                runners = [self._runner(e) for e, _ in chunk]
                try:
                    self.cohort.play(runners, [t for _, t in chunk],
                                     lambda envoy, exc: self.side.dropped(envoy, error_text(exc)))
                except Exception as exc:
                    raise CohortError(
                        f"the vectorised tasks cannot run as one cohort ({type(exc).__name__}: {exc}): a task "
                        "registered with vectorized=True must be a pure JAX function of its state and data (no "
                        "float() or Python branches on values, metrics returned as arrays); register the tasks "
                        "without vectorized=True to run them envoy by envoy") from exc
                finally:
                    for runner in runners:
                        settle(runner, keep_local)
                if not self.side.open():
                    return
        first: tuple[Any, Any] | None = None  # the round's start state, restored once, and its global state
        for envoy, task in asked:
            runner = self._runner(envoy)
            try:
                if not starts_alike(task):
                    runner.run_round(task)
                elif first is None:
                    state, fresh = runner.start(task)
                    first = (copy.copy(state), runner.global_state)
                    runner.run_round(task, (state, fresh))
                else:  # the same start as the first: each envoy trains its own copy
                    runner.start_like(task, first[1])
                    runner.run_round(task, (copy.copy(first[0]), True))
            except Exception as exc:
                self.side.dropped(envoy, error_text(exc))
            finally:
                settle(runner, keep_local)
            if not self.side.open():
                return

    def release(self, keep_local: bool) -> None:
        """Between rounds: every envoy settled (see ``settle``), whatever its last task did."""
        for runner in self.runners.values():
            settle(runner, keep_local)

    def _runner(self, envoy: str) -> RoundRunner:
        runner = self.runners.get(envoy)
        if runner is None:
            data = copy.copy(self.data)  # each envoy's own, as each worker unpickles its own
            data.shard_descriptor = self.shards[envoy]
            link = _Link(self.side, envoy)
            runner = RoundRunner(link, link, self.experiment, self.template, self.model_interface.optimizer, self.ti,
                                 data, "cpu", fresh_opt_state=self.fresh_opt_state, log=lambda text: None)
            self.runners[envoy] = runner
        return runner
