"""FedTrimmedAvg: per coordinate, ``scipy.stats.trim_mean(uploads, beta)``, unweighted."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from fedjax_core.aggregation import Rule, coordinatewise
from fedjax_core.strategies.base import Strategy
from fedjax_core.strategies.registry import register


@register
@dataclasses.dataclass(frozen=True)
class FedTrimmedAvg(Strategy):
    """x_{t+1} = per coordinate, the mean of the uploads left after cutting the int(beta·n) smallest
    and largest values (``scipy.stats.trim_mean(uploads, beta)``), unweighted."""

    name: ClassVar[str] = "fedtrimmedavg"
    beta: float = 0.2

    def _check(self) -> None:
        self._require(0 <= self.beta < 0.5, "beta", "in [0, 0.5): the fraction cut from each end")

    def rule(self) -> Rule:
        beta = self.beta

        def trimmed_mean(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
            n = stack.shape[0]
            cut = int(beta * n)
            return np.sort(stack, axis=0)[cut:n - cut].mean(axis=0)
        return Rule(combiner=coordinatewise(trimmed_mean))
