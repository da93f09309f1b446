"""A simulation's envoys: each participant's tasks, run in the notebook's process by the workers' own runner.

:class:`VirtualEnvoys` keeps one :class:`~fedjax_core.runtime.round_runner.RoundRunner` per envoy
that has taken part (its loaders keep their place between rounds, as a worker's do), and is
the runner's link to the simulated director: the round's model, metric reports, check-ins and
uploads arrive there as calls, checked and weighed as the director checks and weighs them. Between
rounds an envoy keeps on the host only what its next round starts from (its own model for
CONTINUE_LOCAL and between averagings), so device memory holds one participant at a time.
"""
from __future__ import annotations

import copy
import math
import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedjax_core import codecs
from fedjax_core import records as r
from fedjax_core.aggregation import ArraySource, TensorSource, Upload
from fedjax_core.director import limits
from fedjax_core.director.round_machine import CheckedIn, Dropped, UpdateStored
from fedjax_core.director.rounds import Run
from fedjax_core.errors import InvalidRequestError
from fedjax_core.runtime.round_runner import OptimizerInit, RoundRunner
from fedjax_core.simulation.cohort import Cohort, CohortError, vectorizable
from fedjax_core.spec import SyncMode
from fedjax_core.tensors import check_finite, is_float_dtype

if TYPE_CHECKING:
    from fedjax_core.simulation.director import SimulatedDirector


def arrays_of(source: TensorSource) -> dict[str, np.ndarray]:
    """Every tensor of ``source`` as a whole array."""
    out = {}
    for spec in source.specs:
        flat = np.empty(math.prod(spec.shape), np.dtype(spec.dtype))
        out[spec.name] = source.read_into(spec.name, 0, flat).reshape(spec.shape)
    return out


class _Link:
    """One envoy's calls to the simulated director, as ``envoy/client.EnvoyClient`` makes them over gRPC."""

    def __init__(self, envoys: VirtualEnvoys, envoy: str):
        self.envoys, self.envoy_name = envoys, envoy

    def round_model(self, experiment: str, round_: int) -> dict[str, np.ndarray]:
        model = self.envoys.round_model(round_)
        self.envoys.run.traffic.count(self.envoy_name, sum(a.nbytes for a in model.values()), upload=False)
        return model

    def check_in(self, experiment: str, round_: int, divergence: float) -> bool:
        return self.envoys.check_in(self.envoy_name, round_, divergence)

    def upload(self, experiment: str, round_: int, sample_count: int, tensors: Mapping[str, np.ndarray],
               encodings: Mapping[str, r.Encoding]) -> None:
        self.envoys.upload(self.envoy_name, round_, sample_count, tensors, encodings)

    # the runner's Reports: sent as they come, nothing to wait for
    def send(self, experiment: str, round_: int, stage: str, metrics: dict[str, dict[str, float]],
             sample_count: int) -> None:
        self.envoys.report(self.envoy_name, round_, stage, metrics, sample_count)

    def wait(self, raise_first: bool = True) -> None:
        pass


