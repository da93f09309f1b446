"""The director's side of a simulation, in the notebook's own process.

:class:`SimulatedDirector` answers what ``FLExperiment`` asks of a federation's client (submit,
status, events, models, cancel, the registry) and runs each experiment on a thread of its own
with the director's own parts: the spec checks (``submission.py``), the round machine, the
round engine (sampling, metric aggregation, the best model, closing rounds through the
strategies) on an in-memory :class:`~fedjax_core.director.memory_store.MemoryStore` and
:class:`~fedjax_core.director.round_models.MemoryRoundModels`. Each round's participants run
their tasks in turn through the workers' own :class:`~fedjax_core.runtime.round_runner.RoundRunner`
(:mod:`fedjax_core.simulation.envoys`), so a simulation trains to the model a federation of the
same shards would.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np

from fedjax_core import bundle as bundle_io
from fedjax_core import records as r
from fedjax_core.director import round_machine
from fedjax_core.director.catalog import STATUS_ROUNDS, status_of
from fedjax_core.director.memory_store import MemoryStore
from fedjax_core.director.round_machine import (CloseRound, Completed, Effect, Failed, Finish, Note,
                                                Validated)
from fedjax_core.director.round_models import MemoryRoundModels
from fedjax_core.director.rounds import Run, RoundEngine
from fedjax_core.director.submission import check_submission
from fedjax_core.errors import InvalidRequestError, NotFoundError, PreconditionError
from fedjax_core.metrics_log import Loggers
from fedjax_core.shard_descriptor import ShardDescriptor, checked_description
from fedjax_core.simulation.envoys import VirtualEnvoys, arrays_of
from fedjax_core.spec import ExperimentSpec

log = logging.getLogger("fedjax.simulation")


class SimulatedDirector:
    """A director and its envoys in one process; the same methods as ``api.client.FederationClient``."""

    def __init__(self, shards: Mapping[str, ShardDescriptor], vectorize: bool = True, max_cohort: int = 256,
                 ray: Any = None):
        self.shards = dict(shards)
        self.vectorize, self.max_cohort = vectorize, max_cohort
        self.ray = ray  # a ray_backend.RayEnvoyHosts, or None: every task runs in this process
        self.store = MemoryStore()
        self.models = MemoryRoundModels()
        self.loggers = Loggers(Path("."), sinks=[])  # events stay in the store; the notebook's stream writes them
        self.engine = RoundEngine(self.store, None, self.loggers, time.time, models=self.models)
        self._changed = threading.Condition()
        self._lock = threading.RLock()  # one step of a round at a time: the experiment's thread, or a cancel
        self._runs: dict[str, Run] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._closed = False
        shapes = {(tuple(s.sample_shape), tuple(s.target_shape)) for s in self.shards.values()}
        if len(shapes) != 1:
            raise ValueError(f"the shards' sample and target shapes differ ({sorted(shapes)[:3]}): every envoy of a "
                             "federation holds samples of one shape")
        (self._sample_shape, self._target_shape), = shapes
        for name, shard in self.shards.items():
            self.store.upsert_envoy(name, r.ShardInfo(**checked_description(shard), hostname="simulation",
                                                      devices=("cpu",)))

    # ------------------------------------------------------------------ what FLExperiment asks
    def dataset_info(self) -> tuple[list[str], list[str]]:
        return list(self._sample_shape), list(self._target_shape)

    def shard_registry(self) -> list[r.EnvoyEntry]:
        busy = {envoy: name for name, run in list(self._runs.items()) for envoy in run.state.envoys}
        return [r.EnvoyEntry(name=name, shard_info=info, is_online=True, last_seen=seen,
                             current_experiment=busy.get(name, "")) for name, info, seen in self.store.envoys()]

    def experiments(self) -> list[r.ExperimentStatus]:
        return [row.status(self.store.participants(row.name, last=STATUS_ROUNDS)) for row in self.store.experiments()]

    def status(self, name: str) -> r.ExperimentStatus:
        row = self.store.experiment(name)
        if row is None:
            raise NotFoundError(f"no experiment named {name!r} in this simulation")
        return status_of(self.store, row)

    def submit(self, spec: ExperimentSpec, bundle: bytes, tensors: Mapping[str, np.ndarray]) -> int:
        """Check and keep the experiment, then run it on a thread of its own; returns 0 (it starts now)."""
        if self._closed:
            raise PreconditionError("this SimulatedFederation is closed; make a new one")
        check_submission(spec, set(self.store.envoy_names()))
        if spec.secure.enabled:
            raise InvalidRequestError("SimulatedFederation does not run secure aggregation: its envoys share one "
                                      "process, so masking hides nothing from it. Simulate the experiment without "
                                      "secure_aggregation (the sum it unmasks is the same up to its quantisation, "
                                      "docs/privacy.md); `make bench` measures the protocol's cost")
        payload = bundle_io.parse(bundle).payload
        objects = cloudpickle.loads(payload)  # the notebook's own code, in its own process
        self.store.add_experiment(spec, state=r.State.QUEUED)  # a name taken raises AlreadyExistsError
        with self.models.model_writer(spec.name, 0) as writer:
            for name, array in tensors.items():
                writer.add_array(name, np.asarray(array))
            writer.commit()
        thread = threading.Thread(target=self._run, args=(spec.name, objects, payload), name=f"simulation-{spec.name}",
                                  daemon=True)
        self._threads[spec.name] = thread
        thread.start()
        return 0

    def events(self, name: str, timeout_s: float | None = None) -> Iterator[r.MetricEvent]:
        """Every event of ``name`` from the start, then new ones as the rounds run, ending with a 'done' event
        (or, after ``timeout_s``, without one: the caller decides whether to wait longer)."""
        self.status(name)  # NotFoundError for an unknown name
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        after = 0
        while True:
            with self._changed:
                rows = self.store.events(name, after_id=after)
                if not rows:
                    status = self.status(name)
                    if status.state in r.TERMINAL_STATES:
                        yield r.MetricEvent(round=status.current_round, envoy="", stage="", experiment_done=True,
                                            state=status.state, timestamp=time.time())
                        return
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return
                    self._changed.wait(left)
                    continue
            for id_, event, _ in rows:
                after = id_
                yield event

    def model(self, name: str, which: str) -> dict[str, np.ndarray]:
        """``name``'s best or last model, as named arrays."""
        status = self.status(name)
        if which == "best":
            found = self.models.best(name)
            if found is None:
                raise PreconditionError(f"experiment {name!r} has no best model yet: one exists once an aggregated "
                                        "model was validated")
            return arrays_of(found)
        if which == "last":
            return arrays_of(self.models.model(name, status.current_round))
        raise InvalidRequestError(f"model {which!r}: ask for 'best' or 'last'")

    def cancel(self, name: str) -> r.ExperimentStatus:
        """Stop ``name``: the participant training now finishes its task, nothing after it runs."""
        status = self.status(name)
        if status.state in r.TERMINAL_STATES:
            raise PreconditionError(f"experiment {name!r} is {status.state}; only queued or running ones can be "
                                    "cancelled")
        run = self._runs.get(name)
        if run is None:
            self._end(name, r.State.CANCELLED, "cancelled by the notebook API")
        else:
            self.act(run, round_machine.Cancelled("cancelled by the notebook API"))
        return self.status(name)

    def close(self) -> None:
        """Cancel what runs and wait for the experiments' threads."""
        self._closed = True
        for name, run in list(self._runs.items()):
            self.act(run, round_machine.Cancelled("the SimulatedFederation was closed"))
        for thread in list(self._threads.values()):
            thread.join()
        if self.ray is not None:
            self.ray.close()

    # ------------------------------------------------------------------ the rounds
    def _run(self, name: str, objects: dict[str, Any], payload: bytes) -> None:
        try:
            row = self.store.experiment(name)
            envoys = row.spec.envoys or tuple(self.store.envoy_names())
            sizes = {e: (info.train_size, info.valid_size) for e, (info, _) in
                     ((e, self.store.envoy(e)) for e in envoys)}
            row = dataclasses.replace(row, state=r.State.RUNNING, envoys=envoys, envoy_sizes=sizes)
            self.store.update_experiment(name, state=r.State.RUNNING, envoys=envoys, started_at=time.time(),
                                         envoy_sizes=sizes)
            self._runs[name] = run = self.engine.new_run(row, 0)
            cohort = VirtualEnvoys(self, name, objects, payload, self.vectorize, self.max_cohort, self.ray)
            try:
                while run is not None:
                    run = self._play(run, cohort)
            finally:
                cohort.close()
        except Exception as exc:  # the simulation's own error: the experiment fails and says why
            log.exception("simulated experiment %r failed", name)
            run = self._runs.get(name)
            if run is not None:
                self.act(run, Failed(f"the simulation failed: {type(exc).__name__}: {exc}"))
            else:
                self._end(name, r.State.FAILED, f"the simulation failed: {type(exc).__name__}: {exc}")

    def _play(self, run: Run, cohort: VirtualEnvoys) -> Run | None:
        """Run every task ``run``'s round asks for, in envoy order, until it closes; the next round's run."""
        while self._runs.get(run.name) is run and not run.ended:
            asked = [(envoy, task) for envoy in run.state.participants
                     if (task := run.task_for(envoy)).kind not in (r.TaskKind.NONE, r.TaskKind.FINISHED)]
            if not asked:
                raise RuntimeError(f"round {run.round} of {run.name!r} waits for nothing and did not close")
            cohort.play(run, asked)
        cohort.release()
        return self._runs.get(run.name)

    def act(self, run: Run, event: round_machine.Event) -> tuple[Effect, ...]:
        """Step ``run``'s round with ``event`` and carry out the effects, as the director's ``act`` and ``after``."""
        with self._lock:
            return self._act(run, event)

    def _act(self, run: Run, event: round_machine.Event) -> tuple[Effect, ...]:
        if self._runs.get(run.name) is not run:
            return ()  # ended (cancelled, failed) while the event was on its way
        state, effects = round_machine.step(run.state, event)
        run.state = state
        for effect in effects:
            if isinstance(effect, Note):
                self.record(run.name, r.MetricEvent(round=run.round, envoy=effect.envoy, stage=r.Stage.DROPOUT,
                                                    note=effect.text, timestamp=time.time()))
            elif isinstance(effect, Finish):
                self._runs.pop(run.name, None)
                self._end(run.name, effect.state, effect.error)
            elif isinstance(effect, CloseRound):
                self._close(run)
        self._notify()
        return effects

    def is_current(self, run: Run) -> bool:
        return self._runs.get(run.name) is run

    def validated(self, run: Run, envoy: str) -> None:
        self.act(run, Validated(envoy))

    def _close(self, run: Run) -> None:
        outcome = self.engine.close(run)
        if outcome is None:
            return
        if outcome.next_run is not None:
            self._runs[run.name] = outcome.next_run
            self.models.drop(run.name, run.round)
        else:
            self._act(run, Failed(outcome.error) if outcome.state == r.State.FAILED else Completed())

    def record(self, name: str, event: r.MetricEvent, weight: float = 0.0) -> None:
        self.store.add_event(name, event, weight=weight)
        self._notify()

    def _end(self, name: str, state: str, error: str) -> None:
        self.store.update_experiment(name, state=state, error=error, finished_at=time.time())
        if error:
            log.warning("simulated experiment %r %s: %s", name, state, error)
        self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()
