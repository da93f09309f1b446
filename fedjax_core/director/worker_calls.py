"""What an experiment's workers (and their envoy's daemon) call during its rounds.

Each call checks who asks and for what (the experiment runs, the envoy works for it, the round is
the one it names), does its heavy part outside the director's lock (spooling and keeping an update,
streaming a model), and turns what happened into a round event for the director to step and act on.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedjax_core import records as r
from fedjax_core import serde
from fedjax_core.director import limits, round_machine, transfers
from fedjax_core.director.model_cache import RoundModelCache
from fedjax_core.director.round_machine import CheckedIn, Dropped, Effect, Failed, Refused, UpdateStored, Validated
from fedjax_core.director.rounds import Run
from fedjax_core.director.store import NewUpdate
from fedjax_core.secagg.protocol import MASKED_TENSOR
from fedjax_core.privacy.local import check_applied
from fedjax_core.errors import (FedError, InvalidRequestError, NotFoundError, PreconditionError, StorageError,
                                is_disk_full)
from fedjax_core.model_file import ModelFile, fsync_file
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

    def _running(self, envoy: str, experiment: str) -> Run:
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
            self._running(envoy, experiment)
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
            run = self._running(envoy, experiment)
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
            run = self._running(envoy, experiment)
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
        run = self._running(envoy, experiment)
        if round_ != run.round:
            raise PreconditionError(f"round {round_} is not the current round ({run.round}) of {experiment!r}")
        if envoy not in run.state.participants:
            raise PreconditionError(f"envoy {envoy!r} was not selected for round {round_} of {experiment!r}")
        return run

    def _events(self, run: Run, envoy: str, round_: int,
                reports: Sequence[r.StageReport]) -> list[tuple[r.MetricEvent, float]]:
        """Checked ``reports`` of ``envoy`` as the ``(event, weight)`` pairs the store records."""
        d = self.director
        now = d.clock()
        return [(r.MetricEvent(round=round_, envoy=envoy, stage=r.Stage(rep.stage), metrics=rep.metrics,
                               timestamp=now), d.engine.report_weight(run, envoy, rep.stage, rep.sample_count))
                for rep in reports]

    def _log(self, run: Run, events: Sequence[tuple[r.MetricEvent, float]], added: Sequence[bool]) -> None:
        """Hand the recorded events that were new to the metric sinks."""
        for (event, _), new in zip(events, added):
            if new:
                self.director.loggers.log(run.name, event)

    def _record(self, run: Run, envoy: str, round_: int, reports: Sequence[r.StageReport]) -> None:
        """Record checked ``reports`` of ``envoy`` in one write, log them, and tell the round of a validation."""
        d = self.director
        events = self._events(run, envoy, round_, reports)
        self._log(run, events, d.store.add_events(run.name, events))
        effects: tuple[Effect, ...] = ()
        with d.lock:
            validated = any(rep.stage == r.Stage.AGGREGATED for rep in reports)
            if validated and run.state.kind == r.TaskKind.VALIDATE and d.run(run.name) is run:  # only it waits for them
                effects = d.act(run, Validated(envoy))
            d.changed(envoy)
        d.after(run, effects)

    def check_upload(self, envoy: str, experiment: str, round_: int,
                     reports: Sequence[r.StageReport] = ()) -> None:
        """Refuse, before it takes a transfer slot, an upload that accept_update would refuse."""
        d = self.director
        limits.check_reports(envoy, reports)
        with d.lock:
            self._upload_run(envoy, experiment, round_)

    def admit_upload_in_memory(self, envoy: str, experiment: str, round_: int,
                               reports: Sequence[r.StageReport] = ()) -> bool:
        """``check_upload`` from memory alone, on the event loop: True when it admits the upload, raising as it
        does for what it refuses; False when only it can tell (the lock is busy, the experiment is not running)."""
        limits.check_reports(envoy, reports)
        d = self.director
        if not d.lock.acquire(blocking=False):
            return False
        try:
            if d.run(experiment) is None:
                return False
            self._upload_run(envoy, experiment, round_)
            return True
        finally:
            d.lock.release()

    def _upload_run(self, envoy: str, experiment: str, round_: int) -> Run:
        """Under the lock: the run an upload goes to, refused unless the round asked this envoy for one."""
        run = self._running(envoy, experiment)
        round_machine.check_upload(run.state, envoy, round_)
        if envoy in run.receiving:
            raise PreconditionError(f"an upload from envoy {envoy!r} for round {round_} is already in progress")
        return run

    def accept_update(self, envoy: str, experiment: str, round_: int, sample_count: int,
                      chunks: Iterable[r.TensorChunk], applied: tuple[float, float] = (0.0, 0.0),
                      reports: Sequence[r.StageReport] = ()) -> int:
        """Spool an envoy's streamed update to disk, check it and keep it for the round. ``applied``: the
        (clip_norm, noise_std) its header says the worker privatised it with; ``reports``: the round's metric
        reports it carried (recorded once the update is checked, before the round learns of it)."""
        d = self.director
        _check_update_header(envoy, sample_count, reports)
        with d.lock:
            run = self._upload_run(envoy, experiment, round_)
        _check_run_takes(run, envoy, round_, reports, applied)
        if run.secure is not None:
            return self._accept_masked(run, envoy, round_, chunks)
        with d.lock:
            run.receiving.add(envoy)
        kept = self.keep_spooled([self._spool(run, envoy, round_, sample_count, chunks, reports, sync=True)])[0]
        if isinstance(kept, BaseException):
            raise kept
        received, effects = kept
        d.after(run, effects)
        return received

    def spool_here(self, envoy: str, experiment: str, round_: int, sample_count: int,
                   chunks: Iterable[r.TensorChunk], applied: tuple[float, float] = (0.0, 0.0),
                   reports: Sequence[r.StageReport] = ()) -> Spooled | None:
        """``accept_update``'s first half on the event loop, for an update read whole: checked and spooled but
        not synced (``keep_spooled`` keeps it, with others at once); refused as accept_update refuses it. None
        when only accept_update can tell: the lock is busy, the experiment is not running or its rounds are
        secure."""
        d = self.director
        _check_update_header(envoy, sample_count, reports)
        if not d.lock.acquire(blocking=False):
            return None
        try:
            run = d.run(experiment)
            if run is None or run.secure is not None:
                return None
            self._upload_run(envoy, experiment, round_)
            _check_run_takes(run, envoy, round_, reports, applied)
            run.receiving.add(envoy)
        finally:
            d.lock.release()
        return self._spool(run, envoy, round_, sample_count, chunks, reports, sync=False)

    def _spool(self, run: Run, envoy: str, round_: int, sample_count: int, chunks: Iterable[r.TensorChunk],
               reports: Sequence[r.StageReport], sync: bool) -> Spooled:
        """Receive and check an update counted in ``run.receiving``, spooled, its data synced with ``sync`` (else
        ``keep_spooled`` syncs it); it leaves ``receiving`` if that fails."""
        d = self.director
        try:
            weight = d.engine.weight(run, envoy, sample_count)
            spool, received = transfers.receive_update(d.files, run, envoy, round_, chunks, sync=sync)
            return Spooled(run, round_, NewUpdate(envoy, weight, spool, received,
                                                  self._events(run, envoy, round_, reports)), synced=sync)
        except BaseException as exc:
            with d.lock:
                run.receiving.discard(envoy)
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise self._disk_full(run, envoy, round_, exc) from None
            raise

    def keep_spooled(self, spooled: Sequence[Spooled]) -> list[tuple[int, tuple[Effect, ...]] | BaseException]:
        """Keep spooled updates, each run's in one write (a group commit: one folder sync, one database sync);
        for each, ``(bytes received, the effects for Director.after)`` or the error that refused it. They leave
        their runs' ``receiving`` whatever happens. Blocks on the disk: call it off the event loop."""
        by_run: dict[int, list[int]] = {}
        for i, item in enumerate(spooled):
            by_run.setdefault(id(item.run), []).append(i)
        answers: dict[int, tuple[int, tuple[Effect, ...]] | BaseException] = {}
        for indexes in by_run.values():
            group = [spooled[i] for i in indexes]
            try:
                kept = self._keep(group)
            except BaseException as exc:  # noqa: B036 -- each caller raises it again
                kept = [exc] * len(group)
            answers.update(zip(indexes, kept))
        return [answers[i] for i in range(len(spooled))]

    def _disk_full(self, run: Run, envoy: str, round_: int, exc: OSError) -> StorageError:
        """Fail ``run`` for a full disk met while storing ``envoy``'s update; the error its caller gets."""
        self.director.fail(run, f"the director's disk is full ({exc.strerror}, under {self.director.state_dir}) "
                                f"while storing the update of envoy {envoy!r} for round {round_}: free space there "
                                "and submit the experiment again; its last model and metrics are kept")
        return StorageError(f"the director's disk is full: it could not store this update ({exc.strerror}); "
                            f"experiment {run.name!r} failed, its models so far and metrics are kept")

    def _accept_masked(self, run: Run, envoy: str, round_: int, chunks: Iterable[r.TensorChunk]) -> int:
        """A secure round's masked vector: read whole into memory (it reveals nothing without the others'), added
        to the round's running sum, and dropped."""
        d, size = self.director, run.secure.size
        masked = np.empty(size, np.uint64)
        view, received = masked.view(np.uint8), 0
        for chunk in chunks:
            spec = chunk.spec
            if spec is not None and (spec.name != MASKED_TENSOR or spec.dtype != "uint64" or tuple(spec.shape) != (size,)):
                raise InvalidRequestError(f"a secure round's upload is one tensor {MASKED_TENSOR!r} of {size} uint64, got "
                                          f"{spec.name!r} {spec.dtype} {tuple(spec.shape)}")
            if chunk.name != MASKED_TENSOR or chunk.offset != received or received + len(chunk.data) > view.size:
                raise InvalidRequestError(f"the masked upload of {envoy!r} arrives out of order or too long")
            view[received:received + len(chunk.data)] = np.frombuffer(chunk.data, np.uint8)
            received += len(chunk.data)
        if received != view.size:
            raise InvalidRequestError(f"the masked upload of {envoy!r} has {received} bytes, expected {view.size}")
        with d.lock:
            if d.run(run.name) is not run or run.state.round != round_ or not run.state.open or not run.state.owes(envoy):
                raise PreconditionError(f"round {round_} of {run.name!r} no longer takes envoy {envoy!r}'s upload")
            run.secure.add_masked(envoy, masked)
            run.traffic.count(envoy, received, upload=True)
            effects = d.advance_secure(run)
        d.after(run, effects)
        return received

    def secure_step(self, envoy: str, experiment: str, round_: int, phase: str, keys: r.SecAggKeys | None = None,
                    items: dict[str, bytes] | None = None) -> None:
        """A worker's keys, encrypted shares or revealed shares for its secure round; revealing is its last step,
        after which the round counts it as done."""
        d = self.director
        size = sum(len(v) for v in (items or {}).values()) + (64 if keys is not None else 0)
        with d.lock:
            run = self._running(envoy, experiment)
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

    def _keep(self, spooled: Sequence[Spooled]) -> list[tuple[int, tuple[Effect, ...]] | BaseException]:
        """``keep_spooled`` for one run's updates, under its keep_lock: each checked again, the live ones kept in
        one write, and only then told to the round; their reports go to the metric sinks after."""
        d, run = self.director, spooled[0].run
        answers: list[tuple[int, tuple[Effect, ...]] | BaseException | None] = [None] * len(spooled)
        logged: list[tuple[Spooled, list[bool]]] = []
        try:
            for i, item in enumerate(spooled):  # the data first, outside the lock (a large file takes a while)
                if not item.synced:
                    answers[i] = self._sync(item)
            with run.keep_lock:
                live = []
                with d.lock:
                    for i, item in enumerate(spooled):
                        if answers[i] is not None:
                            continue
                        try:
                            if d.run(run.name) is not run:
                                raise PreconditionError(f"round {item.round} of {run.name!r} is not open for "
                                                        "training updates")
                            round_machine.check_upload(run.state, item.update.envoy, item.round)  # it may have closed
                            live.append(i)
                        except FedError as exc:
                            answers[i] = exc
                kept = self._store(run, [spooled[i] for i in live])
                with d.lock:
                    for i, added in zip(live, kept):
                        item = spooled[i]
                        if isinstance(added, BaseException):
                            answers[i] = added
                            continue
                        try:
                            effects = d.act(run, UpdateStored(item.update.envoy))
                        except FedError as exc:
                            answers[i] = exc
                            continue
                        run.traffic.count(item.update.envoy, item.update.nbytes, upload=True)
                        answers[i] = (item.update.nbytes, effects)
                        logged.append((item, added))
        finally:
            with d.lock:
                for item in spooled:
                    run.receiving.discard(item.update.envoy)
            for item in spooled:
                item.update.path.unlink(missing_ok=True)  # a kept one was moved into the round's folder
        if run.ended:  # failed or cancelled meanwhile: clean up now that keep_lock is free
            d.cleanup(run)
        for item, added in logged:  # before the round (its last update) closes and logs the aggregate
            self._log(run, item.update.events, added)
        return answers

    def _sync(self, item: Spooled) -> BaseException | None:
        """Make a spooled update's data durable; the error that refuses it (a full disk fails its experiment)."""
        try:
            fsync_file(item.update.path)
        except OSError as exc:
            return self._disk_full(item.run, item.update.envoy, item.round, exc) if is_disk_full(exc) else exc
        return None

    def _store(self, run: Run, spooled: Sequence[Spooled]) -> list[list[bool] | BaseException]:
        """Under ``run.keep_lock``: keep the updates on disk in one write; for each, which of its events were
        new, or why it was not kept. A full disk fails the experiment; an unexpected error fails it too, since
        the round's updates can no longer be trusted."""
        d = self.director
        if not spooled:
            return []
        try:
            return d.engine.keep(run, [item.update for item in spooled])
        except FedError as exc:
            return [exc] * len(spooled)
        except OSError as exc:
            if not is_disk_full(exc):
                return [exc] * len(spooled)
            first = spooled[0]
            return [self._disk_full(run, first.update.envoy, first.round, exc)] * len(spooled)
        except Exception as exc:
            envoys = ", ".join(repr(item.update.envoy) for item in spooled)
            log.exception("keeping the updates of %s for round %d of %r failed", envoys, run.round, run.name)
            with d.lock:
                if d.run(run.name) is run:
                    d.act(run, Failed(f"keeping the update of {envoys} for round {spooled[0].round} failed: {exc}"))
            return [exc] * len(spooled)

    def check_in(self, envoy: str, experiment: str, round_: int, divergence: float) -> bool:
        """Periodic and dynamic averaging: ``envoy`` trained round ``round_`` and its model is ``divergence``
        (squared L2) from the round's global model. True: upload it now; False: keep training it."""
        d = self.director
        if not (math.isfinite(divergence) and divergence >= 0):
            raise InvalidRequestError(f"envoy {envoy!r} reported divergence {divergence}: a squared distance is a "
                                      "finite number >= 0 (NaN or infinity: training diverged)")
        with d.lock:
            run = self._running(envoy, experiment)
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
            run = self._running(envoy, experiment)
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


@dataclasses.dataclass(frozen=True)
class Spooled:
    """An update received and checked, spooled (``update.path``) but not yet known to its round."""
    run: Run
    round: int
    update: NewUpdate
    synced: bool  # its data is durable (else keep_spooled syncs it first)


def _check_update_header(envoy: str, sample_count: int, reports: Sequence[r.StageReport]) -> None:
    if sample_count <= 0:
        raise InvalidRequestError(
            f"envoy {envoy!r} reported {sample_count} training samples; aggregation needs a positive count "
            "(check DataInterface.get_train_data_size)")
    limits.check_reports(envoy, reports)


def _check_run_takes(run: Run, envoy: str, round_: int, reports: Sequence[r.StageReport],
                     applied: tuple[float, float]) -> None:
    """Refuse an update ``run`` cannot take as sent: reports with a masked upload, privacy not applied as asked."""
    if reports and run.secure is not None:  # a masked upload is summed, nothing else kept: they would be lost
        raise InvalidRequestError(f"envoy {envoy!r} sent metric reports with the secure upload of round {round_}, "
                                  "which takes them by ReportMetrics only (its task did not say reports_with_upload)")
    check_applied(run.spec.privacy, envoy, *applied)


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
