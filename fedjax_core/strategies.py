"""Aggregation strategies as the notebook names them: frozen dataclasses, validated when built.

``FLExperiment.start(aggregation=FedAdam(eta=0.1))`` sends the director a name and JSON
parameters; the director rebuilds the dataclass with :func:`strategy_from_wire` and runs
the built-in numpy rules of :mod:`fedjax_core.aggregation` (it never runs user code).
Parameter names follow Flower's strategies, and so do the defaults but two: FedAvgM's
server_momentum is 0.9 (Flower's 0.0 makes it FedAvg) and Krum's num_clients_to_keep is 1
(Flower's 0 means the same: plain Krum keeps one).

Notation: x_t is the global model of round t, mean_t the sample-weighted mean of the
round's uploads and Δ_t = mean_t − x_t. The rules act on the ``params/...`` leaves; other
float leaves (optimizer state under CONTINUE_GLOBAL) take the weighted mean and integer or
bool leaves (counters) the elementwise maximum, whatever the strategy. See docs/strategies.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

from fedjax_core.errors import InvalidRequestError


class StrategyError(InvalidRequestError, ValueError):
    """A strategy that cannot be built or cannot work with this federation's round size."""


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Base of the built-in strategies: a name plus JSON-able numeric parameters."""

    name: ClassVar[str] = ""
    server_optimizer: ClassVar[bool] = False  # keeps state (momentum, moments) between rounds
    robust: ClassVar[bool] = False  # reads every upload block by block instead of folding a mean

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


@dataclasses.dataclass(frozen=True)
class FedAvg(Strategy):
    """x_{t+1} = mean_t: the sample-weighted mean of the uploads (McMahan et al. 2017)."""

    name: ClassVar[str] = "fedavg"


@dataclasses.dataclass(frozen=True)
class FedAvgM(Strategy):
    """Server momentum (Hsu et al. 2019): v_t = β·v_{t−1} + (x_t − mean_t), x_{t+1} = x_t − η·v_t, v_0 = 0.

    η is ``server_learning_rate`` and β ``server_momentum``; with η = 1 and β = 0 it is FedAvg.
    """

    name: ClassVar[str] = "fedavgm"
    server_optimizer: ClassVar[bool] = True
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9

    def _check(self) -> None:
        self._require(self.server_learning_rate > 0, "server_learning_rate", "> 0")
        self._require(0 <= self.server_momentum < 1, "server_momentum", "in [0, 1)")


@dataclasses.dataclass(frozen=True)
class _FedOpt(Strategy):
    """Reddi et al. 2021, Algorithm 2, no bias correction, m_0 = v_0 = 0:
    m_t = β1·m_{t−1} + (1−β1)·Δ_t; v_t as the subclass says; x_{t+1} = x_t + η·m_t / (√v_t + τ)."""

    server_optimizer: ClassVar[bool] = True
    eta: float = 1e-1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-9

    def _check(self) -> None:
        self._require(self.eta > 0, "eta", "> 0")
        self._require(0 <= self.beta_1 < 1, "beta_1", "in [0, 1)")
        self._require(0 <= self.beta_2 < 1, "beta_2", "in [0, 1)")
        self._require(self.tau > 0, "tau", "> 0 (it keeps the step finite where v is 0)")


@dataclasses.dataclass(frozen=True)
class FedAdam(_FedOpt):
    """FedOpt with v_t = β2·v_{t−1} + (1−β2)·Δ_t²."""

    name: ClassVar[str] = "fedadam"


@dataclasses.dataclass(frozen=True)
class FedYogi(_FedOpt):
    """FedOpt with v_t = v_{t−1} − (1−β2)·Δ_t²·sign(v_{t−1} − Δ_t²)."""

    name: ClassVar[str] = "fedyogi"
    eta: float = 1e-2
    tau: float = 1e-3


@dataclasses.dataclass(frozen=True)
class FedAdagrad(Strategy):
    """FedOpt with β1 = 0 (m_t = Δ_t) and v_t = v_{t−1} + Δ_t²."""

    name: ClassVar[str] = "fedadagrad"
    server_optimizer: ClassVar[bool] = True
    eta: float = 1e-1
    tau: float = 1e-9

    def _check(self) -> None:
        self._require(self.eta > 0, "eta", "> 0")
        self._require(self.tau > 0, "tau", "> 0 (it keeps the step finite where v is 0)")


@dataclasses.dataclass(frozen=True)
class FedMedian(Strategy):
    """x_{t+1} = the coordinate-wise median of the uploads, unweighted (Yin et al. 2018)."""

    name: ClassVar[str] = "fedmedian"
    robust: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class FedTrimmedAvg(Strategy):
    """x_{t+1} = per coordinate, the mean of the uploads left after cutting the int(beta·n) smallest
    and largest values (``scipy.stats.trim_mean(uploads, beta)``), unweighted."""

    name: ClassVar[str] = "fedtrimmedavg"
    robust: ClassVar[bool] = True
    beta: float = 0.2

    def _check(self) -> None:
        self._require(0 <= self.beta < 0.5, "beta", "in [0, 0.5): the fraction cut from each end")


@dataclasses.dataclass(frozen=True)
class Krum(Strategy):
    """Krum (Blanchard et al. 2017): each upload's score is the sum of squared distances to its
    n − f − 2 nearest other uploads (f = ``num_malicious_clients``); the ``num_clients_to_keep``
    lowest-scoring uploads are averaged by sample count (Multi-Krum when more than one is kept).
    Needs n > 2f + 2 uploads in every round."""

    name: ClassVar[str] = "krum"
    robust: ClassVar[bool] = True
    num_malicious_clients: int = 0
    num_clients_to_keep: int = 1

    def _check(self) -> None:
        for field in ("num_malicious_clients", "num_clients_to_keep"):
            self._require(isinstance(getattr(self, field), int), field, "an integer")
        self._require(self.num_malicious_clients >= 0, "num_malicious_clients", ">= 0")
        self._require(self.num_clients_to_keep >= 1, "num_clients_to_keep", ">= 1")

    @property
    def min_uploads(self) -> int:
        return max(2 * self.num_malicious_clients + 3, self.num_clients_to_keep)

    def check_round_size(self, n: int) -> None:
        f = self.num_malicious_clients
        if n <= 2 * f + 2:
            raise StrategyError(
                f"Krum with num_malicious_clients={f} needs more than {2 * f + 2} uploads per round, but rounds "
                f"can close with {n}: add envoys, raise envoys_per_round or min_envoys, or lower num_malicious_clients")
        if self.num_clients_to_keep > n:
            raise StrategyError(f"Krum keeps num_clients_to_keep={self.num_clients_to_keep} uploads, but rounds can "
                                f"close with {n}: lower num_clients_to_keep")


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, Krum)
}


def as_strategy(value: Strategy | str) -> Strategy:
    """A strategy object from an object or a name (``"fedavg"``, ``"fedadam"``... with default parameters)."""
    if isinstance(value, Strategy):
        return value
    if isinstance(value, str):
        return strategy_from_wire(value, "{}")
    raise StrategyError(f"aggregation must be a strategy such as FedAdam(eta=0.1) or a name such as 'fedavg', "
                        f"got {type(value).__name__}")


def strategy_from_wire(name: str, params_json: str) -> Strategy:
    """Rebuild a strategy from its name and JSON parameters; errors name the strategy and the parameter."""
    cls = STRATEGIES.get(name.lower())
    if cls is None:
        raise StrategyError(f"unknown aggregation {name!r}; built-in strategies: {', '.join(STRATEGIES)}")
    try:
        params = json.loads(params_json or "{}")
    except (ValueError, RecursionError):
        raise StrategyError(f"aggregation parameters of {name!r} are not valid JSON (or nest too deeply): "
                            f"{params_json[:200]!r}") from None
    if not isinstance(params, dict):
        raise StrategyError(f"aggregation parameters of {name!r} must be a JSON object, got {params_json[:200]!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise StrategyError(f"{cls.__name__} has no parameter {unknown[0]!r}; its parameters: {', '.join(known) or 'none'}")
    return cls(**params)
