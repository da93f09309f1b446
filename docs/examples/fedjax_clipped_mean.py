"""A strategy plugin: the uploads clipped around their median, averaged by sample count, with a server
learning rate. Per coordinate: c_i = clip(u_i, median − clip, median + clip), mean = Σ w_i·c_i / Σ w_i,
and x_{t+1} = x_t + η·(mean − x_t)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from fedjax_core.strategies import Rule, Strategy, coordinatewise


@dataclasses.dataclass(frozen=True)
class ClippedMean(Strategy):
    name: ClassVar[str] = "clippedmean"  # what travels; the entry point has the same name
    clip: float = 1.0
    server_learning_rate: float = 1.0

    def _check(self) -> None:  # runs in the notebook when built, and in the director
        self._require(self.clip > 0, "clip", "> 0")
        self._require(self.server_learning_rate > 0, "server_learning_rate", "> 0")

    def rule(self) -> Rule:
        clip, lr = self.clip, self.server_learning_rate

        def clipped_mean(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
            # stack: (uploads x block) float64 in envoy-name order; weights: their sample counts
            median = np.median(stack, axis=0)
            clipped = np.clip(stack, median - clip, median + clip)
            return weights @ clipped / weights.sum()

        def step(x: np.ndarray, target: np.ndarray, state: dict[str, np.ndarray]):
            return x + lr * (target - x), {}  # no state: slots=() (FedAvgM's rule keeps one)

        return Rule(combiner=coordinatewise(clipped_mean), step=step)
