"""The director's durable state in SQLite (:class:`SqliteStore`): envoys, experiments, accepted updates, metric
events. The contract it keeps is :class:`fedjax_core.director.store_api.Store`.

Every write is one transaction, so a director killed at any point restarts from a
consistent picture. Large blobs (code bundles, models) live as files beside the database;
rows only point at them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from fedjax_core import records as r
from fedjax_core import spec as experiment_spec
from fedjax_core.director.rules import participants_per_round
from fedjax_core.errors import AlreadyExistsError
from fedjax_core.privacy import accounting
from fedjax_core.spec import ExperimentSpec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS envoys (
    name TEXT PRIMARY KEY, shard_info TEXT NOT NULL, last_seen REAL NOT NULL, registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS experiments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL, header TEXT NOT NULL,
    state TEXT NOT NULL, envoys TEXT NOT NULL DEFAULT '[]', current_round INTEGER NOT NULL DEFAULT 0,
    best_round INTEGER NOT NULL DEFAULT -1, best_value REAL, best_metric TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '', submitted_at REAL NOT NULL, started_at REAL, finished_at REAL,
    bundle_sha256 TEXT NOT NULL DEFAULT '', envoy_sizes TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS updates (
    experiment TEXT NOT NULL, round INTEGER NOT NULL, envoy TEXT NOT NULL, weight REAL NOT NULL,
    path TEXT NOT NULL, nbytes INTEGER NOT NULL, PRIMARY KEY (experiment, round, envoy)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, experiment TEXT NOT NULL, round INTEGER NOT NULL,
    envoy TEXT NOT NULL, stage TEXT NOT NULL, metrics TEXT NOT NULL, weight REAL NOT NULL,
    ts REAL NOT NULL, round_time_s REAL NOT NULL DEFAULT 0, participants TEXT NOT NULL DEFAULT '[]',
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_by_experiment ON events (experiment, id);
-- each envoy's latest event of a stage (latest_envoy_metrics: the status under personal layers)
CREATE INDEX IF NOT EXISTS events_by_stage ON events (experiment, stage, envoy, round);
-- one event per (round, envoy, stage): a report retried after a lost reply is not counted twice
CREATE UNIQUE INDEX IF NOT EXISTS events_once ON events (experiment, round, envoy, stage);
-- the audit trail (fedjax_core/director/audit.py): append-only, which the triggers below enforce
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,
    peer TEXT NOT NULL, experiment TEXT NOT NULL, detail TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT ''  -- the experiment's submitter when the entry was recorded: who may read it
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (ts);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TABLE IF NOT EXISTS rounds (
    experiment TEXT NOT NULL, round INTEGER NOT NULL, participants TEXT NOT NULL,
    PRIMARY KEY (experiment, round)
);
"""


def _experiment_row(name, header, state, envoys, current_round, best_round, best_value, best_metric, error,
                    submitted_at, envoy_sizes, started_at) -> ExperimentRow:
    return ExperimentRow(name=name, spec=experiment_spec.from_json(header), state=state, envoys=tuple(json.loads(envoys)),
                         current_round=current_round, best_round=best_round, best_value=best_value,
                         best_metric=best_metric, error=error, submitted_at=submitted_at,
                         envoy_sizes={k: tuple(v) for k, v in json.loads(envoy_sizes).items()},
                         started_at=started_at or 0.0)


def _shard_info_from_json(text: str) -> r.ShardInfo:
    d = json.loads(text)
    for key in ("sample_shape", "target_shape", "devices", "label_counts"):
        d[key] = tuple(d.get(key, ()))
    return r.ShardInfo(**d)


class NewUpdate(NamedTuple):
    """An envoy's update of a round to keep, with the metric ``events`` (``(event, weight)``) it carried."""
    envoy: str
    weight: float
    path: Path
    nbytes: int
    events: Sequence[tuple[r.MetricEvent, float]] = ()


