"""fedjax_core.strategies: the notebook-side dataclasses, their checks, their wire form and round sizes."""
from __future__ import annotations

import json

import pytest

from fedjax_core import strategies as s


def test_defaults_are_flowers():
    assert s.FedAvgM().params() == {"server_learning_rate": 1.0, "server_momentum": 0.9}
    assert s.FedAdam().params() == {"eta": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9}
    assert s.FedYogi().params() == {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    assert s.FedAdagrad().params() == {"eta": 1e-1, "tau": 1e-9}
    assert s.FedTrimmedAvg().params() == {"beta": 0.2}
    assert s.Krum().params() == {"num_malicious_clients": 0, "num_clients_to_keep": 1}
    assert s.FedAvg().params() == {} and s.FedMedian().params() == {}


def test_every_built_in_is_registered_under_its_name_in_the_documented_order():
    assert list(s.STRATEGIES) == ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian",
                                  "fedtrimmedavg", "krum"]
    assert all(cls.name == name for name, cls in s.STRATEGIES.items())
    assert s.STRATEGIES["fedadam"] is s.FedAdam


@pytest.mark.parametrize("strategy", [cls() for cls in s.STRATEGIES.values()] + [s.FedAdam(eta=0.3, tau=1e-3)],
                         ids=repr)
def test_wire_round_trip(strategy):
    name, params = strategy.to_wire()
    assert json.loads(params) == strategy.params()
    assert s.strategy_from_wire(name, params) == strategy


def test_names_select_defaults_case_insensitively():
    assert s.as_strategy("fedavg") == s.FedAvg()
    assert s.as_strategy("FedAdam") == s.FedAdam()
    assert s.as_strategy(s.Krum(num_clients_to_keep=2)) == s.Krum(num_clients_to_keep=2)


@pytest.mark.parametrize("make, message", [
    (lambda: s.FedAdam(eta=0), "eta must be > 0"),
    (lambda: s.FedAdam(beta_1=1.0), r"beta_1 must be in \[0, 1\)"),
    (lambda: s.FedYogi(tau=0), "tau must be > 0"),
    (lambda: s.FedAdagrad(eta=-1), "eta must be > 0"),
    (lambda: s.FedAvgM(server_momentum=1.5), "server_momentum must be in"),
    (lambda: s.FedAvgM(server_learning_rate=-1), "server_learning_rate must be > 0"),
    (lambda: s.FedTrimmedAvg(beta=0.5), r"beta must be in \[0, 0.5\)"),
    (lambda: s.Krum(num_malicious_clients=-1), "num_malicious_clients must be >= 0"),
    (lambda: s.Krum(num_clients_to_keep=0), "num_clients_to_keep must be >= 1"),
    (lambda: s.Krum(num_clients_to_keep=1.5), "num_clients_to_keep must be an integer"),
    (lambda: s.FedAdam(eta=float("nan")), "expected a finite number"),
    (lambda: s.FedAdam(eta=True), "expected a finite number"),
    (lambda: s.FedAdam(eta="0.1"), "expected a finite number"),
    (lambda: s.strategy_from_wire("fedadam", '{"eta": 1' + "0" * 400 + "}"), "expected a finite number"),
    (lambda: s.as_strategy(3), "aggregation must be a strategy"),
    (lambda: s.as_strategy("fedsgd"), "unknown aggregation 'fedsgd'; built-in strategies: fedavg, fedavgm, "
                                      "fedadam, fedyogi, fedadagrad, fedmedian, fedtrimmedavg, krum"),
    (lambda: s.strategy_from_wire("fedadam", '{"lr": 1}'), "FedAdam has no parameter 'lr'; its parameters: eta"),
    (lambda: s.strategy_from_wire("fedavg", '{"lr": 1}'), "FedAvg has no parameter 'lr'; its parameters: none"),
    (lambda: s.strategy_from_wire("fedadam", "[1]"), "must be a JSON object"),
    (lambda: s.strategy_from_wire("fedadam", "{"), "not valid JSON"),
])
def test_bad_parameters_are_refused_naming_the_parameter(make, message):
    with pytest.raises(s.StrategyError, match=message):
        make()


def test_strategies_are_frozen():
    with pytest.raises(AttributeError):
        s.FedAdam().eta = 1.0  # type: ignore[misc]


def test_stateful_strategies_are_the_server_optimizers():
    assert [name for name, cls in s.STRATEGIES.items() if cls().stateful] == ["fedavgm", "fedadam", "fedyogi",
                                                                               "fedadagrad"]
    assert not hasattr(s.Strategy, "robust")


@pytest.mark.parametrize("f, n, ok", [(0, 2, False), (0, 3, True), (1, 4, False), (1, 5, True), (2, 6, False)])
def test_krum_refuses_rounds_of_at_most_2f_plus_2(f, n, ok):
    strategy = s.Krum(num_malicious_clients=f)
    assert strategy.min_uploads == 2 * f + 3
    if ok:
        strategy.check_round_size(n)
    else:
        with pytest.raises(s.StrategyError, match=f"more than {2 * f + 2} uploads"):
            strategy.check_round_size(n)


def test_krum_refuses_keeping_more_than_a_round_has():
    assert s.Krum(num_clients_to_keep=4).min_uploads == 4
    with pytest.raises(s.StrategyError, match="num_clients_to_keep=4"):
        s.Krum(num_clients_to_keep=4).check_round_size(3)


def test_other_strategies_need_one_upload():
    assert s.FedAdam().min_uploads == 1
    s.FedMedian().check_round_size(1)
    with pytest.raises(s.StrategyError, match="fedmedian needs at least one upload per round"):
        s.FedMedian().check_round_size(0)
