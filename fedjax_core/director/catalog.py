"""What notebooks read: experiments, their status, metric events and models, and the envoy registry.

Read-only views over the store, the experiment files and the registry. Under mTLS a caller sees
only the experiments it submitted (an admin sees every one): to anyone else an experiment does
not exist, since a refusal would say that it does, and whose it is.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator

from fedjax_core import records as r
from fedjax_core.director.files import ExperimentFiles
from fedjax_core.director.registry import EnvoyRegistry
from fedjax_core.director.store import ExperimentRow
from fedjax_core.director.store_api import Store
from fedjax_core.errors import InvalidRequestError, NotFoundError, PreconditionError
from fedjax_core.model_file import ModelFile

STATUS_ROUNDS = 1000  # an experiment's status lists the participants of this many of its latest rounds


def status_of(store: Store, row: ExperimentRow) -> r.ExperimentStatus:
    """``row``'s status with the participants of its latest rounds and, under personal layers, each envoy's latest
    validation of the aggregated model with its own personal tensors (its personalised model)."""
    status = row.status(store.participants(row.name, last=STATUS_ROUNDS))
    if not row.spec.personal:
        return status
    return dataclasses.replace(status, personal_validation=tuple(
        store.latest_envoy_metrics(row.name, r.Stage.AGGREGATED)))


class Catalog:
    def __init__(self, store: Store, files: ExperimentFiles, registry: EnvoyRegistry, admins: frozenset[str],
                 running_for: Callable[[str], Iterable[str]], lock: threading.Condition,
                 clock: Callable[[], float], is_running: Callable[[str], bool]):
        self.store, self.files, self.registry = store, files, registry
        self.admins = admins  # certificate names that may see, cancel or download any experiment
        self._running_for = running_for  # envoy -> the experiments it works for now
        self._is_running = is_running  # experiment -> whether it runs now (it has not ended)
        self._lock = lock  # the director's: a round closing removes old model files under it
        self._clock = clock

    def dataset_info(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.registry.sample_shape, self.registry.target_shape

    def working_on(self, envoy: str) -> list[str]:
        """The running experiments ``envoy`` works for, by name."""
        return sorted(self._running_for(envoy))

    def shard_registry(self, after: str = "", limit: int = -1) -> list[r.EnvoyEntry]:
        """Registered envoys by name: ``limit`` of them (-1: all) whose names sort after ``after``."""
        return self.registry.entries(after, limit, self._running_for)

    def experiments(self, viewer: str | None = None, after: int = 0,
                    limit: int = -1) -> list[tuple[int, r.ExperimentStatus]]:
        """The experiments ``viewer`` may see (its own; None: every one, for an admin or in plaintext), each with
        its number, in submission order: ``limit`` of them (-1: all) numbered above ``after``. Without each
        round's participants, which ``experiment_status`` has."""
        return [(seq, row.status()) for seq, row in self.store.experiments_page(after, limit, viewer)]

    def experiment_submitter(self, name: str) -> str:
        return self.row(name).spec.submitter

    def experiment_bundle_sha256(self, name: str) -> str:
        """The hex SHA-256 of ``name``'s bundle, taken as it was submitted; envoys check their download."""
        return self.store.bundle_sha256(name)

    def row(self, name: str) -> ExperimentRow:
        row = self.store.experiment(name)
        if row is None:
            raise NotFoundError(f"no experiment named {name!r}")
        return row

    def experiment_status(self, name: str, viewer: str | None = None) -> r.ExperimentStatus:
        """``name``'s status; to a ``viewer`` other than its submitter it does not exist (nor its metrics)."""
        row = self.store.experiment(name)
        if row is None or (viewer is not None and row.spec.submitter != viewer and viewer not in self.admins):
            raise NotFoundError(f"no experiment named {name!r}" + (" among yours" if viewer is not None else ""))
        return status_of(self.store, row)

    def check_owner(self, row: ExperimentRow, by: str | None, action: str) -> None:
        """Under mTLS (``by`` is the caller's certificate name) only the submitter or an admin may ``action``."""
        if by is not None and by != row.spec.submitter and by not in self.admins:
            raise NotFoundError(f"no experiment named {row.name!r} among yours (only its submitter, an admin "
                                f"certificate or one in settings.admins may {action})")

    def events_after(self, name: str, after_id: int) -> tuple[list[tuple[int, r.MetricEvent]], r.MetricEvent | None]:
        """``name``'s events with an id above ``after_id``, as ``(id, event)``; with none left and the
        experiment ended, the final 'done' event as the second item."""
        rows = [(id_, event) for id_, event, _ in self.store.events(name, after_id=after_id)]
        if rows or self._is_running(name):  # a running experiment has not ended: no need to read its status
            return rows, None
        status = self.experiment_status(name)
        if status.state in r.TERMINAL_STATES and not self.store.events(name, after_id=after_id):
            return [], r.MetricEvent(round=status.current_round, envoy="", stage="", experiment_done=True,
                                     state=status.state, timestamp=self._clock())
        return [], None

    def model_chunks(self, name: str, which: str, by: str | None = None) -> Iterator[r.TensorChunk]:
        """``name``'s best or last model as tensor chunks (the file is opened now)."""
        self.check_owner(self.row(name), by, "download its models")
        with self._lock:  # resolve and open under the lock: a round closing meanwhile removes old files
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
