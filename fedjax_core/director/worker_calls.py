"""What an experiment's workers (and their envoy's daemon) call during its rounds.

Each call checks who asks and for what (the experiment runs, the envoy works for it, the round is
the one it names), does its heavy part outside the director's lock (streaming a model, recording
reports), and turns what happened into a round event for the director to step and act on. Uploads
have a module of their own (:mod:`fedjax_core.director.uploads`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedjax_core import records as r
from fedjax_core import serde
from fedjax_core.director import limits, round_machine, transfers
from fedjax_core.director.model_cache import RoundModelCache
from fedjax_core.director.round_machine import CheckedIn, Dropped, Effect, Failed, Refused, UpdateStored, Validated
from fedjax_core.director.rounds import Run
from fedjax_core.errors import FedError, InvalidRequestError, NotFoundError, PreconditionError
from fedjax_core.model_file import ModelFile
from fedjax_core.tensors import TensorError, nbytes_of

if TYPE_CHECKING:
    from fedjax_core.director.core import Director

log = logging.getLogger("fedjax.director")


# A round model up to this size rides inside each participant's task: a round opening for every envoy at once then
# holds at most this much per waiting call (settings.max_waiting_calls) in answers not yet sent.
INLINE_MODEL_BYTES = 16 << 10
INLINE_CACHE_BYTES = 1 << 20  # inline models kept, over all experiments (64 at the largest)
# A round model up to this size is read, packed and serialized once for all its participants' GetRoundModel (kept
# while the round runs, within this bound over all experiments); a larger one is read from disk for each.
DOWNLOAD_CACHE_BYTES = 64 << 20


class WorkerCalls:
    def __init__(self, director: Director):
        self.director = director  # owns the lock and the runs, and carries out what the rounds decide
        self._inline: RoundModelCache[tuple[list[r.TensorChunk] | None, int]] = RoundModelCache(INLINE_CACHE_BYTES)
        self._downloads: RoundModelCache[tuple[list[bytes], int]] = RoundModelCache(DOWNLOAD_CACHE_BYTES)

    def forget(self, experiment: str) -> None:
        """Drop what is kept of an ended experiment's round models."""
        self._inline.drop(experiment)
        self._downloads.drop(experiment)

    def running(self, envoy: str, experiment: str) -> Run:
        """Under the lock: ``experiment``'s run, refused unless it runs and ``envoy`` works for it."""
        d = self.director
        run = d.run(experiment)
        if run is None:
            row = d.catalog.row(experiment)
            raise PreconditionError(f"experiment {experiment!r} is {row.state}, not running")
        if envoy not in run.state.envoys:
            raise PreconditionError(f"envoy {envoy!r} is not a collaborator of experiment {experiment!r}")
        return run

    def experiment_for(self, envoy: str, sent: Collection[str] = ()) -> list[str]:
        """The running experiments that need ``envoy`` now, but those in ``sent`` (told already)."""
        d = self.director
        with d.lock:
            return [run.name for run in d.runs() if run.name not in sent and envoy in run.state.envoys
                    and not (run.state.kind == r.TaskKind.VALIDATE and envoy in run.state.done)]

    def experiment_bundle(self, envoy: str, experiment: str) -> Path:
        d = self.director
        with d.lock:
            self.running(envoy, experiment)
        return d.files.bundle(experiment)

    def current_task(self, envoy: str, experiment: str) -> r.Task:
        """What ``envoy``'s worker should do now (kind NONE: nothing yet, wait for a change)."""
        d = self.director
        with d.lock:
            run = d.run(experiment)
            if run is not None:
                return run.task_for(envoy)
        state = d.store.experiment_state(experiment)  # every worker asks once its experiment ended: read no spec
        if state is None:
            raise NotFoundError(f"no experiment named {experiment!r}")
        if state in r.TERMINAL_STATES:
            return r.Task(kind=r.TaskKind.FINISHED, message=f"experiment {experiment!r} is {state}")
        return r.Task(kind=r.TaskKind.NONE)

    def task_in_memory(self, envoy: str, experiment: str, inline: bool) -> tuple[r.Task, list[r.TensorChunk] | None] | None:
        """``task_with_model`` from memory alone, on the event loop: nothing to do yet, or a task with the round's
        model already made for another participant. None when it cannot tell at once (the lock is busy, the
        experiment is not running, the model is not made yet or is encoded for download): ``task_with_model``
        tells then, on a pool thread."""
        d = self.director
        if not d.lock.acquire(blocking=False):
            return None
        try:
            run = d.run(experiment)
            if run is None:
                return None
            task = run.task_for(envoy)
            if not _carries_model(task, inline):
                return task, None
            if task.round != run.round or not run.state.open or run.spec.communication.compress_downloads:
                return None
            kept = self._inline.kept(experiment, d.files.model(experiment, task.round))
            if kept is None:
                return None
            chunks, size = kept[0]
            if chunks is not None:
                run.traffic.count(envoy, size, upload=False)
            return task, chunks
        finally:
            d.lock.release()

    def round_model(self, envoy: str, experiment: str, round_: int) -> Iterator[bytes]:
        """Stream the model of ``round_`` to a worker as serialized TensorChunk messages: only the tensors its
        opt_treatment moves. Up to DOWNLOAD_CACHE_BYTES, made once for every participant of the round."""
        run, path = self._open_round_model(envoy, experiment, round_)
        model = ModelFile(path)
        names = [n for n in model.names() if n in run.upload]
        if sum(nbytes_of(model.spec(n)) for n in names) <= DOWNLOAD_CACHE_BYTES:
            messages, sent = self._downloads.get(experiment, path, lambda _: _serialized(model, names))
            yield from messages
        else:
            sent = 0
            for message, nbytes in _messages(model, names):
                sent += nbytes
                yield message
        self._count_download(run, envoy, sent)

    def _open_round_model(self, envoy: str, experiment: str, round_: int) -> tuple[Run, Path]:
        """The run and the file a worker's GetRoundModel reads, refused unless ``round_`` is open."""
        d = self.director
        with d.lock:
            run = self.running(envoy, experiment)
            if round_ != run.round or not run.state.open:
                closing = " (closing)" if run.state.phase == round_machine.Phase.CLOSING else ""
                raise PreconditionError(f"round {round_} is not open: the current round of {experiment!r} is "
                                        f"{run.round}{closing}")
            return run, transfers.download_path(d.files, run, d.files.model(experiment, round_))

    def _count_download(self, run: Run, envoy: str, sent: int) -> None:
        d = self.director
        with d.lock:
            if d.run(run.name) is run:
                run.traffic.count(envoy, sent, upload=False)

    def task_with_model(self, envoy: str, experiment: str, inline: bool) -> tuple[r.Task, list[r.TensorChunk] | None]:
        """``current_task``, and with ``inline`` the round's model to carry with it (``inline_model``) when the
        task starts from it; None: none to carry (the worker calls GetRoundModel if it needs it)."""
        task = self.current_task(envoy, experiment)
        if not _carries_model(task, inline):
            return task, None
        try:
            return task, self.inline_model(envoy, experiment, task.round)
        except (PreconditionError, OSError, TensorError):  # the round ended or moved on meanwhile (its file went):
            return task, None  # the task goes as it is, and GetRoundModel tells the worker

    def inline_model(self, envoy: str, experiment: str, round_: int) -> list[r.TensorChunk] | None:
        """The chunks of ``round_``'s model for a worker to take inside its task (WaitTaskResponse.model); None
        when the model is larger than INLINE_MODEL_BYTES (the worker streams it with GetRoundModel). Read once
        per round and kept: every participant takes the same chunks."""
        d = self.director
        with d.lock:
            run = self.running(envoy, experiment)
            if round_ != run.round or not run.state.open:
                return None  # the round moved on since the task was read: the worker asks again
            path = transfers.download_path(d.files, run, d.files.model(experiment, round_))
        chunks, size = self._inline.get(experiment, path, lambda path: _inline_chunks(run, path))
        if chunks is not None:
            self._count_download(run, envoy, size)
        return chunks

    def prepare(self, run: Run) -> None:
        """Make a new round's inline model before its participants ask for it all at once (each would otherwise
        miss the cache and ask again on a thread while the first makes it). Without the lock, before the round
        is installed; a failure here leaves the making to the round's first task."""
        if run.spec.communication.compress_downloads or run.state.kind not in (r.TaskKind.TRAIN, r.TaskKind.VALIDATE):
            return
        try:
            self._inline.get(run.name, self.director.files.model(run.name, run.round),
                             lambda path: _inline_chunks(run, path))
        except (OSError, TensorError, FedError):
            log.debug("the inline model of round %d of %r is made at its first task instead", run.round, run.name,
                      exc_info=True)

    def report_metrics(self, envoy: str, experiment: str, round_: int, stage: str,
                       metrics: tuple[r.Metric, ...], sample_count: int) -> None:
        report = r.StageReport(stage, metrics, sample_count)
        limits.check_reports(envoy, [report])
        with self.director.lock:
            run = self._reporting_run(envoy, experiment, round_)
        self._record(run, envoy, round_, [report])

    def _reporting_run(self, envoy: str, experiment: str, round_: int) -> Run:
        """Under the lock: the run ``envoy`` reports round ``round_``'s metrics to, refused unless it takes part."""
        run = self.running(envoy, experiment)
        if round_ != run.round:
            raise PreconditionError(f"round {round_} is not the current round ({run.round}) of {experiment!r}")
        if envoy not in run.state.participants:
            raise PreconditionError(f"envoy {envoy!r} was not selected for round {round_} of {experiment!r}")
        return run

    def report_events(self, run: Run, envoy: str, round_: int,
                reports: Sequence[r.StageReport]) -> list[tuple[r.MetricEvent, float]]:
        """Checked ``reports`` of ``envoy`` as the ``(event, weight)`` pairs the store records."""
        d = self.director
        now = d.clock()
        return [(r.MetricEvent(round=round_, envoy=envoy, stage=r.Stage(rep.stage), metrics=rep.metrics,
                               timestamp=now), d.engine.report_weight(run, envoy, rep.stage, rep.sample_count))
                for rep in reports]

    def log_events(self, run: Run, events: Sequence[tuple[r.MetricEvent, float]], added: Sequence[bool]) -> None:
        """Hand the recorded events that were new to the metric sinks."""
        for (event, _), new in zip(events, added):
            if new:
                self.director.loggers.log(run.name, event)

    def _record(self, run: Run, envoy: str, round_: int, reports: Sequence[r.StageReport]) -> None:
        """Record checked ``reports`` of ``envoy`` in one write, log them, and tell the round of a validation."""
        d = self.director
        events = self.report_events(run, envoy, round_, reports)
        self.log_events(run, events, d.store.add_events(run.name, events))
        effects: tuple[Effect, ...] = ()
        with d.lock:
            validated = any(rep.stage == r.Stage.AGGREGATED for rep in reports)
            if validated and run.state.kind == r.TaskKind.VALIDATE and d.run(run.name) is run:  # only it waits for them
                effects = d.act(run, Validated(envoy))
            d.changed(envoy)
        d.after(run, effects)

    def secure_step(self, envoy: str, experiment: str, round_: int, phase: str, keys: r.SecAggKeys | None = None,
                    items: dict[str, bytes] | None = None) -> None:
        """A worker's keys, encrypted shares or revealed shares for its secure round; revealing is its last step,
        after which the round counts it as done."""
        d = self.director
        size = sum(len(v) for v in (items or {}).values()) + (64 if keys is not None else 0)
        with d.lock:
            run = self.running(envoy, experiment)
            if run.secure is None or round_ != run.round or not run.state.open or not run.state.owes(envoy):
                raise PreconditionError(f"round {round_} of {experiment!r} does not take envoy {envoy!r}'s secure "
                                        "aggregation steps now")
            run.secure.add(envoy, phase, keys, items)
            run.traffic.count(envoy, size, upload=True)
            if phase == "reveal":
                effects = d.act(run, UpdateStored(envoy))
            else:
                effects = d.advance_secure(run)
                d.changed(envoy)
        d.after(run, effects)

    def check_in(self, envoy: str, experiment: str, round_: int, divergence: float) -> bool:
        """Periodic and dynamic averaging: ``envoy`` trained round ``round_`` and its model is ``divergence``
        (squared L2) from the round's global model. True: upload it now; False: keep training it."""
        d = self.director
        if not (math.isfinite(divergence) and divergence >= 0):
            raise InvalidRequestError(f"envoy {envoy!r} reported divergence {divergence}: a squared distance is a "
                                      "finite number >= 0 (NaN or infinity: training diverged)")
        with d.lock:
            run = self.running(envoy, experiment)
            round_machine.check_check_in(run.state, envoy, round_)
            effects = d.act(run, CheckedIn(envoy, divergence))
            upload = run.state.must_upload(envoy)
        event = r.MetricEvent(round=round_, envoy=envoy, stage=r.Stage.SYNC_CHECK, timestamp=d.clock(),
                              metrics=(r.Metric("sync", "divergence", divergence),))
        if d.store.add_event(experiment, event):
            d.loggers.log(experiment, event)
        with d.lock:  # after the event, so a metric stream woken by this change finds it
            d.changed()
        d.after(run, effects)
        return upload

    def report_failure(self, envoy: str, experiment: str, error: str, round_: int | None = None,
                       worker_lost: bool = False, refused: bool = False) -> None:
        """A task failed in ``round_`` (a dropout from that round), or a worker cannot go on (``round_`` None).

        A dropout ends the experiment only when the round can no longer reach its needed results
        (min_envoys, or every participant when that is 0); otherwise the others go on and the
        notebook is told who dropped out, why, and how many continue. ``worker_lost``: the envoy's
        worker died; it drops out of the round in progress if it still owed it a result (the
        envoy starts a new worker, which joins the next round). ``refused``: the envoy refuses the
        experiment (settings.accept_from, its operator's review, a bundle that fails its check): it
        drops out of every remaining round.
        """
        d = self.director
        error = limits.clip_error(error)
        with d.lock:
            run = self.running(envoy, experiment)
            owes_this_round = run.state.open and run.state.owes(envoy)
            if refused:
                event: round_machine.Event = Refused(envoy, error, self._rounds_without(run, envoy))
            else:
                if worker_lost:
                    if not owes_this_round:
                        return  # its next worker simply joins the next round
                    round_ = run.round
                if round_ is not None and (round_ != run.round or not owes_this_round):
                    raise PreconditionError(f"round {round_} of {experiment!r} has gone on without envoy {envoy!r}")
                event = (Failed(f"envoy {envoy!r} failed: {error}") if round_ is None
                         else Dropped(envoy, "failed", error))
            effects = d.act(run, event)
        d.after(run, effects)

    def _rounds_without(self, run: Run, envoy: str) -> str:
        """'' when the experiment's rounds can go on without ``envoy``, else why not."""
        d = self.director
        remaining = tuple(e for e in run.state.envoys if e != envoy)
        if not remaining:
            return ""  # the round machine says: no envoy at all
        try:
            d.engine.plan(dataclasses.replace(run.row, envoys=remaining))
        except InvalidRequestError as exc:
            return f"{len(remaining)} envoys, too few for the rounds to come ({exc})"
        return ""


