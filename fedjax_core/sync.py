"""When the envoys' models are averaged: every round (the default), periodically, or dynamically.

``FLExperiment.start(sync=Periodic(every=3))`` lets envoys train 3 rounds on their own models
between averagings; ``sync=Dynamic(delta_threshold=d)`` averages only when some envoy's model
has drifted more than ``d`` (squared L2 distance) from the last global model (Kamp et al.,
"Efficient decentralized deep learning by dynamic model averaging", ECML PKDD 2018). A
round is one local training pass either way, so ``rounds_to_train`` means the same compute
for every choice; the last round always averages.
"""
from __future__ import annotations

import dataclasses
import math

from fedjax_core.spec import SyncMode


@dataclasses.dataclass(frozen=True)
class Periodic:
    """Average after every ``every``-th round; in between, envoys keep training their own models."""

    every: int

    def __post_init__(self):
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"Periodic(every=...) must be an integer >= 1 (1: every round), got {self.every!r}")


@dataclasses.dataclass(frozen=True)
class Dynamic:
    """Average when an envoy's squared L2 distance from the last global model exceeds ``delta_threshold``.

    Envoys under the threshold send only that distance; when any envoy exceeds it, every
    envoy uploads and the director averages. Every envoy rather than the violators plus a
    balancing set: with a handful of envoys a balancing set is rarely much smaller than all
    of them, and a full average leaves every envoy on the same model, so the next rounds'
    distances measure fresh drift.
    """

    delta_threshold: float

    def __post_init__(self):
        value = self.delta_threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"Dynamic(delta_threshold=...) must be a finite number > 0, got {value!r}")


Sync = Periodic | Dynamic


def to_spec(sync: Sync | None) -> tuple[SyncMode, int, float]:
    """The spec's (sync, sync_every, sync_threshold) for ``sync`` (None: average every round)."""
    if sync is None:
        return SyncMode.EVERY_ROUND, 0, 0.0
    if isinstance(sync, Periodic):
        return SyncMode.PERIODIC, sync.every, 0.0
    if isinstance(sync, Dynamic):
        return SyncMode.DYNAMIC, 0, float(sync.delta_threshold)
    raise TypeError(f"sync must be fedjax_core.Periodic(every=k), fedjax_core.Dynamic(delta_threshold=d) or None, "
                    f"got {sync!r}")
