"""FedAdagrad (Reddi et al. 2021): FedOpt with β1 = 0 (m_t = Δ_t) and v_t = v_{t−1} + Δ_t²."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from fedjax_core.aggregation import Rule
from fedjax_core.strategies.base import Strategy
from fedjax_core.strategies.fedopt import fedopt_rule
from fedjax_core.strategies.registry import register


@register
@dataclasses.dataclass(frozen=True)
class FedAdagrad(Strategy):
    """FedOpt with β1 = 0 (m_t = Δ_t) and v_t = v_{t−1} + Δ_t²."""

    name: ClassVar[str] = "fedadagrad"
    eta: float = 1e-1
    tau: float = 1e-9

    def _check(self) -> None:
        self._require(self.eta > 0, "eta", "> 0")
        self._require(self.tau > 0, "tau", "> 0 (it keeps the step finite where v is 0)")

    def rule(self) -> Rule:
        return fedopt_rule(self.eta, 0.0, self.tau, lambda v, d2: v + d2)
