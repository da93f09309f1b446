"""What the director asks of its durable state: the :class:`Store` interface.

Two implementations keep the same contract: :class:`fedjax_core.director.store.SqliteStore` (the
director's database, which survives a restart) and
:class:`fedjax_core.director.memory_store.MemoryStore` (in memory, for the round machine's tests
and the simulation). The director and its services (registry, catalog, round engine,
retention) are written against this interface only; ``tests/director/test_store.py`` runs the
contract against both. Every method is safe to call from any thread.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from fedjax_core import records as r
from fedjax_core.director.store import ExperimentRow, NewUpdate
from fedjax_core.errors import AlreadyExistsError
from fedjax_core.spec import ExperimentSpec


class Store(Protocol):
    """The director's envoys, experiments, kept updates, round participants and metric events."""

    def close(self) -> None:
        """Release the store's resources; nothing is read or written through it afterwards."""

    # envoys
    def upsert_envoy(self, name: str, info: r.ShardInfo) -> None:
        """Register ``name`` (or replace its shard info), seen now; its first registration time stays."""

    def touch_envoy(self, name: str) -> bool:
        """Mark ``name`` as seen now; False (and nothing written) if it never registered."""

    def envoys(self, after: str = "", limit: int = -1) -> list[tuple[str, r.ShardInfo, float]]:
        """``(name, shard info, last seen)`` of ``limit`` envoys (-1: all) whose names sort after ``after``, by name."""

    def envoy_names(self) -> list[str]:
        """Every registered envoy's name, sorted."""

    def envoy(self, name: str) -> tuple[r.ShardInfo, float] | None:
        """One envoy's shard info and when it was last seen, or None if it never registered."""

    # experiments
    def add_experiment(self, spec: ExperimentSpec, state: str = "queued") -> None:
        """Insert a new experiment, submitted now, in ``state``; an existing name raises AlreadyExistsError."""

    def delete_experiment(self, name: str) -> None:
        """Remove the experiment's row (its events, updates and participants stay)."""

    def abandon_submissions(self) -> list[str]:
        """Remove the experiments still 'submitting' (cut off by a crash) and return their names."""

    def update_experiment(self, name: str, **fields) -> None:
        """Set columns of an experiment (state, envoys, current_round, best_*, error, *_at, bundle_sha256,
        envoy_sizes); an unknown experiment is left alone, an unknown column raises."""

    def experiments(self, state: str | None = None, name: str | None = None) -> list[ExperimentRow]:
        """Every experiment (or those in ``state``, or the one named ``name``), in submission order."""

    def experiments_page(self, after: int, limit: int, submitter: str | None = None) -> list[tuple[int, ExperimentRow]]:
        """Up to ``limit`` (-1: all) experiments numbered after ``after`` with their numbers, in submission
        order; only ``submitter``'s when given. Numbers only grow, and are never reused."""

    def experiment(self, name: str) -> ExperimentRow | None:
        """The experiment named ``name``, or None."""

    def experiment_state(self, name: str) -> str | None:
        """The state of the experiment named ``name``, or None: ``experiment(name).state`` without reading the
        rest of its row."""

    def bundle_sha256(self, name: str) -> str:
        """The hex SHA-256 of the experiment's bundle as submitted ('' if unknown)."""

    # updates of the round in progress
    def add_updates(self, experiment: str, round_: int,
                    updates: Sequence[NewUpdate]) -> list[list[bool] | AlreadyExistsError]:
        """Keep envoys' updates of a round, each with the ``events`` it carried (its reports), in one transaction
        (one disk sync for them all): for each, ``add_events``' answer for its events, or the AlreadyExistsError
        of a second update for the same envoy and round, which keeps nothing of it; any other error keeps none
        of them."""

    def updates(self, experiment: str, round_: int) -> list[tuple[str, float, Path, int]]:
        """``(envoy, weight, path, nbytes)`` of the round's kept updates, in the order they were kept."""

    def drop_update(self, experiment: str, round_: int, envoy: str) -> None:
        """Forget one envoy's update of a round (nothing if there is none)."""

    def drop_updates(self, experiment: str, round_: int) -> None:
        """Forget every update of a round."""

    # participants of each round
    def record_participants(self, experiment: str, round_: int, envoys: tuple[str, ...]) -> tuple[str, ...]:
        """Record a round's participants once; returns what is recorded (the first record wins)."""

    def participants(self, experiment: str, last: int) -> dict[int, tuple[str, ...]]:
        """The participants of the experiment's ``last`` (-1: all) most recent rounds, by round, oldest first."""

    # metric events
    def latest_envoy_metrics(self, experiment: str, stage: str) -> list[r.EnvoyValidation]:
        """Each envoy's metrics of ``stage`` from the latest round it reported that stage in, by envoy name."""

    def add_event(self, experiment: str, event: r.MetricEvent, weight: float = 0.0) -> bool:
        """Record an event under a new, larger id; False (nothing recorded) when the same (round, envoy, stage)
        was recorded before. What is kept: round, envoy, stage, metrics, timestamp, round_time_s,
        participants and note."""

    def add_events(self, experiment: str, events: Sequence[tuple[r.MetricEvent, float]]) -> list[bool]:
        """``add_event`` for each ``(event, weight)``, at once: one transaction where the store has them."""

    def events(self, experiment: str, after_id: int = 0,
               round_: int | None = None) -> list[tuple[int, r.MetricEvent, float]]:
        """``(id, event, weight)`` of the experiment's events with ids above ``after_id`` (of round ``round_``
        when given), by id."""

    # audit trail
    def add_audit(self, entry: r.AuditEntry, owner: str = "") -> int:
        """Append ``entry`` (its ``id`` is ignored) with its ``owner`` (the submitter of its experiment then, who may
        read it; "" for none); returns the id it was given. Entries are never changed."""

    def audit(self, since: float = 0.0, after_id: int = 0, limit: int = -1,
              viewer: str | None = None) -> list[r.AuditEntry]:
        """``limit`` entries (-1: all) with an id above ``after_id`` and a timestamp at or after ``since``, oldest
        first; when ``viewer`` is given, only those it made or owns."""
