"""FedAdam (Reddi et al. 2021): FedOpt with v_t = β2·v_{t−1} + (1−β2)·Δ_t²."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from fedjax_core.aggregation import Rule
from fedjax_core.strategies.fedopt import FedOpt, fedopt_rule
from fedjax_core.strategies.registry import register


@register
@dataclasses.dataclass(frozen=True)
class FedAdam(FedOpt):
    """FedOpt with v_t = β2·v_{t−1} + (1−β2)·Δ_t²."""

    name: ClassVar[str] = "fedadam"

    def rule(self) -> Rule:
        beta_2 = self.beta_2
        return fedopt_rule(self.eta, self.beta_1, self.tau, lambda v, d2: beta_2 * v + (1 - beta_2) * d2)