class VirtualEnvoys:
    """The envoys of one simulated experiment."""

    def __init__(self, director: SimulatedDirector, experiment: str, objects: dict[str, Any], vectorize: bool = True,
                 max_cohort: int = 256):
        from fedjax_core.runtime.model_tensors import canonicalize

        self.director, self.experiment = director, experiment
        self.model_interface = objects["model_interface"]
        self.ti, self.data = objects["task_interface"], objects["data_interface"]
        self.template = canonicalize(self.model_interface.model)
        self.fresh_opt_state = OptimizerInit()  # one compiled init for every envoy
        self.runners: dict[str, RoundRunner] = {}
        self.cohort = Cohort(self.ti, self.model_interface.optimizer) if vectorize and vectorizable(self.ti) else None
        self.max_cohort = max_cohort
        self.run: Run | None = None
        self._model: tuple[int, dict[str, np.ndarray]] | None = None  # (round, the round's model)

    def play(self, run: Run, asked: list[tuple[str, r.Task]]) -> None:
        """The tasks ``run``'s round asks for: TRAIN and VALIDATE ones as vectorised cohorts (at most ``max_cohort``
        envoys each) when every task is vectorised, the others envoy by envoy; stops when the round closes."""
        self.run = run
        if self.cohort is not None:
            together = [(e, t) for e, t in asked if t.kind in (r.TaskKind.TRAIN, r.TaskKind.VALIDATE)]
            asked = [(e, t) for e, t in asked if t.kind not in (r.TaskKind.TRAIN, r.TaskKind.VALIDATE)]
            for first in range(0, len(together), self.max_cohort):
                chunk = together[first:first + self.max_cohort]
                try:
                    self.cohort.play([self._runner(e) for e, _ in chunk], [t for _, t in chunk],
                                     lambda envoy, exc: self._drop(run, envoy, exc))
                except Exception as exc:
                    raise CohortError(
                        f"the vectorised tasks cannot run as one cohort ({type(exc).__name__}: {exc}): a task "
                        "registered with vectorized=True must be a pure JAX function of its state and data (no "
                        "float() or Python branches on values, metrics returned as arrays); register the tasks "
                        "without vectorized=True to run them envoy by envoy") from exc
                if not self.director.is_current(run):
                    return
        for envoy, task in asked:
            try:
                self._runner(envoy).run_round(task)
            except Exception as exc:
                self._drop(run, envoy, exc)
            if not self.director.is_current(run):
                return

    def _drop(self, run: Run, envoy: str, exc: BaseException) -> None:
        """A task that raised drops its envoy out of the round, as a worker's failure does."""
        text = "".join(traceback.format_exception(exc))
        error = limits.clip_error(f"{type(exc).__name__}: {exc}\n{text[-3000:]}")
        if self.director.is_current(run) and run.state.owes(envoy):
            self.director.act(run, Dropped(envoy, "failed", error))

    def release(self) -> None:
        """Between rounds: each envoy keeps only what its next round needs, on the host."""
        keep_local = (self.run is not None and (self.run.spec.opt_treatment == r.OptTreatment.CONTINUE_LOCAL
                                                or self.run.spec.communication.sync != SyncMode.EVERY_ROUND))
        import jax

        for runner in self.runners.values():
            runner.global_state = None
            if keep_local:
                runner.local_state = jax.device_get(runner.local_state)
            else:
                runner.local_state, runner.global_tensors = runner.template, None
        self._model = None

    def _runner(self, envoy: str) -> RoundRunner:
        runner = self.runners.get(envoy)
        if runner is None:
            data = copy.copy(self.data)  # each envoy's own, as each worker unpickles its own
            data.shard_descriptor = self.director.shards[envoy]
            link = _Link(self, envoy)
            runner = RoundRunner(link, link, self.experiment, self.template, self.model_interface.optimizer, self.ti,
                                 data, "cpu", fresh_opt_state=self.fresh_opt_state, log=lambda text: None)
            self.runners[envoy] = runner
        return runner

    # ------------------------------------------------------------------ what the director takes
    def round_model(self, round_: int) -> dict[str, np.ndarray]:
        """The tensors of the round's model that travel (the director sends only those, as the opt treatment says)."""
        if self._model is None or self._model[0] != round_:
            model = arrays_of(self.director.models.model(self.experiment, round_))
            self._model = (round_, {name: a for name, a in model.items() if name in self.run.upload})
        return self._model[1]

    def report(self, envoy: str, round_: int, stage: str, metrics: dict[str, dict[str, float]],
               sample_count: int) -> None:
        run = self.run
        reported = tuple(r.Metric(task, name, value) for task, values in metrics.items()
                         for name, value in values.items())
        limits.check_metrics(envoy, reported)
        weight = self.director.engine.report_weight(run, envoy, stage, sample_count)
        event = r.MetricEvent(round=round_, envoy=envoy, stage=r.Stage(stage), metrics=reported,
                              timestamp=time.time())
        self.director.record(self.experiment, event, weight=weight)
        if stage == r.Stage.AGGREGATED:
            self.director.validated(run, envoy)

    def check_in(self, envoy: str, round_: int, divergence: float) -> bool:
        run = self.run
        if not (math.isfinite(divergence) and divergence >= 0):
            raise InvalidRequestError(f"envoy {envoy!r} reported divergence {divergence}: a squared distance is a "
                                      "finite number >= 0 (NaN or infinity: training diverged)")
        self.director.act(run, CheckedIn(envoy, divergence))
        self.director.record(self.experiment, r.MetricEvent(
            round=round_, envoy=envoy, stage=r.Stage.SYNC_CHECK, timestamp=time.time(),
            metrics=(r.Metric("sync", "divergence", divergence),)))
        return run.state.must_upload(envoy)

    def upload(self, envoy: str, round_: int, sample_count: int, tensors: Mapping[str, np.ndarray],
               encodings: Mapping[str, r.Encoding]) -> None:
        """Decode, check and keep ``envoy``'s update, as the director's transfers and round engine do."""
        run = self.run
        weight = self.director.engine.weight(run, envoy, sample_count)
        specs = [r.TensorSpec(name, np.asarray(a).dtype.name, tuple(np.shape(a)), encodings.get(name))
                 for name, a in tensors.items()]
        codecs.check_update_encodings(specs, run.spec.communication.compression,
                                      run.spec.communication.send_deltas)
        model = self.round_model(round_)
        decoded = {}
        for name, wire in tensors.items():
            encoding = encodings.get(name)
            delta = encoding is not None and encoding.delta
            decoded[name] = codecs.decode(np.asarray(wire), encoding, model[name] if delta else None)
            if is_float_dtype(decoded[name].dtype):
                check_finite(name, decoded[name])
        run.updates.add(Upload(envoy, weight, ArraySource(decoded)))
        run.traffic.count(envoy, sum(np.asarray(a).nbytes for a in tensors.values()), upload=True)
        self.director.act(run, UpdateStored(envoy))

