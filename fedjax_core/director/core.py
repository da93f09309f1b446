"""The director: a thin facade over the registry, the submission checks and the round engine.

One condition variable guards the in-memory run state and wakes every waiter (envoy
streams, worker long-polls, metric streams) the moment something changes; nothing sleeps a
fixed time. It is held only for state transitions: folding updates, closing rounds,
writing models and TensorBoard events run outside it (see rounds.py), so heartbeats and
registry reads answer while a round closes. Lock order: a run's ``fold_lock``, then the
condition; never the other way round.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from fedjax_core import codecs
from fedjax_core import records as r
from fedjax_core.director import limits, retention, rules
from fedjax_core.director.files import ExperimentFiles, write_bundle
from fedjax_core.director.rounds import Outcome, RoundEngine, Run
from fedjax_core.director.store import ExperimentRow, Store
from fedjax_core.director.submission import check_header, check_name
from fedjax_core.errors import (AlreadyExistsError, FedError, InvalidRequestError, NotFoundError,
                                PreconditionError, StorageError, is_disk_full)
from fedjax_core.metrics_log import Loggers
from fedjax_core.sinks import AGGREGATED_RUN, SinkFactory
from fedjax_core.tensors import ModelFile, ModelFileWriter, TensorError, nbytes_of

log = logging.getLogger("fedjax.director")
RESERVED_ENVOY_NAMES = (AGGREGATED_RUN,)  # names that stand for something else in metrics and logs
STATUS_ROUNDS = 1000  # an experiment's status lists the participants of this many of its latest rounds
LAST_SEEN_PERSIST_S = 30.0  # heartbeats update the database's last_seen at most this often (memory always)


class Director:
    def __init__(self, state_dir: Path, log_dir: Path, sample_shape: Iterable[str], target_shape: Iterable[str],
                 health_check_period: float = 5.0, clock: Callable[[], float] = time.time,
                 timer: Callable[[], float] = time.monotonic, max_model_bytes: int = limits.MAX_MODEL_BYTES,
                 admins: Iterable[str] = (), envoy_timeout_s: float = 60.0, keep_experiments: int | None = None,
                 metric_sinks: Sequence[SinkFactory] | None = None):
        self.state_dir = Path(state_dir)
        self.sample_shape = tuple(sample_shape)
        self.target_shape = tuple(target_shape)
        self.health_check_period = health_check_period
        self.max_model_bytes = max_model_bytes
        self.admins = frozenset(admins)  # certificate names that may cancel or download any experiment
        self.envoy_timeout_s = envoy_timeout_s  # a participant silent this long drops out of its round
        self.keep_experiments = keep_experiments  # ended experiments whose files stay (None: all)
        self._clock = clock
        self.store = Store(self.state_dir / "director.sqlite")
        for name in self.store.abandon_submissions():  # cut off by a crash: never queued
            log.warning("dropping experiment %r: its submission did not complete before the director stopped", name)
        self.files = ExperimentFiles(self.state_dir)
        for row in self.store.experiments():
            for path in self.files.sweep(row.name, row.current_round):
                log.info("removed %s: left behind by a director that stopped", path)
        self.loggers = Loggers(Path(log_dir), metric_sinks)  # None: TensorBoard under log_dir; []: no sink
        self._collect()
        self._timer = timer  # deadlines: a monotonic clock, immune to wall-clock steps
        self.engine = RoundEngine(self.store, self.files, self.loggers, clock, timer)
        self._cond = threading.Condition()
        self._listeners: list[Callable[[str | None], None]] = []
        self._run: Run | None = None
        self._closed = False
        self._waiting: dict[str, str] = {}  # queued experiment -> why it waits (logged once per reason)
        self._instances: dict[str, str] = {}  # envoy -> the daemon instance that holds the name
        self._born = timer()
        self._heard: dict[str, float] = {}  # envoy -> when its daemon last registered or beat (timer)
        self._seen: dict[str, float] = {}  # envoy -> the same in wall time, for the registry
        self._persisted_seen: dict[str, float] = {}  # envoy -> when its last_seen was last written to the database
        self._resume()
        with self._cond:
            self._start_next()
        self._deadlines = threading.Thread(target=self._watch_deadlines, daemon=True, name="round-deadlines")
        self._deadlines.start()

    def subscribe(self, listener: Callable[[str | None], None]) -> None:
        """Call ``listener(envoy)`` on every change a long-poll may wait for (under the lock, from any thread;
        it must only schedule work): ``envoy`` when only that envoy's answers changed, None for everyone."""
        self._listeners.append(listener)

    def _changed(self, envoy: str | None = None) -> None:
        """Under the lock: wake what waits for a change (the deadline thread, subscribed long-polls)."""
        self._cond.notify_all()  # the only notify: every change goes through here
        for listener in self._listeners:
            listener(envoy)

    @property
    def closed(self) -> bool:
        return self._closed

    def wake_all(self) -> None:
        """Release every waiter: the director is shutting down."""
        with self._cond:
            self._closed = True
            self._changed()

    def close(self) -> None:
        self.wake_all()
        self.loggers.close()
        self.store.close()

    def bundle_path(self, name: str) -> Path:
        return self.files.bundle(name)

    # --------------------------------------------------------------- registry
    def register_envoy(self, name: str, info: r.ShardInfo, instance_id: str = "") -> float:
        """Register (or re-register) envoy ``name``; refused while another daemon holds the name online."""
        check_name("envoy", name)
        if name.lower() in RESERVED_ENVOY_NAMES:
            raise InvalidRequestError(
                f"envoy name {name!r} is reserved: the aggregated metrics go under it (TensorBoard run "
                f"{AGGREGATED_RUN!r}); start the envoy under another name")
        if tuple(info.sample_shape) != self.sample_shape or tuple(info.target_shape) != self.target_shape:
            raise InvalidRequestError(
                f"envoy {name!r} shard has sample shape {list(info.sample_shape)} and target shape "
                f"{list(info.target_shape)}, but this federation expects {list(self.sample_shape)} and "
                f"{list(self.target_shape)} (director settings sample_shape/target_shape)"
            )
        limits.check_shard_info(name, info)
        with self._cond:
            holder = self._instances.get(name)  # a daemon without an instance id ("") is one more claimant
            silent_for = self._online_since(name) if holder is not None and holder != instance_id else None
            if silent_for is not None:
                raise AlreadyExistsError(
                    f"an envoy named {name!r} is already online (last heard {silent_for:.0f}s ago): "
                    "stop that daemon or start this one under another name; a restarted daemon is accepted once "
                    f"the old one has been silent for {2.5 * self.health_check_period:g}s")
            self._instances[name] = instance_id
        self.store.upsert_envoy(name, info)
        self._heard[name] = self._timer()
        self._seen[name] = self._persisted_seen[name] = self._clock()
        with self._cond:
            self._start_waiting()
        return self.health_check_period

    def heartbeat(self, name: str, instance_id: str = "") -> bool:
        """Keep ``name`` online; False (register again) if unknown or held by another daemon."""
        holder = self._instances.get(name)
        if holder is not None and holder != instance_id:
            return False
        now = self._clock()
        if name in self._persisted_seen and now - self._persisted_seen[name] < LAST_SEEN_PERSIST_S:
            known = True  # registered through this director: the database learns of it every LAST_SEEN_PERSIST_S
        else:
            known = self.store.touch_envoy(name)
            if known:
                self._persisted_seen[name] = now
        came_online = known and not (name in self._seen and self._online(self._seen[name]))
        if known:
            self._heard[name] = self._timer()
            self._seen[name] = now
        if came_online and self._run is None:  # only an envoy coming (back) online can unblock a queued one
            with self._cond:
                self._start_waiting()
        return known

    def _online(self, last_seen: float) -> bool:
        return self._clock() - last_seen <= 2.5 * self.health_check_period

    def _last_seen(self, name: str, stored: float) -> float:
        """When ``name`` was last heard from: this director's memory, else what the database kept."""
        return max(self._seen.get(name, stored), stored)

    def _online_since(self, name: str) -> float | None:
        """Seconds since ``name`` was last heard from, if it still counts as online."""
        found = self.store.envoy(name)
        if found is None:
            return None
        seen = self._last_seen(name, found[1])
        return self._clock() - seen if self._online(seen) else None

    def shard_registry(self, after: str = "", limit: int = -1) -> list[r.EnvoyEntry]:
        """Registered envoys by name: ``limit`` of them (-1: all) whose names sort after ``after``."""
        running = self._run
        entries = []
        for name, info, stored in self.store.envoys(after, limit):
            seen = self._last_seen(name, stored)
            entries.append(r.EnvoyEntry(name=name, shard_info=info, is_online=self._online(seen), last_seen=seen,
                                        current_experiment=running.name if running and name in running.envoys else ""))
        return entries

    def _online_names(self) -> list[str]:
        return [name for name, _, seen in self.store.envoys() if self._online(self._last_seen(name, seen))]

    def dataset_info(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.sample_shape, self.target_shape

    # ------------------------------------------------------------ submission
    def submit_experiment(self, header: r.ExperimentHeader, bundle: Iterable[bytes],
                          chunks: Iterable[r.TensorChunk]) -> int:
        """Store a new experiment (code bundle + initial model) and queue it; returns its queue position."""
        check_header(header, set(self.store.envoy_names()))
        size = sum(nbytes_of(spec) for spec in header.model_spec)
        if size > self.max_model_bytes:
            raise InvalidRequestError(f"the model is {size / 2**30:.2f} GiB; this director takes at most "
                                      f"{self.max_model_bytes / 2**30:.2f} GiB (settings.max_model_bytes)")
        self.store.add_experiment(header, state=r.State.SUBMITTING)  # claims the name (UNIQUE)
        staging = self.files.staging_dir(header.name)
        digest = hashlib.sha256()

        def hashed() -> Iterator[bytes]:  # hashed as it streams in: envoys check their download against it
            for piece in bundle:
                digest.update(piece)
                yield piece

        try:
            size = write_bundle(staging / "bundle.bin", hashed())
            if size != header.bundle_size:
                raise InvalidRequestError(f"bundle is {size} bytes but the header announced {header.bundle_size}")
            with ModelFileWriter(staging / self.files.model(header.name, 0).name,
                                 expected={s.name: s for s in header.model_spec}) as writer:
                for chunk in chunks:
                    writer.add_chunk(chunk)
                writer.commit()
            self.files.install(staging, header.name)
        except BaseException as exc:
            self.files.drop_staging(staging)
            self.store.delete_experiment(header.name)
            if isinstance(exc, TensorError):
                raise InvalidRequestError(f"initial model of {header.name!r}: {exc}") from None
            if is_disk_full(exc):
                raise StorageError(f"the director's disk is full ({exc.strerror}, under {self.state_dir}): experiment "
                                   f"{header.name!r} was not stored; free space there and submit again") from None
            raise
        log.info("experiment %r submitted by %r: bundle of %d bytes, sha256 %s", header.name, header.submitter,
                 size, digest.hexdigest())
        with self._cond:
            self.store.update_experiment(header.name, state=r.State.QUEUED, bundle_sha256=digest.hexdigest())
            self._start_next()
            self._changed()
        queued = [row.name for row in self.store.experiments(r.State.QUEUED)]
        return queued.index(header.name) + 1 if header.name in queued else 0

    # ------------------------------------------------------------- lifecycle
    def _resume(self) -> None:
        """Pick up the experiment that was running when the director stopped."""
        for row in self.store.experiments(r.State.RUNNING):
            try:
                run = self.engine.rebuild(row)
            except Exception as exc:  # a run that cannot be rebuilt must not block the director
                self._fail_unstartable(row, exc)
                continue
            self._run = run
            with self._cond:
                close = self._claim_close(run)  # every result may have arrived before the restart
            if close:
                self._close(run)
            return

    def _start_next(self) -> None:
        """Start the oldest queued experiment whose envoys are online. Holds the lock.

        One waiting for offline envoys does not hold up the ones behind it.
        """
        if self._run is not None or self._closed:
            return
        online = self._online_names()
        for row in self.store.experiments(r.State.QUEUED):
            envoys = row.header.envoys or tuple(online)
            if not envoys or not set(envoys) <= set(online):
                offline = sorted(set(envoys) - set(online)) if envoys else []
                self._log_waiting(row.name, f"offline: {', '.join(offline)}" if offline else "no envoy is online")
                continue
            row = dataclasses.replace(row, state=r.State.RUNNING, envoys=envoys, envoy_sizes=self._sizes(envoys))
            try:
                run = self.engine.new_run(row, 0)
            except InvalidRequestError as exc:
                if not row.header.envoys:  # sized on the envoys online now: more may come
                    self._log_waiting(row.name, str(exc))
                    continue
                self._fail_unstartable(row, exc)
                continue
            except Exception as exc:
                self._fail_unstartable(row, exc)
                continue
            self.store.update_experiment(row.name, state=r.State.RUNNING, envoys=envoys, started_at=self._clock(),
                                         envoy_sizes=row.envoy_sizes)
            self._run = run
            return

    def _sizes(self, envoys: Iterable[str]) -> dict[str, tuple[int, int]]:
        """Each envoy's registered (train, valid) size now: an experiment keeps these for its whole run, so an
        envoy that registers again with another shard cannot change its weight in it."""
        sizes = {}
        for envoy in envoys:
            found = self.store.envoy(envoy)
            sizes[envoy] = (found[0].train_size, found[0].valid_size) if found is not None else (0, 0)
        return sizes

    def _start_waiting(self) -> None:
        """Under the lock, when an envoy came online: a queued experiment may have been waiting for it."""
        if self._run is None:
            self._start_next()
            if self._run is not None:
                self._changed()

    def _log_waiting(self, name: str, reason: str) -> None:
        if self._waiting.get(name) != reason:
            self._waiting[name] = reason
            log.info("experiment %r waits for its envoys to come online (%s); later experiments may start first",
                     name, reason)

    def _fail_unstartable(self, row: ExperimentRow, exc: Exception) -> None:
        log.error("experiment %r cannot run: %s", row.name, exc)
        self.store.update_experiment(row.name, state=r.State.FAILED, error=f"the director cannot run it: {exc}",
                                     finished_at=self._clock())

    def _running(self, envoy: str, experiment: str) -> Run:
        run = self._run
        if run is None or run.name != experiment:
            row = self.store.experiment(experiment)
            if row is None:
                raise NotFoundError(f"no experiment named {experiment!r}")
            raise PreconditionError(f"experiment {experiment!r} is {row.state}, not running")
        if envoy not in run.envoys:
            raise PreconditionError(f"envoy {envoy!r} is not a collaborator of experiment {experiment!r}")
        return run

    def _claim_close(self, run: Run) -> bool:
        """Under the lock: True (once) when ``run``'s round has every result and the caller must close it."""
        if run.closing or run.ended or not run.complete:
            return False
        run.closing = True
        return True

    def _close(self, run: Run) -> None:
        """Close ``run``'s round outside the lock, then install the next round or end the experiment."""
        try:
            with run.fold_lock:  # waits for a fold in flight; later ones see run.closing
                outcome = None if run.ended else self.engine.close(run)
        except Exception as exc:
            log.exception("closing round %d of %r failed", run.round, run.name)
            why = (f"the director's disk is full ({exc.strerror}, under {self.state_dir}): free space there and submit "
                   "the experiment again; its last model and metrics are kept" if is_disk_full(exc) else str(exc))
            outcome = Outcome(state=r.State.FAILED, error=f"closing round {run.round} failed: {why}")
        if outcome is None:  # the experiment ended meanwhile
            self._cleanup(run)
            return
        with self._cond:
            if self._run is run and not run.ended:
                if outcome.next_run is not None:
                    self._run = outcome.next_run
                else:
                    self._finish(run, outcome.state, outcome.error)
            self._changed()
        if outcome.next_run is None:
            self._cleanup(run)
        else:  # nobody can ask for round r's files now: the current run is round r + 1
            self.files.drop_round(run.name, run.round)
            self.files.drop_superseded(run.name, run.round)

    def _finish(self, run: Run, state: r.State, error: str = "") -> None:
        """End ``run``'s experiment and start the next one. Holds the lock; call _cleanup(run) after it."""
        run.ended = True
        self._run = None
        try:
            self.store.update_experiment(run.name, state=state, error=error, finished_at=self._clock())
            if error:
                log.warning("experiment %r %s: %s", run.name, state, error)
        finally:
            self._start_next()

    def _cleanup(self, run: Run) -> None:
        """Drop an ended run's spooled updates and close its writers. Without the lock.

        If a fold or close holds the run's ``fold_lock``, it is left to that thread: each calls
        this again after releasing the lock, and sees ``run.ended``, which is set first.
        """
        if not run.fold_lock.acquire(blocking=False):
            return
        try:
            self.store.drop_updates(run.name, run.round)
            self.files.drop_round(run.name, run.round)
        finally:
            run.fold_lock.release()
        self.loggers.close(run.name)
        self._collect()

    def _collect(self) -> None:
        """Bound disk use: remove the files of ended experiments beyond settings.keep_experiments."""
        if self.keep_experiments is not None:
            retention.collect(self.store, self.files, self.keep_experiments)

    # -------------------------------------------------------------- envoys
    def experiment_for(self, envoy: str, already_sent: str | None) -> str | None:
        """The experiment that needs ``envoy`` now, unless it is ``already_sent`` (then None)."""
        with self._cond:
            run = self._run
            if run is None or envoy not in run.envoys or (run.kind == r.TaskKind.VALIDATE and envoy in run.done):
                return None
            return run.name if run.name != already_sent else None

    def experiment_bundle(self, envoy: str, experiment: str) -> Path:
        with self._cond:
            self._running(envoy, experiment)
        return self.files.bundle(experiment)

    def current_task(self, envoy: str, experiment: str) -> r.Task:
        """What ``envoy``'s worker should do now (kind NONE: nothing yet, wait for a change)."""
        with self._cond:
            return self._task_for(envoy, experiment)

    def _task_for(self, envoy: str, experiment: str) -> r.Task:
        run = self._run
        if run is None or run.name != experiment:
            row = self.store.experiment(experiment)
            if row is None:
                raise NotFoundError(f"no experiment named {experiment!r}")
            if row.state in r.TERMINAL_STATES:
                return r.Task(kind=r.TaskKind.FINISHED, message=f"experiment {experiment!r} is {row.state}")
            return r.Task(kind=r.TaskKind.NONE)
        if envoy not in run.envoys:
            return r.Task(kind=r.TaskKind.FINISHED, message=f"envoy {envoy!r} is not a collaborator of {experiment!r}")
        if run.closing or envoy not in run.pending:
            return r.Task(kind=r.TaskKind.NONE)  # sits this round out, keeping its worker and jit cache
        h = run.header
        kind = r.TaskKind.SYNC if envoy in run.checked_in else run.kind  # trained already: dynamic averaging asks
        return r.Task(kind=kind, round=run.round, opt_treatment=h.opt_treatment,
                      upload_tensors=tuple(sorted(run.upload)), task_kwargs=run.task_kwargs(),
                      from_global=run.from_global, check_in=run.averaging != rules.Averaging.ALWAYS,
                      compression=h.compression, send_deltas=h.send_deltas)

    def round_model(self, envoy: str, experiment: str, round_: int) -> Iterator[r.TensorChunk]:
        """Stream the model of ``round_`` to a worker: only the tensors its opt_treatment moves."""
        with self._cond:
            run = self._running(envoy, experiment)
            if round_ != run.round or run.closing:
                raise PreconditionError(f"round {round_} is not open: the current round of {experiment!r} is "
                                        f"{run.round}{' (closing)' if run.closing else ''}")
            path = self.files.model(experiment, round_)
        if run.header.compress_downloads and run.kind == r.TaskKind.TRAIN:  # the final model is validated exact
            path = self._encoded_download(run, path)
        model = ModelFile(path)
        chunks = model.iter_chunks([n for n in model.names() if n in run.upload])  # opens the file now
        sent = 0
        for chunk in chunks:
            sent += len(chunk.data)
            yield chunk
        with self._cond:
            if self._run is run:
                run.count_transfer(envoy, sent, upload=False)

    def _encoded_download(self, run: Run, path: Path) -> Path:
        """The round's model under the experiment's codec, encoded once per round (outside the lock)."""
        encoded = self.files.download(run.name, run.round, run.header.compression)
        with run.download_lock:
            if not encoded.exists():
                encoded.parent.mkdir(parents=True, exist_ok=True)
                codecs.encode_model(ModelFile(path), encoded, run.header.compression, sorted(run.upload))
        return encoded

    def report_metrics(self, envoy: str, experiment: str, round_: int, stage: str,
                       metrics: tuple[r.Metric, ...], sample_count: int) -> None:
        if stage not in r.STAGES:
            raise InvalidRequestError(f"unknown stage {stage!r}; expected one of {', '.join(r.STAGES)}")
        limits.check_metrics(envoy, metrics)
        with self._cond:
            run = self._running(envoy, experiment)
            if round_ != run.round:
                raise PreconditionError(f"round {round_} is not the current round ({run.round}) of {experiment!r}")
            if envoy not in run.participants:
                raise PreconditionError(f"envoy {envoy!r} was not selected for round {round_} of {experiment!r}")
        train, valid = self._registered(run, envoy)  # a report weighs at most the samples it can have measured
        weight = min(max(sample_count, 0), train if stage == r.Stage.TRAIN else valid)
        event = r.MetricEvent(round=round_, envoy=envoy, stage=r.Stage(stage), metrics=metrics,
                              timestamp=self._clock())
        if self.store.add_event(experiment, event, weight=weight):
            self.loggers.log(experiment, event)
        close = False
        with self._cond:
            if run.kind == r.TaskKind.VALIDATE and stage == r.Stage.AGGREGATED and self._run is run:
                run.done.add(envoy)
                close = self._claim_close(run)
            self._changed(envoy)
        if close:
            self._close(run)

    def check_upload(self, envoy: str, experiment: str, round_: int) -> None:
        """Refuse, before it takes a transfer slot, an upload that accept_update would refuse."""
        with self._cond:
            self._upload_run(envoy, experiment, round_)

    def _upload_run(self, envoy: str, experiment: str, round_: int) -> Run:
        """Under the lock: the run an upload goes to; refused when its experiment is not running, its round is
        not open, the envoy was not asked to upload, or it is uploading already."""
        run = self._running(envoy, experiment)
        self._check_update_allowed(run, envoy, round_)
        self._check_upload_asked(run, envoy, round_)
        if envoy in run.receiving:
            raise PreconditionError(f"an upload from envoy {envoy!r} for round {round_} is already in progress")
        return run

    def accept_update(self, envoy: str, experiment: str, round_: int, sample_count: int,
                      chunks: Iterable[r.TensorChunk]) -> int:
        """Spool an envoy's streamed update to disk, then fold it into the round's aggregate."""
        if sample_count <= 0:
            raise InvalidRequestError(
                f"envoy {envoy!r} reported {sample_count} training samples; aggregation needs a positive count "
                "(check DataInterface.get_train_data_size)")
        with self._cond:
            run = self._upload_run(envoy, experiment, round_)
            run.receiving.add(envoy)
        try:
            return self._accept_update(run, envoy, experiment, round_, self._weight(run, envoy, sample_count),
                                       chunks)
        finally:
            with self._cond:
                run.receiving.discard(envoy)

    def _registered(self, run: Run, envoy: str) -> tuple[int, int]:
        """``envoy``'s (train, valid) size when ``run``'s experiment started (experiments started by an older
        director, which kept no sizes: as registered now)."""
        if envoy in run.row.envoy_sizes:
            return run.row.envoy_sizes[envoy]
        found = self.store.envoy(envoy)
        return (found[0].train_size, found[0].valid_size) if found is not None else (0, 0)

    def _weight(self, run: Run, envoy: str, sample_count: int) -> float:
        """An update's weight: its claimed sample count, capped at the train size the envoy had registered when
        the experiment started."""
        registered = self._registered(run, envoy)[0]
        if registered <= 0:
            raise InvalidRequestError(
                f"envoy {envoy!r} had registered no training samples when experiment {run.name!r} started, so its "
                "update cannot be weighted: check its shard descriptor's split_sizes()")
        if registered < sample_count:
            log.warning("envoy %r claims %d training samples but registered %d; weighting it by %d",
                        envoy, sample_count, registered, registered)
            return float(registered)
        return float(sample_count)

    def _accept_update(self, run: Run, envoy: str, experiment: str, round_: int, weight: float,
                       chunks: Iterable[r.TensorChunk]) -> int:
        expected = {s.name: s for s in run.header.model_spec if s.name in run.upload}
        spool = self.files.spool_path(envoy)
        close = False
        try:
            with ModelFileWriter(spool, expected=expected, finite_only=True) as writer:  # one NaN would poison it
                for chunk in chunks:
                    writer.add_chunk(chunk)
                writer.commit()
            received = writer.bytes_written
            spool = self._decoded(run, envoy, spool)
            with run.fold_lock:
                with self._cond:
                    if self._running(envoy, experiment) is not run:
                        raise PreconditionError(f"round {round_} of {experiment!r} is not open for training updates")
                    self._check_update_allowed(run, envoy, round_)  # the round may have closed meanwhile
                try:
                    self.engine.fold(run, envoy, spool, weight, received)
                except FedError:
                    raise
                except Exception as exc:  # the round's sums can no longer be trusted: stop, and say why
                    log.exception("folding the update of %r into round %d of %r failed", envoy, round_, experiment)
                    with self._cond:
                        if self._run is run:
                            self._finish(run, r.State.FAILED,
                                         error=f"folding the update of {envoy!r} into round {round_} failed: {exc}")
                    fold_failed = exc
                else:
                    fold_failed = None
                    with self._cond:
                        run.done.add(envoy)
                        run.uploaded.add(envoy)
                        run.count_transfer(envoy, received, upload=True)
                        close = self._claim_close(run)
                        self._changed(envoy)
            if run.ended:  # failed or cancelled meanwhile: clean up now that fold_lock is free
                self._cleanup(run)
            if fold_failed is not None:
                raise fold_failed
        except TensorError as exc:
            raise InvalidRequestError(f"update from {envoy!r} for round {round_}: {exc}") from None
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self._fail_on_full_disk(run, f"storing the update of envoy {envoy!r} for round {round_}", exc)
            raise StorageError(f"the director's disk is full: it could not store this update ({exc.strerror}); "
                               f"experiment {experiment!r} failed, its models so far and metrics are kept") from None
        finally:
            spool.unlink(missing_ok=True)
        if close:
            self._close(run)
        return received

    def _decoded(self, run: Run, envoy: str, spool: Path) -> Path:
        """An upload in the model's dtypes: a compressed or delta one is checked against the experiment's
        settings and decoded into a new spool file (the received one is removed)."""
        encoded = ModelFile(spool)
        codecs.check_update_encodings(encoded.specs, run.header.compression, run.header.send_deltas)
        if all(spec.encoding is None for spec in encoded.specs):
            return spool
        decoded = self.files.spool_path(envoy)
        try:
            codecs.decode_model(encoded, decoded, ModelFile(self.files.model(run.name, run.round)), finite_only=True)
        except BaseException:
            decoded.unlink(missing_ok=True)
            raise
        finally:
            spool.unlink(missing_ok=True)
        return decoded

    def check_in(self, envoy: str, experiment: str, round_: int, divergence: float) -> bool:
        """Periodic and dynamic averaging: ``envoy`` trained round ``round_`` and its model is ``divergence``
        (squared L2) from the round's global model. True: upload it now; False: keep training it."""
        if not (math.isfinite(divergence) and divergence >= 0):
            raise InvalidRequestError(f"envoy {envoy!r} reported divergence {divergence}: a squared distance is a "
                                      "finite number >= 0 (NaN or infinity: training diverged)")
        with self._cond:
            run = self._running(envoy, experiment)
            self._check_update_allowed(run, envoy, round_)
            if run.averaging == rules.Averaging.ALWAYS:
                raise PreconditionError(f"round {round_} of {experiment!r} averages: upload the update instead")
            if envoy in run.checked_in:
                raise PreconditionError(f"envoy {envoy!r} already checked in for round {round_}")
            upload = run.check_in(envoy, divergence)
            close = self._claim_close(run)
        event = r.MetricEvent(round=round_, envoy=envoy, stage=r.Stage.SYNC_CHECK, timestamp=self._clock(),
                              metrics=(r.Metric("sync", "divergence", divergence),))
        if self.store.add_event(experiment, event):
            self.loggers.log(experiment, event)
        with self._cond:  # after the event, so a metric stream woken by this change finds it
            self._changed()
        if close:
            self._close(run)
        return upload

    def _fail_on_full_disk(self, run: Run, doing: str, exc: OSError) -> None:
        """A write failed for lack of space: the experiment fails with a message that says so, its partial
        files go (which frees space), and the director serves on."""
        with self._cond:
            if self._run is run and not run.ended:
                self._finish(run, r.State.FAILED, error=(
                    f"the director's disk is full ({exc.strerror}, under {self.state_dir}) while {doing}: free space "
                    "there and submit the experiment again; its last model and metrics are kept"))
            self._changed()
        self._cleanup(run)

    @staticmethod
    def _check_update_allowed(run: Run, envoy: str, round_: int) -> None:
        if run.kind != r.TaskKind.TRAIN or round_ != run.round or run.closing:
            raise PreconditionError(f"round {round_} of {run.name!r} is not open for training updates")
        if envoy not in run.participants:
            raise PreconditionError(f"envoy {envoy!r} was not selected for round {round_} of {run.name!r}")
        if envoy in run.done:
            raise PreconditionError(f"envoy {envoy!r} already sent its update for round {round_}")
        if envoy in run.dropped:
            raise PreconditionError(f"envoy {envoy!r} dropped out of round {round_}; it rejoins at the next round")

    @staticmethod
    def _check_upload_asked(run: Run, envoy: str, round_: int) -> None:
        """Outside rounds that always average, only an envoy told so at check-in (or by a SYNC task) uploads."""
        if run.averaging != rules.Averaging.ALWAYS and not (run.triggered and envoy in run.checked_in):
            raise PreconditionError(f"round {round_} of {run.name!r} averages only when the director asks: "
                                    f"envoy {envoy!r} must check in first")

    def report_failure(self, envoy: str, experiment: str, error: str, round_: int | None = None,
                       worker_lost: bool = False, refused: bool = False) -> None:
        """A task failed in ``round_`` (a dropout from that round), or a worker cannot go on (``round_`` None).

        A dropout ends the experiment only when the round can no longer reach its needed results
        (min_envoys, or every participant when that is 0); otherwise the others go on and the
        notebook is told who dropped out, why, and how many continue. ``worker_lost``: the envoy's
        worker died; it drops out of the round in progress if it still owed it a result (the
        envoy starts a new worker, which joins the next round). ``refused``: the envoy refuses the
        experiment (settings.accept_from, its operator's review, a bundle that fails its check): it
        drops out of every remaining round (see :meth:`_withdraw`).
        """
        error = limits.clip_error(error)
        if refused:
            with self._cond:
                run = self._running(envoy, experiment)
                event, close = self._withdraw(run, envoy, error)
                self._changed()
            self._after_drop(run, event, close)
            return
        with self._cond:
            run = self._running(envoy, experiment)
            owes_this_round = not run.closing and envoy in run.pending
            if worker_lost:
                if not owes_this_round:
                    return  # its next worker simply joins the next round
                round_ = run.round
            if round_ is not None and (round_ != run.round or not owes_this_round):
                raise PreconditionError(f"round {round_} of {experiment!r} has gone on without envoy {envoy!r}")
            if round_ is None:
                self._finish(run, r.State.FAILED, error=f"envoy {envoy!r} failed: {error}")
                event, close = None, False
            else:
                event, close = self._drop(run, envoy, "failed", error)
            self._changed()
        self._after_drop(run, event, close)

    def _drop(self, run: Run, envoy: str, what: str, reason: str) -> tuple[r.MetricEvent | None, bool]:
        """Under the lock: ``envoy`` leaves ``run``'s round, or the experiment ends if the round can no
        longer reach its needed results. Returns the dropout event (None if it ended) and whether to close."""
        if len(run.participants) - len(run.dropped) - 1 < run.needed:
            self._finish(run, r.State.FAILED, error=(
                f"envoy {envoy!r} {what} in round {run.round}, leaving fewer than the {run.needed} results the round "
                f"needs ({run.needed_because}): {reason}"))
            return None, False
        run.dropped[envoy] = reason
        left = len(run.participants) - len(run.dropped)
        note = (f"envoy {envoy!r} dropped out of round {run.round}: {reason.splitlines()[0] if reason else what}; "
                f"{left} of {len(run.participants)} continue (the round needs {run.needed})")
        event = r.MetricEvent(round=run.round, envoy=envoy, stage=r.Stage.DROPOUT, note=note, timestamp=self._clock())
        return event, self._claim_close(run)

    def _withdraw(self, run: Run, envoy: str, reason: str) -> tuple[r.MetricEvent | None, bool]:
        """Under the lock: ``envoy`` refused ``run``'s experiment. It leaves the round in progress (if it owes
        it a result) and the experiment's envoys, so later rounds neither sample it nor ask it to validate;
        the shrunk envoy list is stored (a restarted director keeps it out). The experiment ends only when
        the rounds can no longer reach min_envoys. Returns the dropout event (None if it ended) and whether
        to close the round."""
        refusal = f"envoy {envoy!r} refused experiment {run.name!r}: {reason}"
        remaining = tuple(e for e in run.envoys if e != envoy)
        in_round = not run.closing and envoy in run.pending
        # min_envoys 0 (every participant): every one left; the aggregation rule's floor holds as ever
        floor = max(run.header.min_envoys, run.rule_floor, 1)
        if in_round and len(run.participants) - len(run.dropped) - 1 < floor:
            short = f"fewer than the {floor} results round {run.round} needs ({run.needed_because})"
        else:
            try:
                plan = self.engine.plan(dataclasses.replace(run.row, envoys=remaining)) if remaining else None
                short = "" if plan is not None else "no envoy at all"
            except InvalidRequestError as exc:
                short = f"{len(remaining)} envoys, too few for the rounds to come ({exc})"
        if short:
            self._finish(run, r.State.FAILED, error=(
                f"envoy {envoy!r} refused experiment {run.name!r} in round {run.round}, leaving {short}: {reason}"))
            return None, False
        run.row = dataclasses.replace(run.row, envoys=remaining)
        run.plan = plan
        self.store.update_experiment(run.name, envoys=remaining)
        if in_round:
            run.dropped[envoy] = reason
        note = (f"{refusal}; it drops out of the experiment, {len(remaining)} of {len(remaining) + 1} envoys "
                f"continue")
        event = r.MetricEvent(round=run.round, envoy=envoy, stage=r.Stage.DROPOUT, note=note, timestamp=self._clock())
        return event, self._claim_close(run)

    def _after_drop(self, run: Run, event: r.MetricEvent | None, close: bool) -> None:
        """Outside the lock: record a dropout and close the round, or clean up an ended experiment."""
        if event is None:
            self._cleanup(run)
            return
        log.warning("experiment %r: %s", run.name, event.note)
        if self.store.add_event(run.name, event):
            self.loggers.log(run.name, event)
        with self._cond:
            self._changed()  # metric streams see the event
        if close:
            self._close(run)

    # ------------------------------------------------------------ deadlines
    def _watch_deadlines(self) -> None:
        """Close (or fail) a round whose deadline passed, and drop participants whose heartbeats stopped;
        sleeps until the next deadline or possible timeout, or a change. An error fails the experiment it hit
        and the watch goes on: later rounds need their deadlines."""
        while self._handle_due():
            pass

    def _handle_due(self) -> bool:
        """Wait for the next deadline or silent participant and act on it; False once the director closes."""
        run = None
        try:
            with self._cond:
                due = self._next_due()
                if due is None:
                    return False
                run, lost = due
                event = None
                if lost is not None:
                    event, close = self._drop(run, lost, "was lost", (
                        f"no heartbeat for {self.envoy_timeout_s:g}s (settings.envoy_timeout_s); it rejoins when "
                        "it is back"))
                elif len(run.done) >= run.needed:
                    run.closing = close = True
                else:
                    close = False
                    missing = ", ".join(sorted(set(run.participants) - run.done))
                    self._finish(run, r.State.FAILED, error=(
                        f"round {run.round} reached its {run.header.round_timeout_s:g}s deadline with "
                        f"{len(run.done)} of {len(run.participants)} envoys reporting, fewer than the {run.needed} "
                        f"it needs ({run.needed_because}); "
                        f"no result from: {missing}"))
                self._changed()
            if lost is not None:
                self._after_drop(run, event, close)
            elif close:
                self._close(run)
            else:
                self._cleanup(run)
        except Exception as exc:
            log.exception("the round-deadline watch hit an error")
            if run is not None:
                self._fail_on_background_error(run, exc)
        return True

    def _fail_on_background_error(self, run: Run, exc: Exception) -> None:
        """``run``'s experiment fails with what went wrong (it hit the error); the director serves on."""
        full = is_disk_full(exc) or "full" in str(exc)
        error = (f"the director hit an error while watching round {run.round}'s deadline and heartbeats: "
                 f"{type(exc).__name__}: {exc}" + (f" (is its disk under {self.state_dir} full?)" if full else ""))
        with self._cond:
            try:
                if self._run is run and not run.ended:
                    self._finish(run, r.State.FAILED, error)
                else:  # ended in memory, but perhaps not on disk: the write that failed may have been that one
                    row = self.store.experiment(run.name)
                    if row is not None and row.state == r.State.RUNNING:
                        self.store.update_experiment(run.name, state=r.State.FAILED, error=error,
                                                     finished_at=self._clock())
            except Exception:  # the database cannot take it either: it is over in memory, and logged
                log.exception("could not record that experiment %r failed: %s", run.name, error)
                run.ended = True
                if self._run is run:
                    self._run = None
            self._changed()
        try:
            self._cleanup(run)
        except Exception:
            log.exception("could not clean up after experiment %r", run.name)

    def _next_due(self) -> tuple[Run, str | None] | None:
        """Under the lock: wait until the running round's deadline passes (``(run, None)``) or a pending
        participant has been silent for envoy_timeout_s (``(run, envoy)``); None once the director closes."""
        while not self._closed:
            run = self._run
            if run is None or run.closing or run.ended:
                self._cond.wait()
                continue
            silent_until = {e: self._heard.get(e, self._born) + self.envoy_timeout_s for e in sorted(run.pending)}
            deadline = run.started_at + run.header.round_timeout_s if run.header.round_timeout_s else math.inf
            first = min(silent_until, key=silent_until.get, default=None)
            due = min(deadline, silent_until[first] if first is not None else math.inf)
            if math.isinf(due):
                self._cond.wait()
                continue
            left = due - self._timer()
            if left > 0:
                self._cond.wait(timeout=left)
                continue
            return (run, None) if due == deadline else (run, first)
        return None

    # ------------------------------------------------------------ notebook
    def experiments(self, viewer: str | None = None, after: int = 0,
                    limit: int = -1) -> list[tuple[int, r.ExperimentStatus]]:
        """The experiments ``viewer`` may see (its own; None: every one, for an admin or in plaintext), each with
        its number, in submission order: ``limit`` of them (-1: all) numbered above ``after``. Without each
        round's participants, which ``experiment_status`` has."""
        return [(seq, row.status()) for seq, row in self.store.experiments_page(after, limit, viewer)]

    def experiment_submitter(self, name: str) -> str:
        row = self.store.experiment(name)
        if row is None:
            raise NotFoundError(f"no experiment named {name!r}")
        return row.header.submitter

    def experiment_bundle_sha256(self, name: str) -> str:
        """The hex SHA-256 of ``name``'s bundle, taken as it was submitted; envoys check their download."""
        return self.store.bundle_sha256(name)

    def experiment_status(self, name: str, viewer: str | None = None) -> r.ExperimentStatus:
        """``name``'s status; to a ``viewer`` other than its submitter it does not exist (nor its metrics)."""
        row = self.store.experiment(name)
        if row is None or (viewer is not None and row.header.submitter != viewer and viewer not in self.admins):
            raise NotFoundError(f"no experiment named {name!r}" + (" among yours" if viewer is not None else ""))
        return row.status(self.store.participants(name, last=STATUS_ROUNDS))

    def _check_owner(self, row: ExperimentRow, by: str | None, action: str) -> None:
        """Under mTLS (``by`` is the caller's certificate name) only the submitter or an admin may ``action``."""
        if by is not None and by != row.header.submitter and by not in self.admins:
            # to another submitter it does not exist: a refusal would say that it does, and whose it is
            raise NotFoundError(f"no experiment named {row.name!r} among yours (only its submitter, an admin "
                                f"certificate or one in settings.admins may {action})")

    def cancel_experiment(self, name: str, by: str | None = None) -> r.ExperimentStatus:
        """Stop a queued or running experiment; a running one's workers are told it is over.

        ``by`` is the caller's certificate name under mTLS (None in plaintext, on loopback only).
        """
        with self._cond:
            row = self.store.experiment(name)
            if row is None:
                raise NotFoundError(f"no experiment named {name!r}")
            self._check_owner(row, by, "cancel it")
            if row.state in r.TERMINAL_STATES or row.state == r.State.SUBMITTING:
                raise PreconditionError(f"experiment {name!r} is {row.state}; only queued or running ones can be cancelled")
            reason = f"cancelled by {by}" if by else "cancelled by the notebook API"
            run = self._run if self._run is not None and self._run.name == name else None
            if run is not None:
                self._finish(run, r.State.CANCELLED, error=reason)
            else:
                self.store.update_experiment(name, state=r.State.CANCELLED, error=reason, finished_at=self._clock())
            self._changed()
        if run is not None:
            self._cleanup(run)
        return self.experiment_status(name)

    def events_after(self, name: str, after_id: int) -> tuple[list[tuple[int, r.MetricEvent]], r.MetricEvent | None]:
        """``name``'s events with an id above ``after_id``, as ``(id, event)``; with none left and the
        experiment ended, the final 'done' event as the second item."""
        rows = [(id_, event) for id_, event, _ in self.store.events(name, after_id=after_id)]
        if rows:
            return rows, None
        status = self.experiment_status(name)
        if status.state in r.TERMINAL_STATES and not self.store.events(name, after_id=after_id):
            return [], r.MetricEvent(round=status.current_round, envoy="", stage="", experiment_done=True,
                                     state=status.state, timestamp=self._clock())
        return [], None

    def model_chunks(self, name: str, which: str, by: str | None = None) -> Iterator[r.TensorChunk]:
        row = self.store.experiment(name)
        if row is None:
            raise NotFoundError(f"no experiment named {name!r}")
        self._check_owner(row, by, "download its models")
        with self._cond:  # resolve and open under the lock: a round closing meanwhile removes old files
            return self._open_model(name, which)

    def _open_model(self, name: str, which: str) -> Iterator[r.TensorChunk]:
        status = self.experiment_status(name)
        if not self.files.exp_dir(name).exists():
            raise NotFoundError(f"the models of experiment {name!r} were removed to bound disk use "
                                "(settings.keep_experiments or `fedjax director gc`); its metrics remain")
        if which == "best":
            path = self.files.best(name)
            if not path.exists():
                raise PreconditionError(
                    f"experiment {name!r} has no best model yet: one exists once an aggregated model was validated")
        elif which == "last":
            path = self.files.model(name, status.current_round)
        else:
            raise InvalidRequestError(f"model {which!r}: ask for 'best' or 'last'")
        if not path.exists():
            raise PreconditionError(f"experiment {name!r} has no {which} model on disk")
        return ModelFile(path).iter_chunks()
