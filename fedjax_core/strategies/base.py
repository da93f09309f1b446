"""The base of every strategy: settings the notebook builds and checks, and the rule the director runs.

A strategy is a frozen dataclass of JSON-able numbers. ``FLExperiment.start(aggregation=...)``
sends only its name and parameters; the director rebuilds it from its own registry
(:mod:`fedjax_core.strategies.registry`) and runs :meth:`Strategy.rule`, never a notebook's code.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

from fedjax_core.aggregation import Rule
from fedjax_core.errors import InvalidRequestError


class StrategyError(InvalidRequestError, ValueError):
    """A strategy that cannot be built or cannot work with this federation's round size."""


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A name plus JSON-able numeric parameters, checked when built, and the director-side :meth:`rule`.

    Subclasses set ``name`` (lower case: what travels), declare their parameters as fields with
    defaults, check their ranges in ``_check`` and return their :class:`~fedjax_core.aggregation.Rule`
    from ``rule``; the default rule is FedAvg's.
    """

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            except OverflowError:  # an integer too large for a float
                finite = False
            if not finite:
                raise StrategyError(f"{type(self).__name__}({f.name}={str(value)[:40]}): expected a finite number")
        self._check()

    def _check(self) -> None:
        """Range checks of the subclass's parameters."""

    def _require(self, ok: bool, field: str, rule: str) -> None:
        if not ok:
            raise StrategyError(f"{type(self).__name__}({field}={getattr(self, field)!r}): {field} must be {rule}")

    def rule(self) -> Rule:
        """The director's rule for the ``params/...`` float leaves (default: the sample-weighted mean)."""
        return Rule()

    @property
    def stateful(self) -> bool:
        """Whether the rule keeps state between rounds (a state file beside each round's model)."""
        return bool(self.rule().slots)

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_wire(self) -> tuple[str, str]:
        return self.name, json.dumps(self.params(), sort_keys=True)

    @property
    def min_uploads(self) -> int:
        """The fewest uploads a round of this rule can aggregate; a round that can no longer get them fails."""
        return 1

    def check_round_size(self, n: int) -> None:
        """Refuse a round of ``n`` uploads that this rule cannot aggregate."""
        if n < 1:
            raise StrategyError(f"{self.name} needs at least one upload per round")
