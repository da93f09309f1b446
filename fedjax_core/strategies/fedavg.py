"""FedAvg (McMahan et al. 2017): x_{t+1} = mean_t, the sample-weighted mean of the uploads.

Its rule is the engine's default (:class:`~fedjax_core.aggregation.Rule` with no step): the weighted
mean sums ``w·x`` per element in float64, in envoy-name order, and divides by the total weight.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from fedjax_core.strategies.base import Strategy
from fedjax_core.strategies.registry import register


@register
@dataclasses.dataclass(frozen=True)
class FedAvg(Strategy):
    """x_{t+1} = mean_t: the sample-weighted mean of the uploads (McMahan et al. 2017)."""

    name: ClassVar[str] = "fedavg"
