"""The director's federation logic: registry, experiment queue, rounds and aggregation.

Plain Python over records; the gRPC servicers only translate. One lock guards the
in-memory run state, and one condition wakes every waiter (envoy streams, worker
long-polls, metric streams) the moment something changes: nothing here sleeps a fixed time.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fedjax_core import records as r
from fedjax_core.aggregation import AggregationError, AggregationState, Aggregator, get_aggregator
from fedjax_core.director.memory import release_free_memory
from fedjax_core.director.store import ExperimentRow, Store
from fedjax_core.errors import InvalidRequestError, NotFoundError, PreconditionError
from fedjax_core.metrics_log import ExperimentLogger
from fedjax_core.tensors import ModelFile, ModelFileWriter, TensorError, check_spec

log = logging.getLogger("fedjax.director")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_BUNDLE_BYTES = 2 << 30
MAX_ROUND_TIMEOUT_S = 30 * 24 * 3600.0


def _check_name(kind: str, name: str) -> None:
    if not _NAME.fullmatch(name or ""):
        raise InvalidRequestError(
            f"{kind} name {name!r} is not valid: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )


def upload_names(header: r.ExperimentHeader) -> tuple[str, ...]:
    """The tensors that travel each round: params always, optimizer state only for CONTINUE_GLOBAL."""
    if header.opt_treatment == "CONTINUE_GLOBAL":
        return tuple(s.name for s in header.model_spec)
    return tuple(s.name for s in header.model_spec if s.name.startswith("params/"))


@dataclasses.dataclass
class _Run:
    """The running experiment's round in progress (rebuilt from the store after a restart)."""

    row: ExperimentRow
    envoys: tuple[str, ...]
    round: int
    aggregator: Aggregator
    agg_state: AggregationState
    done: set[str]
    started_at: float
    upload: frozenset[str] = frozenset()  # the tensors that travel each round
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def header(self) -> r.ExperimentHeader:
        return self.row.header

    @property
    def kind(self) -> str:
        return "train" if self.round < self.header.rounds else "validate"


