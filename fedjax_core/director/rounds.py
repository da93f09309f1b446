"""The round engine: a running experiment's round, keeping its updates and closing it.

Everything here is heavy work (checking and keeping updates, reading spooled updates,
writing models, strategy state and events) and runs *outside* the director's lock; a round's
own ``keep_lock`` orders the keeping of its updates and its close. Keeping an update checks it
and keeps it spooled (``RoundUpdates.add``); the strategy reads every kept update when the round
closes.
Closing round r of a training round:

1. aggregate the envoys' metrics of round r; keep model_r as best if it beats the best so far;
2. ``strategy.aggregate(state_r, model_r, updates) -> (model_{r+1}, state_{r+1})``;
3. write model_{r+1} and state_{r+1} atomically, then record the round summary;
4. advance current_round in the database (the commit point), then drop round r's files.

A director killed anywhere in between restarts at round r, keeps the stored updates again
and closes the round to the same bytes (no rule depends on the order uploads arrived in).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

from fedjax_core import records as r
from fedjax_core.aggregation import RoundUpdates, Upload
from fedjax_core.director import closer, rules
from fedjax_core.director.files import ExperimentFiles
from fedjax_core.director.round_machine import CheckedIn, Dropped, Phase, RoundState, Validated, restore
from fedjax_core.director.memory import release_free_memory
from fedjax_core.director.round_models import FileRoundModels, RoundModels
from fedjax_core.director.store import ExperimentRow, NewUpdate
from fedjax_core.director.store_api import Store
from fedjax_core.director.submission import RoundPlan, plan_rounds
from fedjax_core.errors import FedError, InvalidRequestError
from fedjax_core.metrics_log import Loggers
from fedjax_core.personal import personal_names
from fedjax_core.privacy import accounting, central
from fedjax_core.privacy.local import envoy_treatment
from fedjax_core.director.secure_rounds import SecureRound, secure_leaves
from fedjax_core.secagg.protocol import SecAggError
from fedjax_core.spec import ExperimentSpec, PrivacyMode
from fedjax_core.model_file import ModelFile

log = logging.getLogger("fedjax.director")


@dataclasses.dataclass
class Traffic:
    """What each envoy moved in one round, as the director counts it (model messages each way)."""

    bytes_in: dict[str, int] = dataclasses.field(default_factory=dict)  # envoy -> bytes it uploaded
    bytes_out: dict[str, int] = dataclasses.field(default_factory=dict)  # envoy -> bytes of models it downloaded
    messages: dict[str, int] = dataclasses.field(default_factory=dict)  # envoy -> model downloads and uploads

    def count(self, envoy: str, nbytes: int, upload: bool) -> None:
        counter = self.bytes_in if upload else self.bytes_out
        counter[envoy] = counter.get(envoy, 0) + nbytes
        self.messages[envoy] = self.messages.get(envoy, 0) + 1


@dataclasses.dataclass
class Run:
    """A running experiment's round: its state machine (``state``, replaced under the director's lock)
    and what the director keeps beside it (the kept updates, transfers in flight, traffic)."""

    row: ExperimentRow
    plan: RoundPlan
    state: RoundState
    upload: frozenset[str]  # the tensors that travel each round
    updates: RoundUpdates
    started_at: float  # on the engine's monotonic timer
    from_global: bool = True  # the workers start from this round's model (it changed since they last had it)
    receiving: set[str] = dataclasses.field(default_factory=set)  # envoys whose upload is streaming in
    traffic: Traffic = dataclasses.field(default_factory=Traffic)
    keep_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # orders keeping updates and the close
    download_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # compressed model, once
    secure: SecureRound | None = None  # a training round's secure aggregation (SecAgg+)
    personal: frozenset[str] = frozenset()  # the tensors that stay with each envoy (spec.personal): never uploaded

    @property
    def spec(self) -> ExperimentSpec:
        return self.row.spec

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def round(self) -> int:
        return self.state.round

    @property
    def ended(self) -> bool:
        return self.state.phase == Phase.ENDED

    def task_kwargs(self) -> str:
        """This round's round_config entry; the final validation round uses the last training round's."""
        kwargs = self.plan.round_kwargs
        return kwargs[min(self.round, self.spec.rounds - 1)] if kwargs else ""

    def task_for(self, envoy: str) -> r.Task:
        """What ``envoy``'s worker should do now (kind NONE: nothing yet)."""
        state = self.state
        if envoy not in state.envoys:
            return r.Task(kind=r.TaskKind.FINISHED, message=f"envoy {envoy!r} is not a collaborator of {self.name!r}")
        if not state.open or not state.owes(envoy):
            return r.Task(kind=r.TaskKind.NONE)  # sits this round out, keeping its worker and jit cache
        s = self.spec
        kind = r.TaskKind.SYNC if envoy in state.checked_in else state.kind  # trained already: dynamic averaging
        secagg = None
        if self.secure is not None:
            if self.secure.trained(envoy):  # trained: the protocol's next step, or wait for the others
                step = self.secure.task_step(envoy)
                if step is None:
                    return r.Task(kind=r.TaskKind.NONE)
                return r.Task(kind=r.TaskKind.SECAGG, round=state.round, secagg=step)
            secagg = self.secure.setup_step()
        clip_norm, noise_std = envoy_treatment(s.privacy)
        check_in = state.averaging != rules.Averaging.ALWAYS
        return r.Task(kind=kind, round=state.round, opt_treatment=s.opt_treatment,
                      upload_tensors=tuple(sorted(self.upload)), task_kwargs=self.task_kwargs(),
                      from_global=self.from_global, check_in=check_in,
                      compression=s.communication.compression, send_deltas=s.communication.send_deltas,
                      clip_norm=clip_norm, noise_std=noise_std, secagg=secagg, personal=s.personal,
                      reports_with_upload=kind == r.TaskKind.TRAIN and not check_in and secagg is None)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a close ended: the next round's run, or the experiment's final state."""

    next_run: Run | None = None
    state: r.State = r.State.RUNNING
    error: str = ""


class RoundEngine:
    """Builds each round's run (sampling its participants, or reading them back after a restart), keeps
    the updates, and closes rounds: the heavy work, outside the director's lock."""

    def __init__(self, store: Store, files: ExperimentFiles | None, loggers: Loggers, clock: Callable[[], float],
                 timer: Callable[[], float] = time.monotonic, models: RoundModels | None = None):
        self.store = store
        self.files = files  # spooled uploads (keep); None where updates arrive in memory (the simulation)
        self.models = models if models is not None else FileRoundModels(files)  # what closing a round reads and writes
        self.loggers = loggers
        self.clock = clock  # wall time, for timestamps
        self.timer = timer  # monotonic, for round durations and deadlines

    # ------------------------------------------------------------------ runs
    def new_run(self, row: ExperimentRow, round_: int, plan: RoundPlan | None = None,
                from_global: bool | None = None) -> Run:
        """The run of ``round_``; its participants are sampled (or read back) and recorded.

        ``plan``: the previous round's, when there is one (the spec and envoys do not change).
        ``from_global``: whether the previous round averaged (None: look it up).
        """
        plan = plan or plan_rounds(row.spec, row.envoys)
        spec = row.spec
        upload = frozenset(rules.upload_names(spec))
        training = round_ < self.rounds_to_train(row, plan)
        if training:
            chosen = rules.select_participants(row.envoys, plan.per_round, spec.sampling.seed, round_)
            participants = self.store.record_participants(row.name, round_, chosen)
        else:  # after the last round every envoy validates the final model
            participants = tuple(sorted(row.envoys))
        state = RoundState(
            experiment=row.name, round=round_, kind=r.TaskKind.TRAIN if training else r.TaskKind.VALIDATE,
            participants=participants, envoys=row.envoys, min_envoys=spec.deadline.min_envoys,
            rule_floor=plan.strategy.min_uploads if training else 1, rule_name=plan.strategy.name,
            averaging=rules.round_averaging(spec, round_), sync_threshold=spec.communication.sync_threshold,
            timeout_s=spec.deadline.round_timeout_s)
        if from_global is None:
            from_global = round_ == 0 or self._averaged(row.name, round_ - 1)
        check = central.upload_check(spec.privacy, lambda: self.models.model(row.name, round_))
        uploaded = [t for t in spec.model_spec if t.name in upload]
        secure = None
        if training and spec.secure.enabled:
            secure, check = self._secure_round(row, round_, participants, uploaded), None
        return Run(row=row, plan=plan, state=state, upload=upload, updates=RoundUpdates(uploaded, check),
                   started_at=self.timer(), from_global=from_global or not training, secure=secure,
                   personal=frozenset(personal_names([t.name for t in spec.model_spec], spec.personal)))

    def _secure_round(self, row: ExperimentRow, round_: int, participants: tuple[str, ...],
                      uploaded: list[r.TensorSpec]) -> SecureRound:
        """The round's SecAgg+: envoys weigh their change by their train samples over the largest registered among
        the participants (unweighted under central DP, whose sensitivity needs it). Integer params are not summed:
        they keep the round's model's values."""
        weight_scale = 0.0
        if row.spec.privacy.mode != PrivacyMode.CENTRAL:
            largest = max((row.envoy_sizes.get(e, (0, 0))[0] for e in participants), default=0)
            weight_scale = 1.0 / largest if largest > 0 else 0.0
        leaves = secure_leaves(uploaded)
        others = [t for t in uploaded if t not in leaves]
        return SecureRound(row.name, round_, participants, row.spec.secure, leaves, weight_scale,
                           row.spec.sampling.seed + round_, others)

    @staticmethod
    def privacy_rate(row: ExperimentRow, plan: RoundPlan) -> float:
        """The fraction of the experiment's envoys that train in a round, as the privacy accountant takes it.
        Refusals only shrink the envoys, so the current fraction bounds every earlier round's."""
        return accounting.sampling_rate(plan.per_round, len(row.envoys))

    def rounds_to_train(self, row: ExperimentRow, plan: RoundPlan) -> int:
        """``rounds_to_train``, or fewer when central DP's ``max_epsilon`` would be exceeded."""
        if not row.spec.privacy.max_epsilon:
            return row.spec.rounds
        return accounting.rounds_within(row.spec, self.privacy_rate(row, plan))

    @staticmethod
    def plan(row: ExperimentRow) -> RoundPlan:
        """The round plan on the experiment's envoys; when refusals left fewer envoys than envoys_per_round,
        every envoy left takes part (raises InvalidRequestError when they cannot reach min_envoys)."""
        spec = row.spec
        if row.envoys and spec.sampling.envoys_per_round > len(row.envoys):
            spec = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling,
                                                                          envoys_per_round=len(row.envoys)))
        return plan_rounds(spec, row.envoys)

    def _averaged(self, name: str, round_: int) -> bool:
        """Whether closed round ``round_`` averaged (runs from before sync modes always did)."""
        for _, event, _ in self.store.events(name, round_=round_):
            if event.stage == r.Stage.ROUND and not event.envoy:
                return rules.metric_value(event.metrics, "round/averaged") != 0
        return True

    def rebuild(self, row: ExperimentRow) -> Run:
        """The run of a director that stopped mid-round, as its database left it: the stored updates kept
        again, dropouts, check-ins and final validations restored (feed it ``Resumed`` next)."""
        run = self.new_run(row, row.current_round, self.plan(row))
        uploaded = []
        for envoy, weight, path, nbytes in self.store.updates(row.name, run.round):
            if not path.exists():  # lost with its file: that envoy uploads again
                self.store.drop_update(row.name, run.round, envoy)
                continue
            run.updates.add(Upload(envoy, weight, ModelFile(path)))
            run.traffic.count(envoy, nbytes, upload=True)
            uploaded.append(envoy)
        history = []  # the round's check-ins, dropouts and validations, in the order they were recorded
        for _, e, _ in self.store.events(row.name, round_=run.round):
            if e.envoy and e.stage == r.Stage.SYNC_CHECK:
                history.append(CheckedIn(e.envoy, rules.metric_value(e.metrics, "divergence") or 0.0))
            elif e.envoy and e.stage == r.Stage.DROPOUT:
                history.append(Dropped(e.envoy, "dropped out", e.note))
            elif e.envoy and e.stage == r.Stage.AGGREGATED:
                history.append(Validated(e.envoy))
        run.state = restore(run.state, uploaded, history)
        return run

    def registered(self, run: Run, envoy: str) -> tuple[int, int]:
        """``envoy``'s (train, valid) size when ``run``'s experiment started (experiments started by an older
        director, which kept no sizes: as registered now)."""
        if envoy in run.row.envoy_sizes:
            return run.row.envoy_sizes[envoy]
        found = self.store.envoy(envoy)
        return (found[0].train_size, found[0].valid_size) if found is not None else (0, 0)

    def report_weight(self, run: Run, envoy: str, stage: str, sample_count: int) -> float:
        """A metric report's weight: its sample count, at most the samples of the split it measured as registered."""
        train, valid = self.registered(run, envoy)
        return min(max(sample_count, 0), train if stage == r.Stage.TRAIN else valid)

    def weight(self, run: Run, envoy: str, sample_count: int) -> float:
        """An update's weight: its claimed sample count, capped at the train size the envoy had registered when
        the experiment started."""
        registered = self.registered(run, envoy)[0]
        if registered <= 0:
            raise InvalidRequestError(
                f"envoy {envoy!r} had registered no training samples when experiment {run.name!r} started, so its "
                "update cannot be weighted: check its shard descriptor's split_sizes()")
        if registered < sample_count:
            log.warning("envoy %r claims %d training samples but registered %d; weighting it by %d",
                        envoy, sample_count, registered, registered)
            return float(registered)
        return float(sample_count)

    # ------------------------------------------------------------------ keeping
    def keep(self, run: Run, spooled: Sequence[NewUpdate]) -> list[list[bool] | FedError]:
        """Keep envoys' spooled updates for the round (``path``: the spool; checked now, read when the round
        closes), with the metric events each carried, in one write: for each, which of its events were added,
        or the FedError that kept none of it. The caller holds ``run.keep_lock``."""
        paths = self.files.keep_updates(run.name, run.round, [(update.envoy, update.path) for update in spooled])
        kept = [update._replace(path=path) for update, path in zip(spooled, paths)]
        answers: list[list[bool] | FedError] = []
        for update, added in zip(kept, self.store.add_updates(run.name, run.round, kept)):  # first: a restart keeps it again
            if not isinstance(added, FedError):
                try:
                    run.updates.add(Upload(update.envoy, update.weight, ModelFile(update.path)))  # checks it all first
                except FedError as exc:
                    self.store.drop_update(run.name, run.round, update.envoy)
                    update.path.unlink(missing_ok=True)
                    added = exc
            answers.append(added)
        return answers

    # ------------------------------------------------------------------ closing
    def close(self, run: Run) -> Outcome | None:
        """Close ``run``'s round; None if the experiment ended meanwhile (cancelled, failed).

        The caller holds ``run.keep_lock`` and the round is CLOSING; once the next run is
        installed it drops the round's files (:meth:`ExperimentFiles.retire_round`, which keeps large updates as
        spares for the next round's spools; ``drop_superseded``), which workers and notebooks may still be
        opening until then.
        """
        name = run.name
        round_events = self.store.events(name, round_=run.round)
        aggregates = rules.aggregate_metrics(run.round, [(e, w) for _, e, w in round_events if e.envoy])
        for event in aggregates:
            if self.store.add_event(name, event):
                self.loggers.log(name, event)
        self._update_best(run, aggregates, [e for _, e, _ in round_events if e.envoy])
        if run.state.kind == r.TaskKind.VALIDATE:
            return Outcome(state=r.State.FINISHED)
        summed, secure_note = self._unmask(run) if run.secure is not None else (0, "")
        averaged = run.updates.count > 0
        if not averaged and not run.state.checked_in and not secure_note:
            return Outcome(state=r.State.FAILED, error=f"round {run.round} closed without any update")
        privacy_metrics = {}
        if averaged:
            privacy_metrics = closer.write_next_model(self.models, name, run.round, run.plan.strategy, run.updates,
                                                      run.spec.privacy, run.plan.per_round, summed)
        else:  # every envoy keeps training its own model; the global one stays
            self.models.carry_over(name, run.round)
            if run.round == 0:  # the strategy's state begins where the model does
                closer.write_initial_state(self.models, name, 1, run.plan.strategy, list(run.updates.specs.values()))
        seconds = self.timer() - run.started_at  # the round's time includes aggregating and storing its model
        if run.ended:  # cancelled or failed while this round closed: do not advance it
            return None
        events = self._communication_events(run, seconds, averaged)
        if run.spec.privacy.enabled:
            events[-1] = self._with_privacy(run, events[-1], privacy_metrics)
        if secure_note:
            log.warning("experiment %r: %s", name, secure_note)
            events[-1] = dataclasses.replace(events[-1], note="; ".join(filter(None, [secure_note, events[-1].note])))
        for event in events:
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
        now, state, traffic = self.clock(), run.state, run.traffic
        events = [r.MetricEvent(round=run.round, envoy=envoy, stage=r.Stage.COMM, timestamp=now, metrics=(
            r.Metric("comm", "bytes_uploaded", traffic.bytes_in.get(envoy, 0)),
            r.Metric("comm", "bytes_downloaded", traffic.bytes_out.get(envoy, 0)),
            r.Metric("comm", "model_messages", traffic.messages.get(envoy, 0))))
            for envoy in state.participants]
        events.append(r.MetricEvent(
            round=run.round, envoy="", stage=r.Stage.ROUND, timestamp=now, round_time_s=seconds,
            participants=state.participants,
            metrics=(r.Metric("round", "time_s", seconds),
                     r.Metric("round", "bytes_received", sum(traffic.bytes_in.values())),
                     r.Metric("round", "bytes_sent", sum(traffic.bytes_out.values())),
                     r.Metric("round", "model_messages", sum(traffic.messages.values())),
                     r.Metric("round", "check_ins", len(state.checked_in)),
                     r.Metric("round", "averaged", int(averaged)),
                     r.Metric("round", "envoys_reported", len(state.done)),
                     r.Metric("round", "envoys_selected", len(state.participants)))))
        return events

    def _unmask(self, run: Run) -> tuple[int, str]:
        """A secure round's sum, kept as the round's one upload: (envoys it sums, ''), or (0, why it failed)."""
        why = run.secure.failed
        if not why:
            try:
                upload, summed = run.secure.aggregate(self.models.model(run.name, run.round))
                run.updates.add(upload)
                return summed, ""
            except SecAggError as exc:
                why = str(exc)
        return 0, (f"the secure aggregation of round {run.round} failed: {why}; the model stays as it was and the "
                   "experiment goes on")

    def _with_privacy(self, run: Run, event: r.MetricEvent, metrics: dict[str, float]) -> r.MetricEvent:
        """The round's summary with what it spent: epsilon at delta so far, the clipping norm and noise it used;
        its note says so when the privacy budget ends training before rounds_to_train."""
        rate = self.privacy_rate(run.row, run.plan)
        epsilon = accounting.experiment_epsilon(run.spec, run.round + 1, rate)
        extra = [r.Metric("privacy", "epsilon", epsilon), r.Metric("privacy", "delta", run.spec.privacy.delta)]
        if rate < 1:  # against whoever knows who took part (the notebook does), sampling amplifies nothing
            extra.append(r.Metric("privacy", "epsilon_unsampled", accounting.experiment_epsilon(run.spec, run.round + 1,
                                                                                               1.0)))
        extra += [r.Metric("privacy", key, value) for key, value in metrics.items()]
        note = ""
        if run.spec.privacy.max_epsilon and epsilon > run.spec.privacy.max_epsilon:
            note = (f"epsilon is {epsilon:.4g}, above max_epsilon={run.spec.privacy.max_epsilon:g}: envoys left the "
                    "experiment during this round, which raised the fraction sampled each round; training stops "
                    "here and every envoy validates the last model")
            log.warning("experiment %r: %s", run.name, note)
            extra.append(r.Metric("privacy", "training_stopped", 1))
        last = self.rounds_to_train(run.row, run.plan)
        if run.round + 1 == last < run.spec.rounds:
            after = accounting.experiment_epsilon(run.spec, last + 1, rate)
            note = (f"training stops after round {run.round}: round {last} would raise epsilon to {after:.4g}, above "
                    f"max_epsilon={run.spec.privacy.max_epsilon:g} (epsilon is {epsilon:.4g} at delta="
                    f"{run.spec.privacy.delta:g}); every envoy now validates the last model")
            log.info("experiment %r: %s", run.name, note)
            extra.append(r.Metric("privacy", "training_stopped", 1))
        return dataclasses.replace(event, metrics=event.metrics + tuple(extra), note=note)

    def _update_best(self, run: Run, aggregates: list[r.MetricEvent], reports: list[r.MetricEvent]) -> None:
        """Round r validated model_r; keep it as best if its metric beats the best so far (r >= 1). Unless the
        notebook named the metric, it is chosen among those every envoy that validated reported, so that no
        single envoy can pick it by reporting a name of its own. An evaluation-only experiment's (rounds_to_train=0)
        one validated model is its best."""
        if run.round < 1 and self.rounds_to_train(run.row, run.plan) > 0:
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
        higher = (run.spec.best.higher_is_better if row.spec.best.metric
                  else r.default_higher_is_better(metric))
        if rules.is_better(value, row.best_value, higher):
            self.models.keep_best(run.name, run.round)
            self.store.update_experiment(run.name, best_round=run.round, best_value=value, best_metric=metric)
        elif not row.best_metric:
            self.store.update_experiment(run.name, best_metric=metric)