def _inline_chunks(run: Run, path: Path) -> tuple[tuple[list[r.TensorChunk] | None, int], int]:
    """For the inline cache: the chunks of the tensors ``run``'s workers take (None over INLINE_MODEL_BYTES) with
    their bytes, and what they cost the cache."""
    model = ModelFile(path)
    names = [n for n in model.names() if n in run.upload]
    if sum(nbytes_of(model.spec(n)) for n in names) > INLINE_MODEL_BYTES:
        return (None, 0), 0
    chunks = list(model.iter_chunks(names))
    size = sum(len(c.data) for c in chunks)
    return (chunks, size), size


def _carries_model(task: r.Task, inline: bool) -> bool:
    """Whether a task answer asked ``inline`` carries its round's model: tasks that start from it."""
    return inline and task.from_global and task.kind in (r.TaskKind.TRAIN, r.TaskKind.VALIDATE)


def _messages(model: ModelFile, names: list[str]) -> Iterator[tuple[bytes, int]]:
    """``names`` of ``model`` as the serialized messages GetRoundModel streams, each with the tensor bytes it
    carries (what the traffic counts)."""
    for group in serde.pack(model.iter_chunks(names)):
        yield b"".join(serde.message_wire(group)), sum(len(c.data) for c in group)


def _serialized(model: ModelFile, names: list[str]) -> tuple[tuple[list[bytes], int], int]:
    """``_messages`` made whole for the download cache: (the messages, their tensor bytes), and their size."""
    pairs = list(_messages(model, names))
    messages = [message for message, _ in pairs]
    return (messages, sum(n for _, n in pairs)), sum(len(m) for m in messages)
