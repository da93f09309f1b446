"""Krum and Multi-Krum (Blanchard et al. 2017): the uploads to keep are chosen once per round.

The choice (:func:`krum_choice`) reads every ``params/`` float leaf of every upload block by
block to sum pairwise squared distances: O(envoys² × model) time, O(block × envoys) memory;
then each leaf is the sample-weighted mean of the kept uploads.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np

from fedjax_core.aggregation import Combine, RoundUpdates, Rule, is_param
from fedjax_core.strategies.base import Strategy, StrategyError
from fedjax_core.strategies.registry import register

log = logging.getLogger("fedjax.aggregation")


def krum_choice(updates: RoundUpdates, f: int, keep: int) -> list[int]:
    """Indices (into ``sorted_uploads()``) of the ``keep`` uploads with the lowest Krum scores.

    Distances are over every ``params/`` float leaf together, accumulated block by block.
    """
    n = updates.count
    dist = np.zeros((n, n), np.float64)
    for name, spec in updates.specs.items():
        if is_param(spec):
            for _, stack in updates.stacks(name):
                for i in range(n):
                    dist[i] += np.square(stack - stack[i]).sum(axis=1)
    neighbours = max(n - f - 2, 1)
    scores = [np.sort(np.delete(dist[i], i))[:neighbours].sum() for i in range(n)]
    chosen = sorted(np.argsort(scores, kind="stable")[:keep].tolist())
    log.info("krum kept %s (scores %s)", [updates.sorted_uploads()[i].envoy for i in chosen],
             [round(float(x), 6) for x in scores])
    return chosen


@register
@dataclasses.dataclass(frozen=True)
class Krum(Strategy):
    """Krum (Blanchard et al. 2017): each upload's score is the sum of squared distances to its
    n − f − 2 nearest other uploads (f = ``num_malicious_clients``); the ``num_clients_to_keep``
    lowest-scoring uploads are averaged by sample count (Multi-Krum when more than one is kept).
    Needs n > 2f + 2 uploads in every round."""

    name: ClassVar[str] = "krum"
    num_malicious_clients: int = 0
    num_clients_to_keep: int = 1

    def _check(self) -> None:
        for field in ("num_malicious_clients", "num_clients_to_keep"):
            self._require(isinstance(getattr(self, field), int), field, "an integer")
        self._require(self.num_malicious_clients >= 0, "num_malicious_clients", ">= 0")
        self._require(self.num_clients_to_keep >= 1, "num_clients_to_keep", ">= 1")

    @property
    def min_uploads(self) -> int:
        return max(2 * self.num_malicious_clients + 3, self.num_clients_to_keep)

    def check_round_size(self, n: int) -> None:
        f = self.num_malicious_clients
        if n <= 2 * f + 2:
            raise StrategyError(
                f"Krum with num_malicious_clients={f} needs more than {2 * f + 2} uploads per round, but rounds "
                f"can close with {n}: add envoys, raise envoys_per_round or min_envoys, or lower num_malicious_clients")
        if self.num_clients_to_keep > n:
            raise StrategyError(f"Krum keeps num_clients_to_keep={self.num_clients_to_keep} uploads, but rounds can "
                                f"close with {n}: lower num_clients_to_keep")

    def rule(self) -> Rule:
        f, keep = self.num_malicious_clients, self.num_clients_to_keep

        def combiner(updates: RoundUpdates) -> Combine:
            ordered = updates.sorted_uploads()
            kept = [ordered[i] for i in krum_choice(updates, f, keep)]
            return lambda name: updates.weighted_mean(name, kept)
        return Rule(combiner=combiner)
