"""The director: owns the lock, the running experiments, and carries out what their rounds decide.

Each running experiment has a :class:`~fedjax_core.director.rounds.Run` whose round is a pure
state machine (round_machine.py). A request or a passing deadline becomes an event; under the
lock the director steps the machine and applies the quick effects (finishing the experiment,
keeping a shrunk envoy list, starting queued experiments), then outside it the heavy ones
(closing the round, recording dropout notes, cleaning up). Around it: the envoy registry
(registry.py), the queue (scheduler.py), transfers (transfers.py), the round engine and
closer (rounds.py), the deadline watch (deadlines.py) and the notebook's reads (catalog.py).

One condition variable guards the runs and wakes every waiter (envoy streams, worker
long-polls, metric streams) the moment something changes; nothing sleeps a fixed time.
Lock order: a run's ``keep_lock``, then the condition; never the other way round.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from fedjax_core import records as r
from fedjax_core.director import limits, retention, round_machine, scheduler, transfers
from fedjax_core.director.audit import AuditTrail
from fedjax_core.director.catalog import Catalog
from fedjax_core.director.deadlines import DeadlineWatch
from fedjax_core.director.files import ExperimentFiles
from fedjax_core.director.registry import EnvoyRegistry
from fedjax_core.director.round_machine import (Cancelled, CloseRound, Completed, Effect, Failed, Finish, KeepEnvoys,
                                                Note, Resumed)
from fedjax_core.director.rounds import Outcome, RoundEngine, Run
from fedjax_core.director.store import ExperimentRow, SqliteStore
from fedjax_core.director.store_api import Store
from fedjax_core.director.uploads import Uploads
from fedjax_core.director.worker_calls import WorkerCalls
from fedjax_core.director.submission import check_submission
from fedjax_core.errors import InvalidRequestError, PreconditionError, is_disk_full
from fedjax_core.metrics_log import Loggers
from fedjax_core.sinks import SinkFactory
from fedjax_core.spec import ExperimentSpec
from fedjax_core.tensors import nbytes_of

log = logging.getLogger("fedjax.director")
LOGGED_ENVOYS = 20  # an experiment's start names this many of its envoys in the log (the status has them all)


class Director:
    def __init__(self, state_dir: Path, log_dir: Path, sample_shape: Iterable[str], target_shape: Iterable[str],
                 health_check_period: float = 5.0, clock: Callable[[], float] = time.time,
                 timer: Callable[[], float] = time.monotonic, max_model_bytes: int = limits.MAX_MODEL_BYTES,
                 admins: Iterable[str] = (), envoy_timeout_s: float = 60.0, keep_experiments: int | None = None,
                 metric_sinks: Sequence[SinkFactory] | None = None, store: Store | None = None,
                 audit_log: Path | None = None):
        """``store``: the director's state (default: the SQLite database under ``state_dir``); a simulation passes
        a :class:`~fedjax_core.director.memory_store.MemoryStore`. The director closes it when it closes.
        ``audit_log``: a file the audit trail is also appended to, as JSON lines (settings.audit_log)."""
        self.state_dir = Path(state_dir)
        self.max_model_bytes = max_model_bytes
        self.keep_experiments = keep_experiments  # ended experiments whose files stay (None: all)
        self.clock = clock
        self.store = store if store is not None else SqliteStore(self.state_dir / "director.sqlite")
        for name in self.store.abandon_submissions():  # cut off by a crash: never queued
            log.warning("dropping experiment %r: its submission did not complete before the director stopped", name)
        self.audit = AuditTrail(self.store, clock, audit_log)
        self.files = ExperimentFiles(self.state_dir)
        for row in self.store.experiments():
            for path in self.files.sweep(row.name, row.current_round):
                log.info("removed %s: left behind by a director that stopped", path)
        self.loggers = Loggers(Path(log_dir), metric_sinks)  # None: TensorBoard under log_dir; []: no sink
        self._collect()
        self.engine = RoundEngine(self.store, self.files, self.loggers, clock, timer)
        self.registry = EnvoyRegistry(self.store, tuple(sample_shape), tuple(target_shape), health_check_period,
                                      clock, timer)
        self.lock = threading.Condition()
        self.catalog = Catalog(self.store, self.files, self.registry, frozenset(admins), self._working_on,
                               self.lock, clock, is_running=lambda name: name in self._runs)
        self.workers = WorkerCalls(self)
        self.uploads = Uploads(self)
        self._listeners: list[Callable[[str | None], None]] = []
        self._runs: dict[str, Run] = {}  # running experiments by name
        self._closed = False
        self._waiting = scheduler.WaitLog()
        self._resume()
        with self.lock:
            self._start_next()
        self.deadlines = DeadlineWatch(self.lock, self.runs, self.registry.silent_until,
                                       envoy_timeout_s, timer, lambda: self._closed, self.act, self.after,
                                       self._fail_on_background_error)
        self.deadlines.start()

    def subscribe(self, listener: Callable[[str | None], None]) -> None:
        """Call ``listener(envoy)`` on every change a long-poll may wait for (under the lock, from any thread;
        it must only schedule work): ``envoy`` when only that envoy's answers changed, None for everyone."""
        self._listeners.append(listener)

    def changed(self, envoy: str | None = None) -> None:
        """Under the lock: wake what waits for a change (the deadline watch, subscribed long-polls)."""
        self.lock.notify_all()  # the only notify: every change goes through here
        for listener in self._listeners:
            listener(envoy)

    @property
    def closed(self) -> bool:
        return self._closed

    def wake_all(self) -> None:
        """Release every waiter: the director is shutting down."""
        with self.lock:
            self._closed = True
            self.changed()

    def close(self) -> None:
        self.wake_all()
        self.loggers.close()
        self.store.close()

    # ------------------------------------------------------------------ envoys
    def register_envoy(self, name: str, info: r.ShardInfo, instance_id: str = "") -> float:
        """Register (or re-register) envoy ``name``; a queued experiment may have waited for it."""
        self.registry.register(name, info, instance_id)
        with self.lock:
            self._start_next()
        return self.registry.health_check_period

    def heartbeat_in_memory(self, name: str, instance_id: str = "") -> bool:
        """True when the heartbeat was taken from memory alone (cheap enough for the event loop); else call
        :meth:`heartbeat`."""
        return self.registry.heartbeat_in_memory(name, instance_id)

    def heartbeat(self, name: str, instance_id: str = "") -> bool:
        """Keep ``name`` online; False (register again) if unknown or held by another daemon."""
        known, came_online = self.registry.heartbeat(name, instance_id)
        if came_online:  # only an envoy coming (back) online can unblock a queued experiment
            with self.lock:
                self._start_next()
        return known

    def _working_on(self, envoy: str) -> list[str]:
        return [run.name for run in self.runs() if envoy in run.state.envoys]

    def runs(self) -> list[Run]:
        """The running experiments' runs (a copy: safe to read without the lock)."""
        return list(self._runs.values())

    def run(self, experiment: str) -> Run | None:
        """``experiment``'s run while it runs."""
        return self._runs.get(experiment)

    # -------------------------------------------------------------- experiments
    def submit_experiment(self, spec: ExperimentSpec, bundle: Iterable[bytes],
                          chunks: Iterable[r.TensorChunk]) -> int:
        """Store a new experiment (code bundle + initial model) and queue it; returns its queue position."""
        check_submission(spec, set(self.store.envoy_names()))
        size = sum(nbytes_of(tensor) for tensor in spec.model_spec)
        if size > self.max_model_bytes:
            raise InvalidRequestError(f"the model is {size / 2**30:.2f} GiB; this director takes at most "
                                      f"{self.max_model_bytes / 2**30:.2f} GiB (settings.max_model_bytes)")
        self.store.add_experiment(spec, state=r.State.SUBMITTING)  # claims the name (UNIQUE)
        try:
            size, digest = transfers.store_submission(self.files, spec, bundle, chunks)
        except BaseException:
            self.store.delete_experiment(spec.name)
            raise
        log.info("experiment %r submitted by %r: bundle of %d bytes, sha256 %s", spec.name, spec.submitter,
                 size, digest)
        with self.lock:
            self.store.update_experiment(spec.name, state=r.State.QUEUED, bundle_sha256=digest)
            self._start_next()
            self.changed()
        queued = [row.name for row in self.store.experiments(r.State.QUEUED)]
        return queued.index(spec.name) + 1 if spec.name in queued else 0

    def cancel_experiment(self, name: str, by: str | None = None) -> r.ExperimentStatus:
        """Stop a queued or running experiment; a running one's workers are told it is over.

        ``by`` is the caller's certificate name under mTLS (None in plaintext, on loopback only).
        """
        effects: tuple[Effect, ...] = ()
        with self.lock:
            row = self.catalog.row(name)
            self.catalog.check_owner(row, by, "cancel it")
            if row.state in r.TERMINAL_STATES or row.state == r.State.SUBMITTING:
                raise PreconditionError(f"experiment {name!r} is {row.state}; only queued or running ones can be cancelled")
            reason = f"cancelled by {by}" if by else "cancelled by the notebook API"
            run = self._runs.get(name)
            if run is not None:
                effects = self.act(run, Cancelled(reason))
            else:
                self.store.update_experiment(name, state=r.State.CANCELLED, error=reason, finished_at=self.clock())
                self.changed()
        if run is not None:
            self.after(run, effects)
        return self.catalog.experiment_status(name)

    def _resume(self) -> None:
        """Pick up the experiments that were running when the director stopped."""
        for row in self.store.experiments(r.State.RUNNING):
            try:
                self._runs[row.name] = self.engine.rebuild(row)
            except Exception as exc:  # a run that cannot be rebuilt must not block the director
                self._fail_unstartable(row, exc)
        for run in self.runs():  # once every run is back, so a close that ends one sees the others' envoys busy
            with self.lock:
                effects = self.act(run, Resumed())  # every result may have arrived before the restart
            self.after(run, effects)

    def _start_next(self) -> None:
        """Under the lock: start every queued experiment whose envoys are online and have room for it, in
        submission order; one that waits does not hold up the ones behind it."""
        if self._closed:
            return
        queued = self.store.experiments(r.State.QUEUED)
        if not queued:  # as each of a thousand envoys registers: reading every envoy's shard info for nothing
            return
        online = self.registry.online()
        load = scheduler.load_of(run.state.envoys for run in self._runs.values())
        started = False
        for row in queued:
            decision = scheduler.decide(row.spec.envoys, online, load)
            if decision.wait:
                self._waiting.waits(row.name, decision.wait)
            elif self._start(row, decision.envoys):
                load.update(decision.envoys)
                started = True
        if started:
            self.changed()

    def _start(self, row: ExperimentRow, envoys: tuple[str, ...]) -> bool:
        row = dataclasses.replace(row, state=r.State.RUNNING, envoys=envoys, envoy_sizes=self.registry.sizes(envoys))
        try:
            run = self.engine.new_run(row, 0)
        except InvalidRequestError as exc:
            if not row.spec.envoys:  # sized on the envoys online now: more may come
                self._waiting.waits(row.name, str(exc))
            else:
                self._fail_unstartable(row, exc)
            return False
        except Exception as exc:
            self._fail_unstartable(row, exc)
            return False
        self.store.update_experiment(row.name, state=r.State.RUNNING, envoys=envoys, started_at=self.clock(),
                                     envoy_sizes=row.envoy_sizes)
        self._runs[row.name] = run
        self._waiting.started(row.name)
        more = len(envoys) - LOGGED_ENVOYS
        shown = ", ".join(envoys[:LOGGED_ENVOYS]) + (f" and {more} more" if more > 0 else "")
        log.info("experiment %r started on %d envoys: %s", row.name, len(envoys), shown)
        return True

    def _fail_unstartable(self, row: ExperimentRow, exc: Exception) -> None:
        log.error("experiment %r cannot run: %s", row.name, exc)
        self.store.update_experiment(row.name, state=r.State.FAILED, error=f"the director cannot run it: {exc}",
                                     finished_at=self.clock())

    # ------------------------------------------------------------------ effects
    def act(self, run: Run, event: round_machine.Event) -> tuple[Effect, ...]:
        """Under the lock: step ``run``'s round with ``event`` and apply the quick effects; the caller passes
        the result to :meth:`after` once it has let the lock go. Raises what the round refuses."""
        if isinstance(event, round_machine.DeadlinePassed) and self._secure_in_progress(run):
            return self._secure_deadline(run)
        return self._step(run, event) + self.advance_secure(run)

    def _step(self, run: Run, event: round_machine.Event) -> tuple[Effect, ...]:
        before = run.state
        state, effects = round_machine.step(before, event)
        try:
            for effect in effects:
                if isinstance(effect, KeepEnvoys):  # stored first: a failed write leaves the round as it was
                    row = dataclasses.replace(run.row, envoys=effect.envoys)
                    plan = self.engine.plan(row)
                    self.store.update_experiment(run.name, envoys=effect.envoys)
                    run.row, run.plan = row, plan
            run.state = state
            for effect in effects:
                if isinstance(effect, Finish):
                    self._finish(run, effect)
        finally:  # one envoy's result changes only its own answers, unless the round moved on for everyone
            everyone = bool(effects) or state.triggered != before.triggered or not hasattr(event, "envoy")
            self.changed(None if everyone else event.envoy)
        return effects

    @staticmethod
    def _secure_in_progress(run: Run) -> bool:
        return run.secure is not None and run.state.kind == r.TaskKind.TRAIN and run.state.open

    def _secure_deadline(self, run: Run) -> tuple[Effect, ...]:
        """A secure round's deadline drops those that have not taken the protocol's current step; the others go on
        with it, as min_envoys allows, under a deadline as long again from now."""
        step = run.secure.current_step
        run.secure.deadline_rearmed_at = self.engine.timer()
        effects: tuple[Effect, ...] = ()
        for envoy in sorted(run.state.pending - run.secure.done[step]):
            if run.state.open and run.state.owes(envoy):
                effects += self._step(run, round_machine.Dropped(
                    envoy, "was late", f"it had not sent its secure aggregation {step} by the round's deadline "
                    f"({run.state.timeout_s:g}s)"))
        return effects + self.advance_secure(run)

    def advance_secure(self, run: Run) -> tuple[Effect, ...]:
        """Under the lock: move the round's secure aggregation on once every participant still in the round took
        its step; when the round can no longer be unmasked, count those left as done so that it closes."""
        if not self._secure_in_progress(run):
            return ()
        state = run.state
        moved, finish = run.secure.advance(state.members - frozenset(state.dropped))
        if moved:
            self.changed()
        effects: tuple[Effect, ...] = ()
        for envoy in finish:  # stepped one by one here: no recursion through act, however many are left
            if run.state.open and run.state.owes(envoy):
                effects += self._step(run, round_machine.UpdateStored(envoy))
        return effects

    def _finish(self, run: Run, finish: Finish) -> None:
        """Under the lock: ``run``'s experiment ended; its envoys' room goes to the queue."""
        if self._runs.get(run.name) is run:
            del self._runs[run.name]
        try:
            self.store.update_experiment(run.name, state=finish.state, error=finish.error, finished_at=self.clock())
            if finish.error:
                log.warning("experiment %r %s: %s", run.name, finish.state, finish.error)
        finally:
            self._start_next()

    def after(self, run: Run, effects: tuple[Effect, ...]) -> None:
        """Outside the lock: record dropout notes, close the round, or clean up an ended experiment."""
        for effect in effects:
            if isinstance(effect, Note):
                log.warning("experiment %r: %s", run.name, effect.text)
                event = r.MetricEvent(round=run.round, envoy=effect.envoy, stage=r.Stage.DROPOUT, note=effect.text,
                                      timestamp=self.clock())
                if self.store.add_event(run.name, event):
                    self.loggers.log(run.name, event)
                with self.lock:
                    self.changed()  # metric streams see the event
            elif isinstance(effect, CloseRound):
                self._close(run)
            elif isinstance(effect, Finish):
                self.cleanup(run)

    def _close(self, run: Run) -> None:
        """Close ``run``'s round outside the lock, then install the next round or end the experiment."""
        try:
            with run.keep_lock:  # waits for an update being kept; later ones find the round closing
                outcome = None if run.ended else self.engine.close(run)
        except Exception as exc:
            log.exception("closing round %d of %r failed", run.round, run.name)
            why = (f"the director's disk is full ({exc.strerror}, under {self.state_dir}): free space there and submit "
                   "the experiment again; its last model and metrics are kept" if is_disk_full(exc) else str(exc))
            outcome = Outcome(state=r.State.FAILED, error=f"closing round {run.round} failed: {why}")
        if outcome is None:  # the experiment ended meanwhile
            self.cleanup(run)
            return
        if outcome.next_run is not None:
            self.workers.prepare(outcome.next_run)
        with self.lock:
            if self._runs.get(run.name) is run and not run.ended:
                if outcome.next_run is not None:
                    self._runs[run.name] = outcome.next_run
                else:
                    self.act(run, Failed(outcome.error) if outcome.state == r.State.FAILED else Completed())
            self.changed()
        if outcome.next_run is None or run.ended:  # finished, failed, or cancelled while it closed
            self.cleanup(run)
        else:  # nobody can ask for round r's files now: the current run is round r + 1
            self.files.retire_round(run.name, run.round)
            self.engine.models.drop(run.name, run.round)

    def cleanup(self, run: Run) -> None:
        """Drop an ended run's kept updates and close its writers. Without the lock.

        If an update being kept or the close holds the run's ``keep_lock``, it is left to that thread:
        each calls this again after releasing the lock, and finds the run ended, which is set first.
        """
        if not run.keep_lock.acquire(blocking=False):
            return
        try:
            self.store.drop_updates(run.name, run.round)
            self.files.drop_round(run.name, run.round)
            self.files.drop_spares(run.name)
        finally:
            run.keep_lock.release()
        self.loggers.close(run.name)
        self.workers.forget(run.name)
        self._collect()

    def _collect(self) -> None:
        """Bound disk use: remove the files of ended experiments beyond settings.keep_experiments."""
        if self.keep_experiments is not None:
            retention.collect(self.store, self.files, self.keep_experiments)

    def fail(self, run: Run, error: str) -> None:
        """``run``'s experiment fails with ``error`` (the director hit it); the director serves on."""
        effects: tuple[Effect, ...] = ()
        with self.lock:
            if self._runs.get(run.name) is run:
                effects = self.act(run, Failed(error))
            elif run.name not in self._runs:  # ended in memory, but perhaps not on disk: that write may have failed
                row = self.store.experiment(run.name)
                if row is not None and row.state == r.State.RUNNING:
                    self.store.update_experiment(run.name, state=r.State.FAILED, error=error,
                                                 finished_at=self.clock())
                self.changed()
        self.after(run, effects)
        if run.ended or self._runs.get(run.name) is not run:
            self.cleanup(run)  # not a superseded round's run of an experiment that goes on: its metrics stay open

    def _fail_on_background_error(self, run: Run, exc: Exception) -> None:
        full = is_disk_full(exc) or "full" in str(exc)
        error = (f"the director hit an error while watching round {run.round}'s deadline and heartbeats: "
                 f"{type(exc).__name__}: {exc}" + (f" (is its disk under {self.state_dir} full?)" if full else ""))
        try:
            self.fail(run, error)
        except Exception:  # the database cannot take it either: it is over in memory, and logged
            log.exception("could not record that experiment %r failed: %s", run.name, error)
            with self.lock:
                run.state = dataclasses.replace(run.state, phase=round_machine.Phase.ENDED)
                if self._runs.get(run.name) is run:
                    del self._runs[run.name]
                    self._start_next()
                self.changed()
            try:
                self.cleanup(run)
            except Exception:
                log.exception("could not clean up after experiment %r", run.name)
