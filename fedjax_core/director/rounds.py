"""The round engine: a running experiment's round, folding its updates and closing it.

Everything here is heavy work (checking and keeping updates, reading spooled updates,
writing models, strategy state and events) and runs *outside* the director's lock; a round's
own ``fold_lock`` orders its folds and its close. "Folding" an update checks it and keeps it
spooled (``RoundUpdates.add``); the strategy reads every kept update when the round closes.
Closing round r of a training round:

1. aggregate the envoys' metrics of round r; keep model_r as best if it beats the best so far;
2. ``strategy.aggregate(state_r, model_r, updates) -> (model_{r+1}, state_{r+1})``;
3. write model_{r+1} and state_{r+1} atomically, then record the round summary;
4. advance current_round in the database (the commit point), then drop round r's files.

A director killed anywhere in between restarts at round r, folds the stored updates again
and closes the round to the same bytes (no rule depends on the order uploads arrived in).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from fedjax_core import records as r
from fedjax_core.aggregation import RoundUpdates, ServerStrategy, Upload, build
from fedjax_core.director import rules
from fedjax_core.director.files import ExperimentFiles
from fedjax_core.director.memory import release_free_memory
from fedjax_core.director.store import ExperimentRow, Store
from fedjax_core.director.submission import RoundPlan, plan_rounds
from fedjax_core.errors import FedError, PreconditionError
from fedjax_core.metrics_log import Loggers
from fedjax_core.tensors import ModelFile, ModelFileWriter

log = logging.getLogger("fedjax.director")


@dataclasses.dataclass
class Run:
    """The running experiment's round in progress (rebuilt from the store after a restart)."""

    row: ExperimentRow
    round: int
    plan: RoundPlan
    strategy: ServerStrategy
    participants: tuple[str, ...]  # the envoys this round waits for
    upload: frozenset[str]  # the tensors that travel each round
    updates: RoundUpdates
    started_at: float  # on the engine's monotonic timer
    done: set[str] = dataclasses.field(default_factory=set)
    closing: bool = False  # set under the director's lock; no update is accepted after it
    receiving: set[str] = dataclasses.field(default_factory=set)  # envoys whose upload is streaming in
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # envoys out of this round, and why
    ended: bool = False  # the experiment finished, failed or was cancelled
    averaging: rules.Averaging = rules.Averaging.ALWAYS  # whether this round averages (see rules.round_averaging)
    from_global: bool = True  # the workers start from this round's model (it changed since they last had it)
    checked_in: dict[str, float] = dataclasses.field(default_factory=dict)  # envoy -> divergence it reported
    triggered: bool = False  # dynamic: a divergence crossed the threshold, so everyone uploads
    uploaded: set[str] = dataclasses.field(default_factory=set)
    bytes_in: dict[str, int] = dataclasses.field(default_factory=dict)  # envoy -> bytes it uploaded
    bytes_out: dict[str, int] = dataclasses.field(default_factory=dict)  # envoy -> bytes of models it downloaded
    messages: dict[str, int] = dataclasses.field(default_factory=dict)  # envoy -> model downloads and uploads
    fold_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    download_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # compressed model, once

    @property
    def header(self) -> r.ExperimentHeader:
        return self.row.header

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def envoys(self) -> tuple[str, ...]:
        """Every envoy of the experiment (they all keep a worker, selected this round or not)."""
        return self.row.envoys

    @property
    def kind(self) -> r.TaskKind:
        return r.TaskKind.TRAIN if self.round < self.header.rounds else r.TaskKind.VALIDATE

    @property
    def pending(self) -> set[str]:
        """Participants that still owe this round a result (neither reported nor dropped out)."""
        return set(self.participants) - self.done - set(self.dropped)

    @property
    def complete(self) -> bool:
        return not self.pending

    @property
    def needed(self) -> int:
        """Results this round needs to close: min_envoys (every participant when it is 0), and in a training
        round no fewer than its aggregation rule can aggregate (Krum: more than 2f + 2)."""
        return max(self.header.min_envoys or len(self.participants), self.rule_floor, 1)

    @property
    def needed_because(self) -> str:
        """What sets ``needed``, for the messages that cite it."""
        if self.rule_floor > (self.header.min_envoys or len(self.participants)):
            return f"{self.plan.strategy.name} aggregates no fewer than {self.rule_floor} uploads"
        return f"min_envoys={self.header.min_envoys}" if self.header.min_envoys else "min_envoys=0: every participant"

    @property
    def rule_floor(self) -> int:
        """The uploads the aggregation rule needs, in a training round (1 for a final validation)."""
        return self.plan.strategy.min_uploads if self.kind == r.TaskKind.TRAIN else 1

    def count_transfer(self, envoy: str, nbytes: int, upload: bool) -> None:
        """Under the director's lock: one model message of ``nbytes`` to or from ``envoy``."""
        counter = self.bytes_in if upload else self.bytes_out
        counter[envoy] = counter.get(envoy, 0) + nbytes
        self.messages[envoy] = self.messages.get(envoy, 0) + 1

    def check_in(self, envoy: str, divergence: float) -> bool:
        """Under the director's lock: record ``envoy``'s divergence; True when it must upload now.

        Under dynamic averaging the first divergence over the threshold triggers an average:
        envoys that checked in earlier owe an upload again (their next task is SYNC).
        """
        self.checked_in[envoy] = divergence
        if self.averaging == rules.Averaging.DYNAMIC and divergence > self.header.sync_threshold:
            if not self.triggered:
                self.triggered = True
                self.done -= set(self.checked_in) - self.uploaded
        if self.triggered:
            return True
        self.done.add(envoy)
        return False

    def task_kwargs(self) -> str:
        """This round's round_config entry; the final validation round uses the last training round's."""
        kwargs = self.plan.round_kwargs
        return kwargs[min(self.round, self.header.rounds - 1)] if kwargs else ""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a close ended: the next round's run, or the experiment's final state."""

    next_run: Run | None = None
    state: r.State = r.State.RUNNING
    error: str = ""


class RoundEngine:
    def __init__(self, store: Store, files: ExperimentFiles, loggers: Loggers, clock: Callable[[], float],
                 timer: Callable[[], float] = time.monotonic):
        self.store = store
        self.files = files
        self.loggers = loggers
        self.clock = clock  # wall time, for timestamps
        self.timer = timer  # monotonic, for round durations and deadlines
        self.fold_hook: Callable[[str, str], None] | None = None  # tests pause a fold here: (experiment, envoy)

    # ------------------------------------------------------------------ runs
    def new_run(self, row: ExperimentRow, round_: int, plan: RoundPlan | None = None,
                from_global: bool | None = None) -> Run:
        """The run of ``round_``; its participants are sampled (or read back) and recorded.

        ``plan``: the previous round's, when there is one (the header and envoys do not change).
        ``from_global``: whether the previous round averaged (None: look it up).
        """
        plan = plan or plan_rounds(row.header, row.envoys)
        strategy = build(plan.strategy)
        upload = frozenset(rules.upload_names(row.header))
        if round_ < row.header.rounds:
            chosen = rules.select_participants(row.envoys, plan.per_round, row.header.sampling_seed, round_)
            participants = self.store.record_participants(row.name, round_, chosen)
        else:  # after the last round every envoy validates the final model
            participants = tuple(sorted(row.envoys))
        specs = [s for s in row.header.model_spec if s.name in upload]
        if from_global is None:
            from_global = round_ == 0 or self._averaged(row.name, round_ - 1)
        return Run(row=row, round=round_, plan=plan, strategy=strategy, participants=participants, upload=upload,
                   updates=RoundUpdates(specs), started_at=self.timer(),
                   averaging=rules.round_averaging(row.header, round_),
                   from_global=from_global or round_ >= row.header.rounds)

    @staticmethod
    def plan(row: ExperimentRow) -> RoundPlan:
        """The round plan on the experiment's envoys; when refusals left fewer envoys than envoys_per_round,
        every envoy left takes part (raises InvalidRequestError when they cannot reach min_envoys)."""
        header = row.header
        if row.envoys and header.envoys_per_round > len(row.envoys):
            header = dataclasses.replace(header, envoys_per_round=len(row.envoys))
        return plan_rounds(header, row.envoys)

    def _averaged(self, name: str, round_: int) -> bool:
        """Whether closed round ``round_`` averaged (runs from before sync modes always did)."""
        for _, event, _ in self.store.events(name, round_=round_):
            if event.stage == r.Stage.ROUND and not event.envoy:
                return rules.metric_value(event.metrics, "round/averaged") != 0
        return True

    def rebuild(self, row: ExperimentRow) -> Run:
        """The run of a director that stopped mid-round: stored updates folded again."""
        run = self.new_run(row, row.current_round, self.plan(row))
        for envoy, weight, path, nbytes in self.store.updates(row.name, run.round):
            if not path.exists():  # lost with its file: that envoy uploads again
                self.store.drop_update(row.name, run.round, envoy)
                continue
            run.updates.add(Upload(envoy, weight, ModelFile(path)))
            run.done.add(envoy)
            run.uploaded.add(envoy)
            run.count_transfer(envoy, nbytes, upload=True)
        events = [e for _, e, _ in self.store.events(row.name, round_=run.round) if e.envoy]
        run.dropped = {e.envoy: e.note for e in events if e.stage == r.Stage.DROPOUT}
        for event in events:
            if event.stage == r.Stage.SYNC_CHECK and event.envoy not in run.dropped:
                run.check_in(event.envoy, rules.metric_value(event.metrics, "divergence") or 0.0)
        if run.kind == r.TaskKind.VALIDATE:
            run.done |= {e.envoy for e in events if e.stage == r.Stage.AGGREGATED}
        return run

    # ------------------------------------------------------------------ folding
    def fold(self, run: Run, envoy: str, spool, weight: float, nbytes: int) -> None:
        """Keep an envoy's spooled update and fold it in (checked now, read when the round closes). The caller
        holds ``run.fold_lock``."""
        path = self.files.keep_update(spool, run.name, run.round, envoy)
        self.store.add_update(run.name, run.round, envoy, weight, path, nbytes)  # first: a restart folds it again
        try:
            if self.fold_hook is not None:
                self.fold_hook(run.name, envoy)
            run.updates.add(Upload(envoy, weight, ModelFile(path)))  # checks everything before folding anything
        except FedError:
            self.store.drop_update(run.name, run.round, envoy)
            path.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ closing
    def close(self, run: Run) -> Outcome | None:
        """Close ``run``'s round; None if the experiment ended meanwhile (cancelled, failed).

        The caller holds ``run.fold_lock`` and has set ``run.closing``; once the next run is
        installed it drops the round's files (:meth:`ExperimentFiles.drop_round`, ``drop_superseded``),
        which workers and notebooks may still be opening until then.
        """
        name = run.name
        round_events = self.store.events(name, round_=run.round)
        aggregates = rules.aggregate_metrics(run.round, [(e, w) for _, e, w in round_events if e.envoy])
        for event in aggregates:
            if self.store.add_event(name, event):
                self.loggers.log(name, event)
        self._update_best(run, aggregates, [e for _, e, _ in round_events if e.envoy])
        if run.kind == r.TaskKind.VALIDATE:
            return Outcome(state=r.State.FINISHED)
        averaged = run.updates.count > 0
        if not averaged and not run.checked_in:
            return Outcome(state=r.State.FAILED, error=f"round {run.round} closed without any update")
        if averaged:
            self._write_next_model(run)
        else:  # every envoy keeps training its own model; the global one stays
            self.files.carry_over(name, run.round)
            if run.round == 0:  # the strategy's state begins where the model does
                self._write_state(name, 1, run.strategy.init(list(run.updates.specs.values())))
        seconds = self.timer() - run.started_at  # the round's time includes aggregating and storing its model
        if run.ended:  # cancelled or failed while this round closed: do not advance it
            return None
        for event in self._communication_events(run, seconds, averaged):
            if self.store.add_event(name, event):
                self.loggers.log(name, event)
        self.store.update_experiment(name, current_round=run.round + 1)  # the commit point
        self.store.drop_updates(name, run.round)
        row = self.store.experiment(name)
        assert row is not None
        next_run = self.new_run(row, run.round + 1, run.plan, from_global=averaged)
        release_free_memory()
        return Outcome(next_run=next_run)

    def _communication_events(self, run: Run, seconds: float, averaged: bool) -> list[r.MetricEvent]:
        """Per envoy what it moved (bytes each way, model messages, as the director counts them), then the
        round's summary. Divergence check-ins are 8-byte scalars, counted apart from model messages."""
        now = self.clock()
        events = [r.MetricEvent(round=run.round, envoy=envoy, stage=r.Stage.COMM, timestamp=now, metrics=(
            r.Metric("comm", "bytes_uploaded", run.bytes_in.get(envoy, 0)),
            r.Metric("comm", "bytes_downloaded", run.bytes_out.get(envoy, 0)),
            r.Metric("comm", "model_messages", run.messages.get(envoy, 0))))
            for envoy in run.participants]
        events.append(r.MetricEvent(
            round=run.round, envoy="", stage=r.Stage.ROUND, timestamp=now, round_time_s=seconds,
            participants=run.participants,
            metrics=(r.Metric("round", "time_s", seconds),
                     r.Metric("round", "bytes_received", sum(run.bytes_in.values())),
                     r.Metric("round", "bytes_sent", sum(run.bytes_out.values())),
                     r.Metric("round", "model_messages", sum(run.messages.values())),
                     r.Metric("round", "check_ins", len(run.checked_in)),
                     r.Metric("round", "averaged", int(averaged)),
                     r.Metric("round", "envoys_reported", len(run.done)),
                     r.Metric("round", "envoys_selected", len(run.participants)))))
        return events

    def _write_next_model(self, run: Run) -> None:
        name, round_ = run.name, run.round
        previous = ModelFile(self.files.model(name, round_))
        state_path = self.files.server_state(name, round_)
        if round_ == 0:
            state = run.strategy.init(list(run.updates.specs.values()))
        elif state_path.exists():
            state = ModelFile(state_path)
        elif not run.plan.strategy.server_optimizer:  # stateless (and runs begun before state files existed)
            state = {}
        else:
            raise PreconditionError(f"the strategy state of round {round_} is missing ({state_path})")
        new_state: dict[str, np.ndarray] = {}
        with ModelFileWriter(self.files.model(name, round_ + 1)) as writer:
            for spec in previous.specs:
                if spec.name in run.updates.specs:  # written block by block as the strategy computes it
                    writer.add_blocks(spec.name, spec.dtype, spec.shape,
                                      run.strategy.leaf(spec.name, state, previous, run.updates, new_state))
                else:  # tensors that do not travel keep their initial values
                    writer.copy_tensor(previous, spec.name)
            writer.commit()
        self._write_state(name, round_ + 1, new_state)

    def _write_state(self, name: str, round_: int, state) -> None:
        with ModelFileWriter(self.files.server_state(name, round_)) as writer:
            for key, array in state.items():
                writer.add_array(key, np.asarray(array))
            writer.commit()

    def _update_best(self, run: Run, aggregates: list[r.MetricEvent], reports: list[r.MetricEvent]) -> None:
        """Round r validated model_r; keep it as best if its metric beats the best so far (r >= 1). Unless the
        notebook named the metric, it is chosen among those every envoy that validated reported, so that no
        single envoy can pick it by reporting a name of its own."""
        if run.round < 1:
            return
        validation = next((e for e in aggregates if e.stage == r.Stage.AGGREGATED), None)
        if validation is None or not validation.metrics:
            return
        row = self.store.experiment(run.name)
        assert row is not None
        metric = row.best_metric
        if not metric:
            shared = rules.metrics_everyone_reported([e for e in reports if e.stage == r.Stage.AGGREGATED])
            candidates = tuple(m for m in validation.metrics if m.name in shared)
            if not candidates:
                return
            metric = rules.default_best_metric(candidates)
        value = rules.metric_value(validation.metrics, metric)
        if value is None:
            return
        higher = (run.header.best_higher_is_better if row.header.best_metric
                  else r.default_higher_is_better(metric))
        if rules.is_better(value, row.best_value, higher):
            self.files.copy_best(run.name, run.round)
            self.store.update_experiment(run.name, best_round=run.round, best_value=value, best_metric=metric)
        elif not row.best_metric:
            self.store.update_experiment(run.name, best_metric=metric)

