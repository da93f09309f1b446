"""An envoy's upload of its trained update: admitted, received, checked and kept for its round.

An update read whole with its first messages (a small model's, or an UploadSmallUpdate) is checked and spooled on
the event loop (``spool_here``), without a disk sync; one thread keeps every update that arrived meanwhile
together (``keep_spooled``: their data synced at once, the round's folder once, their rows and reports in one
transaction), and only then tells the round. Larger updates are received on a transfer thread
(``accept_update``) and kept the same way. A secure round's masked vector is summed in memory instead.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedjax_core import records as r
from fedjax_core.director import limits, round_machine, transfers
from fedjax_core.director.round_machine import Effect, Failed, UpdateStored
from fedjax_core.director.rounds import Run
from fedjax_core.director.store import NewUpdate
from fedjax_core.errors import FedError, InvalidRequestError, PreconditionError, StorageError, is_disk_full
from fedjax_core.model_file import fsync_files
from fedjax_core.privacy.local import check_applied
from fedjax_core.secagg.protocol import MASKED_TENSOR

if TYPE_CHECKING:
    from fedjax_core.director.core import Director

log = logging.getLogger("fedjax.director")


class Uploads:
    """The director's side of UploadUpdate and UploadSmallUpdate (see the module docstring)."""

    def __init__(self, director: Director):
        self.director = director  # owns the lock and the runs, and carries out what the rounds decide

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
        run = self.director.workers.running(envoy, experiment)
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
                                                  self.director.workers.report_events(run, envoy, round_, reports)), synced=sync)
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

    def _keep(self, spooled: Sequence[Spooled]) -> list[tuple[int, tuple[Effect, ...]] | BaseException]:
        """``keep_spooled`` for one run's updates, under its keep_lock: each checked again, the live ones kept in
        one write, and only then told to the round; their reports go to the metric sinks after."""
        d, run = self.director, spooled[0].run
        answers: list[tuple[int, tuple[Effect, ...]] | BaseException | None] = [None] * len(spooled)
        logged: list[tuple[Spooled, list[bool]]] = []
        try:
            unsynced = [i for i, item in enumerate(spooled) if not item.synced]  # outside the lock: it takes a while
            for i, error in zip(unsynced, fsync_files([spooled[i].update.path for i in unsynced])):
                if error is not None:
                    answers[i] = self._unsynced(spooled[i], error)
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
            self.director.workers.log_events(run, item.update.events, added)
        return answers

    def _unsynced(self, item: Spooled, exc: OSError) -> BaseException:
        """What refuses an update whose data did not reach the disk (a full disk fails its experiment)."""
        return self._disk_full(item.run, item.update.envoy, item.round, exc) if is_disk_full(exc) else exc

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
