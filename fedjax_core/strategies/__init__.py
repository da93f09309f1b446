"""Aggregation strategies: what the notebook picks, and the rule the director runs for it.

``FLExperiment.start(aggregation=FedAdam(eta=0.1))`` sends the director a name and JSON
parameters; the director rebuilds the dataclass with :func:`strategy_from_wire` from its own
registry and runs that class's numpy rule (:meth:`Strategy.rule`, streamed by
:mod:`fedjax_core.aggregation`); it never runs code a notebook sent. One module per strategy,
each holding its settings dataclass and its rule; other installed packages add strategies
through the ``fedjax.strategies`` entry-point group (:mod:`~fedjax_core.strategies.registry`,
docs/strategies.md, "Writing a strategy"). Parameter names follow Flower's strategies, and so
do the defaults but two: FedAvgM's server_momentum is 0.9 (Flower's 0.0 makes it FedAvg) and
Krum's num_clients_to_keep is 1 (Flower's 0 means the same: plain Krum keeps one).

Notation: x_t is the global model of round t, mean_t the sample-weighted mean of the
round's uploads and Δ_t = mean_t − x_t. The rules act on the ``params/...`` leaves; other
float leaves (optimizer state under CONTINUE_GLOBAL) take the weighted mean and integer or
bool leaves (counters) the elementwise maximum, whatever the strategy (the engine sees to it).
"""
from __future__ import annotations

from fedjax_core.aggregation import Rule, coordinatewise
from fedjax_core.strategies.base import Strategy, StrategyError
from fedjax_core.strategies.registry import (ENTRY_POINT_GROUP, STRATEGIES, as_strategy, lookup, register,
                                             strategy_from_wire)
# the built-ins, in the order error messages list them
from fedjax_core.strategies.fedavg import FedAvg
from fedjax_core.strategies.fedavgm import FedAvgM
from fedjax_core.strategies.fedadam import FedAdam
from fedjax_core.strategies.fedyogi import FedYogi
from fedjax_core.strategies.fedadagrad import FedAdagrad
from fedjax_core.strategies.fedmedian import FedMedian
from fedjax_core.strategies.fedtrimmedavg import FedTrimmedAvg
from fedjax_core.strategies.krum import Krum

__all__ = ["ENTRY_POINT_GROUP", "STRATEGIES", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedMedian",
           "FedTrimmedAvg", "FedYogi", "Krum", "Rule", "Strategy", "StrategyError", "as_strategy", "coordinatewise",
           "lookup", "register", "strategy_from_wire"]