class Director:
    def __init__(self, state_dir: Path, log_dir: Path, sample_shape: Iterable[str], target_shape: Iterable[str],
                 health_check_period: float = 5.0, clock: Callable[[], float] = time.time):
        self.state_dir = Path(state_dir)
        self.log_dir = Path(log_dir)
        self.sample_shape = tuple(sample_shape)
        self.target_shape = tuple(target_shape)
        self.health_check_period = health_check_period
        self._clock = clock
        self.store = Store(self.state_dir / "director.sqlite")
        for name in self.store.abandon_submissions():  # cut off by a crash: never queued
            log.warning("dropping experiment %r: its submission did not complete before the director stopped", name)
        shutil.rmtree(self.state_dir / "incoming", ignore_errors=True)
        self._cond = threading.Condition()
        self._run: _Run | None = None
        self._loggers: dict[str, ExperimentLogger] = {}
        self._closed = False
        with self._cond:
            self._resume_or_start_next()
        self._deadlines = threading.Thread(target=self._watch_deadlines, daemon=True, name="round-deadlines")
        self._deadlines.start()

    def wake_all(self) -> None:
        """Release every waiter: the director is shutting down."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            for logger in self._loggers.values():
                logger.close()
            self._loggers.clear()
        self.store.close()

    # ------------------------------------------------------------------ paths
    def _exp_dir(self, name: str) -> Path:
        return self.state_dir / "experiments" / name

    def _model_path(self, name: str, round_: int) -> Path:
        return self._exp_dir(name) / f"model_round_{round_:04d}.fjm"

    def _best_path(self, name: str) -> Path:
        return self._exp_dir(name) / "model_best.fjm"

    def bundle_path(self, name: str) -> Path:
        return self._exp_dir(name) / "bundle.bin"

    # --------------------------------------------------------------- registry
    def register_envoy(self, name: str, info: r.ShardInfo) -> float:
        _check_name("envoy", name)
        if tuple(info.sample_shape) != self.sample_shape or tuple(info.target_shape) != self.target_shape:
            raise InvalidRequestError(
                f"envoy {name!r} shard has sample shape {list(info.sample_shape)} and target shape "
                f"{list(info.target_shape)}, but this federation expects {list(self.sample_shape)} and "
                f"{list(self.target_shape)} (director settings sample_shape/target_shape)"
            )
        self.store.upsert_envoy(name, info)
        with self._cond:
            if self._run is None:
                self._resume_or_start_next()
            self._cond.notify_all()
        return self.health_check_period

    def heartbeat(self, name: str) -> bool:
        known = self.store.touch_envoy(name)
        if known and self._run is None:
            with self._cond:  # a queued experiment may have been waiting for this envoy
                self._resume_or_start_next()
                self._cond.notify_all()
        return known

    def _online(self, last_seen: float) -> bool:
        return self._clock() - last_seen <= 2.5 * self.health_check_period

    def shard_registry(self) -> list[r.EnvoyEntry]:
        running = self._run
        return [
            r.EnvoyEntry(name=name, shard_info=info, is_online=self._online(seen), last_seen=seen,
                         current_experiment=running.row.name if running and name in running.envoys else "")
            for name, info, seen in self.store.envoys()
        ]

    def dataset_info(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.sample_shape, self.target_shape

    # ------------------------------------------------------------ submission
    def submit_experiment(self, header: r.ExperimentHeader, bundle: Iterable[bytes],
                          chunks: Iterable[r.TensorChunk]) -> int:
        """Store a new experiment (code bundle + initial model) and queue it; returns its queue position."""
        with self._cond:
            self._check_header(header)
            self.store.add_experiment(header, state="submitting")  # claims the name (UNIQUE)
        staging = Path(tempfile.mkdtemp(prefix=f".{header.name}-", dir=self._staging_dir()))
        try:
            size = self._write_bundle(staging / "bundle.bin", bundle)
            if size != header.bundle_size:
                raise InvalidRequestError(f"bundle is {size} bytes but the header announced {header.bundle_size}")
            with ModelFileWriter(staging / self._model_path(header.name, 0).name,
                                 expected={s.name: s for s in header.model_spec}) as writer:
                for chunk in chunks:
                    writer.add_chunk(chunk)
                writer.commit()
            target = self._exp_dir(header.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)  # leftovers of a crash: the name is ours now
            os.replace(staging, target)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self.store.delete_experiment(header.name)
            if isinstance(exc, TensorError):
                raise InvalidRequestError(f"initial model of {header.name!r}: {exc}") from None
            raise
        with self._cond:
            self.store.update_experiment(header.name, state="queued")
            self._resume_or_start_next()
            self._cond.notify_all()
            queued = [row.name for row in self.store.experiments("queued")]
        return queued.index(header.name) + 1 if header.name in queued else 0

    def _staging_dir(self) -> Path:
        path = self.state_dir / "incoming"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _write_bundle(path: Path, bundle: Iterable[bytes]) -> int:
        size = 0
        with open(path, "wb") as f:
            for piece in bundle:
                size += len(piece)
                if size > MAX_BUNDLE_BYTES:
                    raise InvalidRequestError("experiment bundle exceeds 2 GiB; keep data out of the bundle")
                f.write(piece)
        return size

    def _check_header(self, h: r.ExperimentHeader) -> None:
        _check_name("experiment", h.name)  # name clashes are the store's UNIQUE constraint's to report
        if h.rounds < 1:
            raise InvalidRequestError(f"rounds_to_train must be >= 1, got {h.rounds}")
        if h.opt_treatment not in r.OPT_TREATMENTS:
            raise InvalidRequestError(
                f"opt_treatment {h.opt_treatment!r} is not one of {', '.join(r.OPT_TREATMENTS)}")
        try:
            get_aggregator(h.aggregation)
        except AggregationError as exc:
            raise InvalidRequestError(str(exc)) from None
        if not h.model_spec:
            raise InvalidRequestError("the model has no tensors")
        try:
            for spec in h.model_spec:
                check_spec(spec)
        except TensorError as exc:
            raise InvalidRequestError(str(exc)) from None
        if not any(s.name.startswith("params/") for s in h.model_spec):
            raise InvalidRequestError("the model has no 'params' tensors: pass a flax TrainState as the model")
        known = {name for name, _, _ in self.store.envoys()}
        for envoy in h.envoys:
            _check_name("envoy", envoy)
            if envoy not in known:
                raise InvalidRequestError(f"envoys: no envoy named {envoy!r} has registered; "
                                          f"registered envoys: {', '.join(sorted(known)) or 'none'}")
        if len(set(h.envoys)) != len(h.envoys):
            raise InvalidRequestError(f"envoys lists an envoy twice: {list(h.envoys)}")
        if h.min_envoys < 0 or (h.envoys and h.min_envoys > len(h.envoys)):
            raise InvalidRequestError(f"min_envoys must be between 0 (all) and the number of envoys, got {h.min_envoys}")
        if not (math.isfinite(h.round_timeout_s) and 0 <= h.round_timeout_s <= MAX_ROUND_TIMEOUT_S):
            raise InvalidRequestError(f"round_timeout_s must be between 0 (no deadline) and {MAX_ROUND_TIMEOUT_S:g} "
                                      f"seconds, got {h.round_timeout_s}")

    # ------------------------------------------------------------- lifecycle
    def _resume_or_start_next(self) -> None:
        """Pick up the running experiment after a restart, or start the oldest queued one."""
        if self._run is not None or self._closed:
            return
        for row in self.store.experiments("running"):  # after a restart
            try:
                self._run = self._rebuild_run(row)
            except Exception as exc:  # a run that cannot be rebuilt must not block the director
                self._fail_unstartable(row, exc)
                continue
            self._maybe_close_round(self._run)  # every result may have arrived before the restart
            return
        for row in self.store.experiments("queued"):
            online = [e.name for e in self.shard_registry() if e.is_online]
            envoys = row.header.envoys or tuple(online)
            if not envoys or not set(envoys) <= set(online):
                return  # wait for its envoys to come online
            row = dataclasses.replace(row, state="running", envoys=envoys)
            try:
                run = self._new_run(row, round_=0)
            except Exception as exc:
                self._fail_unstartable(row, exc)
                continue
            self.store.update_experiment(row.name, state="running", envoys=envoys, started_at=self._clock())
            self._run = run
            return

    def _fail_unstartable(self, row: ExperimentRow, exc: Exception) -> None:
        log.error("experiment %r cannot run: %s", row.name, exc)
        self.store.update_experiment(row.name, state="failed", error=f"the director cannot run it: {exc}",
                                     finished_at=self._clock())

    def _new_run(self, row: ExperimentRow, round_: int) -> _Run:
        aggregator = get_aggregator(row.header.aggregation)
        upload = frozenset(upload_names(row.header))
        specs = [s for s in row.header.model_spec if s.name in upload]
        return _Run(row=row, envoys=row.envoys, round=round_, aggregator=aggregator, upload=upload,
                    agg_state=aggregator.init(specs), done=set(), started_at=self._clock())

    def _rebuild_run(self, row: ExperimentRow) -> _Run:
        run = self._new_run(row, row.current_round)
        for envoy, weight, path, _ in self.store.updates(row.name, run.round):
            if not path.exists():  # lost with its file: that envoy uploads again
                self.store.drop_update(row.name, run.round, envoy)
                continue
            run.agg_state = run.aggregator.update(run.agg_state, ModelFile(path), weight)
            run.done.add(envoy)
        if run.kind == "validate":
            run.done |= {e.envoy for _, e, _ in self.store.events(row.name, round_=run.round)
                         if e.stage == r.STAGE_AGGREGATED and e.envoy}
        return run

    def _running(self, envoy: str, experiment: str) -> _Run:
        run = self._run
        if run is None or run.row.name != experiment:
            row = self.store.experiment(experiment)
            if row is None:
                raise NotFoundError(f"no experiment named {experiment!r}")
            raise PreconditionError(f"experiment {experiment!r} is {row.state}, not running")
        if envoy not in run.envoys:
            raise PreconditionError(f"envoy {envoy!r} is not a collaborator of experiment {experiment!r}")
        return run

    # -------------------------------------------------------------- envoys
    def wait_experiment(self, envoy: str, already_sent: str | None, timeout: float) -> str | None:
        """Block until an experiment other than ``already_sent`` needs ``envoy``; its name, or None."""
        def assigned() -> str | None:
            run = self._run
            if run is not None and envoy in run.envoys and not (run.kind == "validate" and envoy in run.done):
                return run.row.name
            return None

        with self._cond:
            self._cond.wait_for(lambda: self._closed or assigned() not in (None, already_sent), timeout=timeout)
            found = assigned()
            return found if found != already_sent else None

    def experiment_bundle(self, envoy: str, experiment: str) -> Path:
        with self._cond:
            self._running(envoy, experiment)
        return self.bundle_path(experiment)

    def wait_task(self, envoy: str, experiment: str, max_wait: float) -> r.Task:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._task_for(envoy, experiment).kind != "none",
                                timeout=max_wait)
            return self._task_for(envoy, experiment)

    def _task_for(self, envoy: str, experiment: str) -> r.Task:
        run = self._run
        if run is None or run.row.name != experiment:
            row = self.store.experiment(experiment)
            if row is None:
                raise NotFoundError(f"no experiment named {experiment!r}")
            if row.state in r.TERMINAL_STATES:
                return r.Task(kind="finished", message=f"experiment {experiment!r} is {row.state}")
            return r.Task(kind="none")
        if envoy not in run.envoys:
            return r.Task(kind="finished", message=f"envoy {envoy!r} is not a collaborator of {experiment!r}")
        if envoy in run.done:
            return r.Task(kind="none")
        return r.Task(kind=run.kind, round=run.round, opt_treatment=run.header.opt_treatment,
                      upload_tensors=tuple(sorted(run.upload)))

    def round_model(self, envoy: str, experiment: str, round_: int) -> Iterator[r.TensorChunk]:
        """Stream the model of ``round_`` to a worker: only the tensors its opt_treatment moves."""
        with self._cond:
            run = self._running(envoy, experiment)
            if round_ != run.round:
                raise PreconditionError(f"round {round_} is not the current round ({run.round}) of {experiment!r}")
            model = ModelFile(self._model_path(experiment, round_))
            chunks = model.iter_chunks([n for n in model.names() if n in run.upload])  # opens the file now
        sent = 0
        for chunk in chunks:
            sent += len(chunk.data)
            yield chunk
        with self._cond:
            if self._run is run:
                run.bytes_out += sent

    def report_metrics(self, envoy: str, experiment: str, round_: int, stage: str,
                       metrics: tuple[r.Metric, ...], sample_count: int) -> None:
        if stage not in r.STAGES:
            raise InvalidRequestError(f"unknown stage {stage!r}; expected one of {', '.join(r.STAGES)}")
        with self._cond:
            run = self._running(envoy, experiment)
            if round_ != run.round:
                raise PreconditionError(f"round {round_} is not the current round ({run.round}) of {experiment!r}")
            event = r.MetricEvent(round=round_, envoy=envoy, stage=stage, metrics=metrics, timestamp=self._clock())
            self.store.add_event(experiment, event, weight=max(sample_count, 0))
            self._logger(experiment).log(event)
            if run.kind == "validate" and stage == r.STAGE_AGGREGATED:
                run.done.add(envoy)
                self._maybe_close_round(run)
            self._cond.notify_all()

    def accept_update(self, envoy: str, experiment: str, round_: int, sample_count: int,
                      chunks: Iterable[r.TensorChunk]) -> int:
        """Spool an envoy's streamed update to disk, then fold it into the round's aggregate."""
        with self._cond:
            run = self._running(envoy, experiment)
            self._check_update_allowed(run, envoy, round_)
            expected = {s.name: s for s in run.header.model_spec if s.name in run.upload}
        if sample_count <= 0:
            raise InvalidRequestError(
                f"envoy {envoy!r} reported {sample_count} training samples; FedAvg needs a positive count "
                "(check DataInterface.get_train_data_size)")
        spool = Path(tempfile.mkstemp(prefix=f".{envoy}-", suffix=".fjm", dir=self._staging_dir())[1])
        try:
            with ModelFileWriter(spool, expected=expected) as writer:
                for chunk in chunks:
                    writer.add_chunk(chunk)
                writer.commit()
            with self._cond:
                run = self._running(envoy, experiment)
                self._check_update_allowed(run, envoy, round_)  # the round may have closed meanwhile
                path = self._exp_dir(experiment) / f"round_{round_:04d}" / f"{envoy}.fjm"
                path.parent.mkdir(exist_ok=True)
                os.replace(spool, path)
                received = writer.bytes_written
                self.store.add_update(experiment, round_, envoy, float(sample_count), path, received)
                run.agg_state = run.aggregator.update(run.agg_state, ModelFile(path), float(sample_count))
                run.done.add(envoy)
                run.bytes_in += received
                self._maybe_close_round(run)
                self._cond.notify_all()
        except TensorError as exc:
            raise InvalidRequestError(f"update from {envoy!r} for round {round_}: {exc}") from None
        finally:
            spool.unlink(missing_ok=True)
        return received

    def _check_update_allowed(self, run: _Run, envoy: str, round_: int) -> None:
        if run.kind != "train" or round_ != run.round:
            raise PreconditionError(f"round {round_} of {run.row.name!r} is not open for training updates")
        if envoy in run.done:
            raise PreconditionError(f"envoy {envoy!r} already sent its update for round {round_}")

    def report_failure(self, envoy: str, experiment: str, error: str) -> None:
        """A worker could not go on: fail the experiment with its message, and move on."""
        with self._cond:
            run = self._running(envoy, experiment)
            self._finish(run, "failed", error=f"envoy {envoy!r} failed: {error}")
            self._cond.notify_all()

    # ------------------------------------------------------------ rounds
    def _watch_deadlines(self) -> None:
        """Close (or fail) a round whose deadline passed; sleeps until the next deadline or a change."""
        with self._cond:
            while not self._closed:
                run = self._run
                if run is None or not run.header.round_timeout_s:
                    self._cond.wait()
                    continue
                left = run.started_at + run.header.round_timeout_s - self._clock()
                if left > 0:
                    self._cond.wait(timeout=left)
                    continue
                try:
                    self._close_at_deadline(run)
                except Exception:  # keep watching the next rounds whatever happened to this one
                    log.exception("closing round %d of %r at its deadline failed", run.round, run.row.name)
                    self._finish(run, "failed", error=f"closing round {run.round} at its deadline failed")
                self._cond.notify_all()

    def _close_at_deadline(self, run: _Run) -> None:
        needed = max(run.header.min_envoys or len(run.envoys), 1)
        if len(run.done) >= needed:
            self._maybe_close_round(run, force=True)
            return
        missing = ", ".join(sorted(set(run.envoys) - run.done))
        self._finish(run, "failed", error=(
            f"round {run.round} reached its {run.header.round_timeout_s:g}s deadline with {len(run.done)} of "
            f"{len(run.envoys)} envoys reporting (min_envoys={needed}); no result from: {missing}"))

    def _maybe_close_round(self, run: _Run, force: bool = False) -> None:
        if not force and not set(run.envoys) <= run.done:
            return
        name = run.row.name
        round_events = self.store.events(name, round_=run.round)
        aggregates = self._aggregate_metrics(run.round, [(e, w) for _, e, w in round_events if e.envoy])
        for event in aggregates:
            self.store.add_event(name, event)
            self._logger(name).log(event)
        self._update_best(run, aggregates)
        if run.kind == "validate":
            self._finish(run, "finished")
            return
        try:
            new_model = run.aggregator.finalize(run.agg_state)
        except AggregationError as exc:
            self._finish(run, "failed", error=f"aggregation of round {run.round} failed: {exc}")
            return
        previous = ModelFile(self._model_path(name, run.round))
        with ModelFileWriter(self._model_path(name, run.round + 1)) as writer:
            for spec in previous.specs:  # tensors that do not travel keep their initial values
                writer.add_array(spec.name, new_model.get(spec.name, previous.array(spec.name)))
            writer.commit()
        del new_model
        now = self._clock()  # the round's time includes aggregating and storing its model
        seconds = now - run.started_at
        summary = r.MetricEvent(
            round=run.round, envoy="", stage=r.STAGE_ROUND, timestamp=now, round_time_s=seconds,
            metrics=(r.Metric("round", "time_s", seconds), r.Metric("round", "bytes_received", run.bytes_in),
                     r.Metric("round", "bytes_sent", run.bytes_out),
                     r.Metric("round", "envoys_reported", len(run.done))),
        )
        self.store.add_event(name, summary)
        self._logger(name).log(summary)
        self.store.update_experiment(name, current_round=run.round + 1)
        self.store.drop_updates(name, run.round)
        shutil.rmtree(self._exp_dir(name) / f"round_{run.round:04d}", ignore_errors=True)
        self._model_path(name, run.round).unlink(missing_ok=True)  # model_best.fjm holds a copy if needed
        row = self.store.experiment(name)
        assert row is not None
        self._run = self._new_run(row, run.round + 1)
        release_free_memory()

    @staticmethod
    def _aggregate_metrics(round_: int, events: list[tuple[r.MetricEvent, float]]) -> list[r.MetricEvent]:
        """Per stage, each metric's mean over envoys weighted by their sample counts."""
        out = []
        for stage in r.STAGES:
            sums: dict[tuple[str, str], list[float]] = {}
            for event, weight in events:
                if event.stage != stage:
                    continue
                for m in event.metrics:
                    acc = sums.setdefault((m.task, m.name), [0.0, 0.0, 0.0, 0])
                    acc[0] += m.value * weight
                    acc[1] += weight
                    acc[2] += m.value
                    acc[3] += 1
            if sums:
                metrics = tuple(
                    r.Metric(task, metric, s / w if w > 0 else plain / n)
                    for (task, metric), (s, w, plain, n) in sums.items()
                )
                out.append(r.MetricEvent(round=round_, envoy="", stage=stage, metrics=metrics, timestamp=time.time()))
        return out

    def _update_best(self, run: _Run, aggregates: list[r.MetricEvent]) -> None:
        """Round r validated model_r; keep it as best if its metric beats the best so far (r >= 1)."""
        if run.round < 1:
            return
        validation = next((e for e in aggregates if e.stage == r.STAGE_AGGREGATED), None)
        if validation is None or not validation.metrics:
            return
        row = self.store.experiment(run.row.name)
        assert row is not None
        metric_name = row.best_metric or self._default_best_metric(validation.metrics)
        values = [m.value for m in validation.metrics if m.name == metric_name or f"{m.task}/{m.name}" == metric_name]
        if not values:
            return
        value = values[0]
        higher = run.header.best_higher_is_better if row.header.best_metric else r.default_higher_is_better(metric_name)
        better = row.best_value is None or (value > row.best_value if higher else value < row.best_value)
        if better:
            tmp = self._best_path(run.row.name).with_suffix(".partial")
            shutil.copyfile(self._model_path(run.row.name, run.round), tmp)
            tmp.replace(self._best_path(run.row.name))
            self.store.update_experiment(run.row.name, best_round=run.round, best_value=value, best_metric=metric_name)
        elif not row.best_metric:
            self.store.update_experiment(run.row.name, best_metric=metric_name)

    @staticmethod
    def _default_best_metric(metrics: tuple[r.Metric, ...]) -> str:
        names = [m.name for m in metrics]
        return next((n for n in names if "acc" in n.lower()), sorted(names)[0])

    def _finish(self, run: _Run, state: str, error: str = "") -> None:
        name = run.row.name
        self.store.update_experiment(name, state=state, error=error, finished_at=self._clock())
        shutil.rmtree(self._exp_dir(name) / f"round_{run.round:04d}", ignore_errors=True)
        self.store.drop_updates(name, run.round)
        logger = self._loggers.pop(name, None)
        if logger is not None:
            logger.close()
        self._run = None
        self._resume_or_start_next()

    def _logger(self, experiment: str) -> ExperimentLogger:
        if experiment not in self._loggers:
            self._loggers[experiment] = ExperimentLogger(self.log_dir / experiment)
        return self._loggers[experiment]

    # ------------------------------------------------------------ notebook
    def experiments(self) -> list[r.ExperimentStatus]:
        return [row.status() for row in self.store.experiments()]

    def experiment_status(self, name: str) -> r.ExperimentStatus:
        row = self.store.experiment(name)
        if row is None:
            raise NotFoundError(f"no experiment named {name!r}")
        return row.status()

    def cancel_experiment(self, name: str, by: str = "") -> r.ExperimentStatus:
        """Stop a queued or running experiment; a running one's workers are told it is over."""
        with self._cond:
            row = self.store.experiment(name)
            if row is None:
                raise NotFoundError(f"no experiment named {name!r}")
            if row.state in r.TERMINAL_STATES or row.state == "submitting":
                raise PreconditionError(f"experiment {name!r} is {row.state}; only queued or running ones can be cancelled")
            reason = f"cancelled by {by}" if by else "cancelled"
            if self._run is not None and self._run.row.name == name:
                self._finish(self._run, "cancelled", error=reason)
            else:
                self.store.update_experiment(name, state="cancelled", error=reason, finished_at=self._clock())
            self._cond.notify_all()
            return self.experiment_status(name)

    def stream_events(self, name: str, is_active: Callable[[], bool], wait_s: float = 1.0) -> Iterator[r.MetricEvent]:
        """Every event of ``name`` so far, then new ones as they come, then a final 'done' event."""
        self.experiment_status(name)
        last_id = 0
        while is_active() and not self._closed:
            rows = self.store.events(name, after_id=last_id)
            for id_, event, _ in rows:
                last_id = id_
                yield event
            if rows:
                continue
            status = self.experiment_status(name)
            if status.state in r.TERMINAL_STATES and not self.store.events(name, after_id=last_id):
                yield r.MetricEvent(round=status.current_round, envoy="", stage="", experiment_done=True,
                                    state=status.state, timestamp=self._clock())
                return
            with self._cond:
                self._cond.wait_for(lambda: bool(self.store.events(name, after_id=last_id)) or self._closed
                                    or self.experiment_status(name).state in r.TERMINAL_STATES,
                                    timeout=wait_s)

    def model_chunks(self, name: str, which: str) -> Iterator[r.TensorChunk]:
        with self._cond:  # resolve and open under the lock: a round closing meanwhile removes old files
            return self._open_model(name, which)

    def _open_model(self, name: str, which: str) -> Iterator[r.TensorChunk]:
        status = self.experiment_status(name)
        if which == "best":
            path = self._best_path(name)
            if not path.exists():
                raise PreconditionError(
                    f"experiment {name!r} has no best model yet: one exists once an aggregated model was validated")
        elif which == "last":
            path = self._model_path(name, status.current_round)
        else:
            raise InvalidRequestError(f"model {which!r}: ask for 'best' or 'last'")
        if not path.exists():
            raise PreconditionError(f"experiment {name!r} has no {which} model on disk")
        return ModelFile(path).iter_chunks()