@dataclasses.dataclass(frozen=True)
class ExperimentRow:
    name: str
    spec: ExperimentSpec
    state: str
    envoys: tuple[str, ...]
    current_round: int
    best_round: int
    best_value: float | None
    best_metric: str
    error: str
    submitted_at: float
    # envoy -> (train size, valid size) as registered when the experiment started: what caps its weights
    envoy_sizes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    started_at: float = 0.0  # 0 until it started

    def status(self, participants: Mapping[int, tuple[str, ...]] = MappingProxyType({})) -> r.ExperimentStatus:
        return r.ExperimentStatus(
            name=self.name, state=self.state, current_round=self.current_round,
            rounds=self.spec.rounds, envoys=self.envoys, best_round=self.best_round,
            best_value=float("nan") if self.best_value is None else self.best_value,
            error=self.error, submitted_at=self.submitted_at, best_metric=self.best_metric,
            participants=participants, submitter=self.spec.submitter, started_at=self.started_at,
            **self.privacy_spent(),
        )

    def privacy_spent(self) -> dict[str, float]:
        """``epsilon`` at ``delta`` over the rounds trained so far; {} without differential privacy."""
        privacy = self.spec.privacy
        if not privacy.enabled:
            return {}
        per_round = min(participants_per_round(self.spec, len(self.envoys)), len(self.envoys))
        rate = accounting.sampling_rate(per_round, len(self.envoys))
        trained = min(self.current_round, accounting.rounds_within(self.spec, rate))
        return {"epsilon": accounting.experiment_epsilon(self.spec, trained, rate), "delta": privacy.delta}


