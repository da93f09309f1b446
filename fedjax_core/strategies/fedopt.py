"""What FedAdam, FedYogi and FedAdagrad share: Reddi et al. 2021, Algorithm 2, without bias correction.

m_t = β1·m_{t−1} + (1−β1)·Δ_t with Δ_t = mean_t − x_t; v_t as each strategy says;
x_{t+1} = x_t + η·m_t / (√v_t + τ); m_0 = v_0 = 0. State: two slots, ``m`` and ``v``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from fedjax_core.aggregation import Rule
from fedjax_core.strategies.base import Strategy

SecondMoment = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (v_{t−1}, Δ_t²) -> v_t


def fedopt_rule(eta: float, beta_1: float, tau: float, second_moment: SecondMoment) -> Rule:
    """The weighted mean, then the FedOpt server step with the given second-moment update."""
    def step(x: np.ndarray, target: np.ndarray, state: dict[str, np.ndarray]):
        delta = target - x
        m = beta_1 * state["m"] + (1 - beta_1) * delta
        v = second_moment(state["v"], np.square(delta))
        return x + eta * m / (np.sqrt(v) + tau), {"m": m, "v": v}
    return Rule(slots=("m", "v"), step=step)


@dataclasses.dataclass(frozen=True)
class FedOpt(Strategy):
    """The parameters FedAdam and FedYogi share (not a strategy of its own: it has no name)."""

    eta: float = 1e-1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-9

    def _check(self) -> None:
        self._require(self.eta > 0, "eta", "> 0")
        self._require(0 <= self.beta_1 < 1, "beta_1", "in [0, 1)")
        self._require(0 <= self.beta_2 < 1, "beta_2", "in [0, 1)")
        self._require(self.tau > 0, "tau", "> 0 (it keeps the step finite where v is 0)")
