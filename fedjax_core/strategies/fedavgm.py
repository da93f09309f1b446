"""FedAvgM: server momentum (Hsu et al. 2019) on the weighted mean; state: one slot, ``momentum``."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from fedjax_core.aggregation import Rule
from fedjax_core.strategies.base import Strategy
from fedjax_core.strategies.registry import register


@register
@dataclasses.dataclass(frozen=True)
class FedAvgM(Strategy):
    """Server momentum (Hsu et al. 2019): v_t = β·v_{t−1} + (x_t − mean_t), x_{t+1} = x_t − η·v_t, v_0 = 0.

    η is ``server_learning_rate`` and β ``server_momentum``; with η = 1 and β = 0 it is FedAvg.
    """

    name: ClassVar[str] = "fedavgm"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9

    def _check(self) -> None:
        self._require(self.server_learning_rate > 0, "server_learning_rate", "> 0")
        self._require(0 <= self.server_momentum < 1, "server_momentum", "in [0, 1)")

    def rule(self) -> Rule:
        lr, beta = self.server_learning_rate, self.server_momentum

        def step(x: np.ndarray, target: np.ndarray, state: dict[str, np.ndarray]):
            v = beta * state["momentum"] + (x - target)
            return x - lr * v, {"momentum": v}
        return Rule(slots=("momentum",), step=step)