_INSERT_EVENT = ("INSERT OR IGNORE INTO events (experiment, round, envoy, stage, metrics, weight, ts, round_time_s, "
                 "participants, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


class SqliteStore:
    """The :class:`~fedjax_core.director.store_api.Store` in SQLite: thread-safe access to the director database
    (one connection, one lock)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        """Bring a database written by an older director up to this schema."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
        if "participants" not in columns:
            self._db.execute("ALTER TABLE events ADD COLUMN participants TEXT NOT NULL DEFAULT '[]'")
        if "note" not in columns:
            self._db.execute("ALTER TABLE events ADD COLUMN note TEXT NOT NULL DEFAULT ''")
        experiment_columns = {row[1] for row in self._db.execute("PRAGMA table_info(experiments)")}
        if "bundle_sha256" not in experiment_columns:
            self._db.execute("ALTER TABLE experiments ADD COLUMN bundle_sha256 TEXT NOT NULL DEFAULT ''")
        if "envoy_sizes" not in experiment_columns:
            self._db.execute("ALTER TABLE experiments ADD COLUMN envoy_sizes TEXT NOT NULL DEFAULT '{}'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:  # one statement: a transaction of its own (the connection autocommits)
            return self._db.execute(sql, args)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Several statements as one transaction: all kept or none, and one disk sync at the commit. Explicit,
        since the connection autocommits each statement (``isolation_level=None``), where ``with connection:``
        would commit nothing and leave every statement its own transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:  # some errors (a full disk) have SQLite roll back itself
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # envoys
    def upsert_envoy(self, name: str, info: r.ShardInfo) -> None:
        now = time.time()
        self._write(
            "INSERT INTO envoys (name, shard_info, last_seen, registered_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET shard_info = excluded.shard_info, last_seen = excluded.last_seen",
            (name, json.dumps(dataclasses.asdict(info)), now, now),
        )

    def touch_envoy(self, name: str) -> bool:
        return self._write("UPDATE envoys SET last_seen = ? WHERE name = ?", (time.time(), name)).rowcount > 0

    def envoys(self, after: str = "", limit: int = -1) -> list[tuple[str, r.ShardInfo, float]]:
        """Registered envoys by name: ``limit`` of them (-1: all) whose names sort after ``after``."""
        rows = self._read("SELECT name, shard_info, last_seen FROM envoys WHERE name > ? ORDER BY name LIMIT ?",
                          (after, limit))
        return [(name, _shard_info_from_json(info), last_seen) for name, info, last_seen in rows]

    def envoy_names(self) -> list[str]:
        """Every registered envoy's name, sorted, without reading (or parsing) their shard info."""
        return [name for (name,) in self._read("SELECT name FROM envoys ORDER BY name")]

    def envoy(self, name: str) -> tuple[r.ShardInfo, float] | None:
        """One envoy's shard info and when it was last seen, or None if it never registered."""
        rows = self._read("SELECT shard_info, last_seen FROM envoys WHERE name = ?", (name,))
        return (_shard_info_from_json(rows[0][0]), rows[0][1]) if rows else None

    # experiments
    def add_experiment(self, spec: ExperimentSpec, state: str = "queued") -> None:
        """Insert a new experiment; the name's UNIQUE constraint settles concurrent submissions."""
        try:
            self._write(
                "INSERT INTO experiments (name, header, state, submitted_at, best_metric) VALUES (?, ?, ?, ?, ?)",
                (spec.name, experiment_spec.to_json(spec), state, time.time(), spec.best.metric),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExistsError(
                f"experiment {spec.name!r} already exists; choose another experiment_name") from None

    def delete_experiment(self, name: str) -> None:
        self._write("DELETE FROM experiments WHERE name = ?", (name,))

    def abandon_submissions(self) -> list[str]:
        """Remove experiments whose submission never completed (the director stopped mid-upload)."""
        names = [n for (n,) in self._read("SELECT name FROM experiments WHERE state = 'submitting'")]
        self._write("DELETE FROM experiments WHERE state = 'submitting'")
        return names

    def update_experiment(self, name: str, **fields) -> None:
        if "envoys" in fields:
            fields["envoys"] = json.dumps(list(fields["envoys"]))
        if "envoy_sizes" in fields:
            fields["envoy_sizes"] = json.dumps({k: list(v) for k, v in fields["envoy_sizes"].items()})
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._write(f"UPDATE experiments SET {sets} WHERE name = ?", (*fields.values(), name))

    _EXPERIMENT_COLUMNS = ("name, header, state, envoys, current_round, best_round, best_value, best_metric, "
                           "error, submitted_at, envoy_sizes, started_at")

    def experiments(self, state: str | None = None, name: str | None = None) -> list[ExperimentRow]:
        """Every experiment (or those in ``state``, or the one named ``name``), in submission order."""
        where = [(col, value) for col, value in (("state", state), ("name", name)) if value is not None]
        sql = f"SELECT {self._EXPERIMENT_COLUMNS} FROM experiments"
        if where:
            sql += " WHERE " + " AND ".join(f"{col} = ?" for col, _ in where)
        return [_experiment_row(*row) for row in self._read(sql + " ORDER BY seq", tuple(v for _, v in where))]

    def experiments_page(self, after: int, limit: int, submitter: str | None = None) -> list[tuple[int, ExperimentRow]]:
        """Up to ``limit`` experiments submitted after the one numbered ``after`` (0: from the first), each with
        its number, in submission order; only ``submitter``'s when given."""
        sql = f"SELECT seq, {self._EXPERIMENT_COLUMNS} FROM experiments WHERE seq > ?"
        args: tuple = (after,)
        if submitter is not None:
            sql += " AND json_extract(header, '$.submitter') = ?"
            args += (submitter,)
        rows = self._read(sql + " ORDER BY seq LIMIT ?", args + (limit,))
        return [(seq, _experiment_row(*row)) for seq, *row in rows]

    def experiment(self, name: str) -> ExperimentRow | None:
        rows = self.experiments(name=name)
        return rows[0] if rows else None

    def experiment_state(self, name: str) -> str | None:
        rows = self._read("SELECT state FROM experiments WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def bundle_sha256(self, name: str) -> str:
        """The hex SHA-256 of ``name``'s bundle as submitted ('' for experiments stored before it was kept)."""
        rows = self._read("SELECT bundle_sha256 FROM experiments WHERE name = ?", (name,))
        return rows[0][0] if rows else ""

    # updates of the round in progress
    def add_updates(self, experiment: str, round_: int,
                    updates: Sequence[NewUpdate]) -> list[list[bool] | AlreadyExistsError]:
        with self._transaction():  # one disk sync for them all
            return [self._insert_update(experiment, round_, update) for update in updates]

    def _insert_update(self, experiment: str, round_: int, update: NewUpdate) -> list[bool] | AlreadyExistsError:
        """Within a transaction the caller holds (a refused row leaves it open, with nothing of that update)."""
        try:
            self._db.execute("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?)",
                             (experiment, round_, update.envoy, update.weight, str(update.path), update.nbytes))
        except sqlite3.IntegrityError:
            return AlreadyExistsError(f"experiment {experiment!r} keeps an update of envoy {update.envoy!r} for "
                                      f"round {round_} already")
        return [self._insert_event(experiment, event, weight) for event, weight in update.events]

    def updates(self, experiment: str, round_: int) -> list[tuple[str, float, Path, int]]:
        rows = self._read("SELECT envoy, weight, path, nbytes FROM updates WHERE experiment = ? AND round = ? "
                          "ORDER BY rowid", (experiment, round_))  # the order they were kept in
        return [(e, w, Path(p), n) for e, w, p, n in rows]

    def drop_update(self, experiment: str, round_: int, envoy: str) -> None:
        self._write("DELETE FROM updates WHERE experiment = ? AND round = ? AND envoy = ?", (experiment, round_, envoy))

    def drop_updates(self, experiment: str, round_: int) -> None:
        self._write("DELETE FROM updates WHERE experiment = ? AND round = ?", (experiment, round_))

    # participants of each round
    def record_participants(self, experiment: str, round_: int, envoys: tuple[str, ...]) -> tuple[str, ...]:
        """Record a round's participants once; returns what is recorded (the first record wins)."""
        self._write("INSERT OR IGNORE INTO rounds VALUES (?, ?, ?)", (experiment, round_, json.dumps(list(envoys))))
        rows = self._read("SELECT participants FROM rounds WHERE experiment = ? AND round = ?", (experiment, round_))
        return tuple(json.loads(rows[0][0]))

    def participants(self, experiment: str, last: int) -> dict[int, tuple[str, ...]]:
        """The participants of the experiment's ``last`` most recent rounds, by round."""
        rows = self._read("SELECT round, participants FROM rounds WHERE experiment = ? ORDER BY round DESC LIMIT ?",
                          (experiment, last))
        return {round_: tuple(json.loads(p)) for round_, p in reversed(rows)}

    # audit trail
    def add_audit(self, entry: r.AuditEntry, owner: str = "") -> int:
        return self._write("INSERT INTO audit (ts, action, actor, peer, experiment, detail, owner) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (entry.timestamp, entry.action, entry.actor, entry.peer,
                                                           entry.experiment, entry.detail, owner)).lastrowid

    def audit(self, since: float = 0.0, after_id: int = 0, limit: int = -1,
              viewer: str | None = None) -> list[r.AuditEntry]:
        sql = "SELECT id, ts, action, actor, peer, experiment, detail FROM audit WHERE id > ? AND ts >= ?"
        args: tuple = (after_id, since)
        if viewer is not None:
            sql += " AND (actor = ? OR owner = ?)"
            args += (viewer, viewer)
        rows = self._read(sql + " ORDER BY id LIMIT ?", args + (limit,))
        return [r.AuditEntry(action=action, actor=actor, peer=peer, experiment=experiment, detail=detail,
                             timestamp=ts, id=id_) for id_, ts, action, actor, peer, experiment, detail in rows]

    # metric events
    def add_event(self, experiment: str, event: r.MetricEvent, weight: float = 0.0) -> bool:
        """Record an event; False when the same (round, envoy, stage) was recorded before."""
        return self.add_events(experiment, [(event, weight)])[0]

    def add_events(self, experiment: str, events: Sequence[tuple[r.MetricEvent, float]]) -> list[bool]:
        """Record ``(event, weight)`` pairs in one transaction (one disk sync for them all)."""
        with self._transaction():
            return [self._insert_event(experiment, event, weight) for event, weight in events]

    def _insert_event(self, experiment: str, event: r.MetricEvent, weight: float) -> bool:
        """Within a transaction the caller holds: True when added (False: that report was recorded already)."""
        return self._db.execute(_INSERT_EVENT, (
            experiment, event.round, event.envoy, event.stage,
            json.dumps([[m.task, m.name, m.value] for m in event.metrics]), weight, event.timestamp,
            event.round_time_s, json.dumps(list(event.participants)), event.note)).rowcount > 0

    def events(self, experiment: str, after_id: int = 0, round_: int | None = None) -> list[tuple[int, r.MetricEvent, float]]:
        sql = ("SELECT id, round, envoy, stage, metrics, weight, ts, round_time_s, participants, note FROM events "
               "WHERE experiment = ? AND id > ?")
        args: tuple = (experiment, after_id)
        if round_ is not None:
            sql += " AND round = ?"
            args += (round_,)
        out = []
        for id_, rnd, envoy, stage, metrics, weight, ts, rts, who, note in self._read(sql + " ORDER BY id", args):
            ms = tuple(r.Metric(t, n, v) for t, n, v in json.loads(metrics))
            out.append((id_, r.MetricEvent(round=rnd, envoy=envoy, stage=stage, metrics=ms, timestamp=ts,
                                           round_time_s=rts, participants=tuple(json.loads(who)), note=note),
                        weight))
        return out

    def latest_envoy_metrics(self, experiment: str, stage: str) -> list[r.EnvoyValidation]:
        # one query: SQLite takes the bare column (metrics) from the row that holds MAX(round)
        rows = self._read("SELECT envoy, MAX(round), metrics FROM events WHERE experiment = ? AND stage = ? "
                          "AND envoy != '' GROUP BY envoy ORDER BY envoy", (experiment, stage))
        return [r.EnvoyValidation(envoy, round_, tuple(r.Metric(t, n, v) for t, n, v in json.loads(metrics)))
                for envoy, round_, metrics in rows]
