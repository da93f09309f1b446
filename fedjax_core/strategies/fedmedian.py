"""FedMedian (Yin et al. 2018): the coordinate-wise median of the uploads, unweighted.

It reads a block of every upload at a time (blocks shrink so that a block of all uploads stays
under 8 MiB of float64): memory O(block x envoys).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from fedjax_core.aggregation import Rule, coordinatewise
from fedjax_core.strategies.base import Strategy
from fedjax_core.strategies.registry import register


def median(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.median(stack, axis=0)


@register
@dataclasses.dataclass(frozen=True)
class FedMedian(Strategy):
    """x_{t+1} = the coordinate-wise median of the uploads, unweighted (Yin et al. 2018)."""

    name: ClassVar[str] = "fedmedian"

    def rule(self) -> Rule:
        return Rule(combiner=coordinatewise(median))
