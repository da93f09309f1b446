"""The director's state in memory: :class:`MemoryStore`, the :class:`~fedjax_core.director.store_api.Store`
contract without a database.

For the round machine's tests and the simulation, where nothing needs to survive the process: the
same answers as :class:`~fedjax_core.director.store.SqliteStore` (unique experiment names, events
recorded once per (round, envoy, stage) under growing ids, the first record of a round's
participants winning, updates in the order they were kept), holding the frozen records
themselves rather than JSON. One lock makes every call atomic, as one SQLite transaction is.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from fedjax_core import records as r
from fedjax_core.director.store import ExperimentRow, NewUpdate
from fedjax_core.errors import AlreadyExistsError
from fedjax_core.spec import ExperimentSpec

_ROW_COLUMNS = frozenset({"state", "envoys", "current_round", "best_round", "best_value", "best_metric", "error",
                          "submitted_at", "envoy_sizes", "started_at"})
_OTHER_COLUMNS = frozenset({"finished_at", "bundle_sha256"})  # kept, but not part of a row


@dataclasses.dataclass
class _Experiment:
    seq: int
    row: ExperimentRow
    others: dict[str, object]


@dataclasses.dataclass(frozen=True)
class _Event:
    id: int
    event: r.MetricEvent
    weight: float


class MemoryStore:
    """A thread-safe in-memory :class:`~fedjax_core.director.store_api.Store`. :meth:`close` keeps the data, so
    a director reopened on the same store resumes as one reopened on the same database does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._envoys: dict[str, tuple[r.ShardInfo, float, float]] = {}  # name -> (info, last seen, registered)
        self._experiments: dict[str, _Experiment] = {}  # in submission order
        self._last_seq = 0
        self._updates: dict[tuple[str, int], dict[str, tuple[float, Path, int]]] = {}
        self._rounds: dict[tuple[str, int], tuple[str, ...]] = {}
        self._events: dict[str, list[_Event]] = {}
        self._event_keys: set[tuple[str, int, str, str]] = set()
        self._last_event_id = 0
        self._audit: list[tuple[r.AuditEntry, str]] = []  # (entry, owner)

    def close(self) -> None:
        """Nothing to release: the data stays for whoever holds the store."""

    # envoys
    def upsert_envoy(self, name: str, info: r.ShardInfo) -> None:
        now = time.time()
        with self._lock:
            registered = self._envoys[name][2] if name in self._envoys else now
            self._envoys[name] = (info, now, registered)

    def touch_envoy(self, name: str) -> bool:
        now = time.time()
        with self._lock:
            if name not in self._envoys:
                return False
            info, _, registered = self._envoys[name]
            self._envoys[name] = (info, now, registered)
            return True

    def envoys(self, after: str = "", limit: int = -1) -> list[tuple[str, r.ShardInfo, float]]:
        with self._lock:
            names = sorted(name for name in self._envoys if name > after)
            return [(name, *self._envoys[name][:2]) for name in _first(names, limit)]

    def envoy_names(self) -> list[str]:
        with self._lock:
            return sorted(self._envoys)

    def envoy(self, name: str) -> tuple[r.ShardInfo, float] | None:
        with self._lock:
            found = self._envoys.get(name)
            return found[:2] if found is not None else None

    # experiments
    def add_experiment(self, spec: ExperimentSpec, state: str = "queued") -> None:
        row = ExperimentRow(name=spec.name, spec=spec, state=state, envoys=(), current_round=0, best_round=-1,
                            best_value=None, best_metric=spec.best.metric, error="", submitted_at=time.time())
        with self._lock:
            if spec.name in self._experiments:
                raise AlreadyExistsError(
                    f"experiment {spec.name!r} already exists; choose another experiment_name")
            self._last_seq += 1
            self._experiments[spec.name] = _Experiment(self._last_seq, row, {"bundle_sha256": ""})

    def delete_experiment(self, name: str) -> None:
        with self._lock:
            self._experiments.pop(name, None)

    def abandon_submissions(self) -> list[str]:
        with self._lock:
            names = [name for name, e in self._experiments.items() if e.row.state == "submitting"]
            for name in names:
                del self._experiments[name]
            return names

    def update_experiment(self, name: str, **fields) -> None:
        unknown = set(fields) - _ROW_COLUMNS - _OTHER_COLUMNS
        if unknown:
            raise ValueError(f"experiments have no column(s) {sorted(unknown)}")
        row_fields = {k: v for k, v in fields.items() if k in _ROW_COLUMNS}
        if "envoys" in row_fields:
            row_fields["envoys"] = tuple(row_fields["envoys"])
        if "envoy_sizes" in row_fields:
            row_fields["envoy_sizes"] = {k: tuple(v) for k, v in row_fields["envoy_sizes"].items()}
        with self._lock:
            found = self._experiments.get(name)
            if found is None:
                return
            found.row = dataclasses.replace(found.row, **row_fields)
            found.others.update((k, v) for k, v in fields.items() if k in _OTHER_COLUMNS)

    def experiments(self, state: str | None = None, name: str | None = None) -> list[ExperimentRow]:
        with self._lock:
            return [e.row for e in self._experiments.values()
                    if (state is None or e.row.state == state) and (name is None or e.row.name == name)]

    def experiments_page(self, after: int, limit: int, submitter: str | None = None) -> list[tuple[int, ExperimentRow]]:
        with self._lock:
            page = [(e.seq, e.row) for e in self._experiments.values()
                    if e.seq > after and (submitter is None or e.row.spec.submitter == submitter)]
        return _first(page, limit)

    def experiment(self, name: str) -> ExperimentRow | None:
        with self._lock:
            found = self._experiments.get(name)
            return found.row if found is not None else None

    def experiment_state(self, name: str) -> str | None:
        row = self.experiment(name)
        return row.state if row is not None else None

    def bundle_sha256(self, name: str) -> str:
        with self._lock:
            found = self._experiments.get(name)
            return str(found.others["bundle_sha256"]) if found is not None else ""

    # updates of the round in progress
    def add_updates(self, experiment: str, round_: int,
                    updates: Sequence[NewUpdate]) -> list[list[bool] | AlreadyExistsError]:
        answers: list[list[bool] | AlreadyExistsError] = []
        for update in updates:
            with self._lock:
                kept = self._updates.setdefault((experiment, round_), {})
                if update.envoy in kept:
                    answers.append(AlreadyExistsError(f"experiment {experiment!r} keeps an update of envoy "
                                                      f"{update.envoy!r} for round {round_} already"))
                    continue
                kept[update.envoy] = (float(update.weight), Path(update.path), int(update.nbytes))
            answers.append(self.add_events(experiment, update.events))
        return answers

    def updates(self, experiment: str, round_: int) -> list[tuple[str, float, Path, int]]:
        with self._lock:
            return [(envoy, *kept) for envoy, kept in self._updates.get((experiment, round_), {}).items()]

    def drop_update(self, experiment: str, round_: int, envoy: str) -> None:
        with self._lock:
            self._updates.get((experiment, round_), {}).pop(envoy, None)

    def drop_updates(self, experiment: str, round_: int) -> None:
        with self._lock:
            self._updates.pop((experiment, round_), None)

    # participants of each round
    def record_participants(self, experiment: str, round_: int, envoys: tuple[str, ...]) -> tuple[str, ...]:
        with self._lock:
            return self._rounds.setdefault((experiment, round_), tuple(envoys))

    def participants(self, experiment: str, last: int) -> dict[int, tuple[str, ...]]:
        with self._lock:
            rounds = sorted(round_ for exp, round_ in self._rounds if exp == experiment)
            latest = rounds if last < 0 else rounds[len(rounds) - min(last, len(rounds)):]
            return {round_: self._rounds[experiment, round_] for round_ in latest}

    # metric events
    def latest_envoy_metrics(self, experiment: str, stage: str) -> list[r.EnvoyValidation]:
        latest: dict[str, r.MetricEvent] = {}
        with self._lock:
            for e in self._events.get(experiment, ()):
                event = e.event
                if event.envoy and event.stage == stage and event.round >= latest.get(event.envoy, event).round:
                    latest[event.envoy] = event
        return [r.EnvoyValidation(envoy, event.round, event.metrics) for envoy, event in sorted(latest.items())]

    def add_events(self, experiment: str, events: Sequence[tuple[r.MetricEvent, float]]) -> list[bool]:
        return [self.add_event(experiment, event, weight) for event, weight in events]

    def add_event(self, experiment: str, event: r.MetricEvent, weight: float = 0.0) -> bool:
        kept = r.MetricEvent(round=event.round, envoy=event.envoy, stage=event.stage, metrics=tuple(event.metrics),
                             timestamp=event.timestamp, round_time_s=event.round_time_s,
                             participants=tuple(event.participants), note=event.note)  # what SQLite keeps
        key = (experiment, event.round, event.envoy, event.stage)
        with self._lock:
            if key in self._event_keys:
                return False
            self._event_keys.add(key)
            self._last_event_id += 1
            self._events.setdefault(experiment, []).append(_Event(self._last_event_id, kept, float(weight)))
            return True

    def events(self, experiment: str, after_id: int = 0,
               round_: int | None = None) -> list[tuple[int, r.MetricEvent, float]]:
        with self._lock:
            return [(e.id, e.event, e.weight) for e in self._events.get(experiment, ())
                    if e.id > after_id and (round_ is None or e.event.round == round_)]

    # audit trail
    def add_audit(self, entry: r.AuditEntry, owner: str = "") -> int:
        with self._lock:
            entry = dataclasses.replace(entry, id=len(self._audit) + 1)
            self._audit.append((entry, owner))
            return entry.id

    def audit(self, since: float = 0.0, after_id: int = 0, limit: int = -1,
              viewer: str | None = None) -> list[r.AuditEntry]:
        with self._lock:
            found = [e for e, owner in self._audit[max(after_id, 0):] if e.timestamp >= since
                     and (viewer is None or viewer in (e.actor, owner))]
        return found if limit < 0 else found[:limit]


def _first(items: list, limit: int) -> list:
    """The first ``limit`` items (-1, or any negative limit: all of them), as SQL's LIMIT."""
    return items if limit < 0 else items[:limit]
