"""fedjax_core.strategies.registry: built-ins, plugins through real entry points, and plugins that are refused."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
from typing import ClassVar

import numpy as np
import pytest
from strategy_data import make_global, make_updates, run_round, weighted_mean

from fedjax_core import strategies as s
from fedjax_core.strategies import registry

BUILT_INS = "fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedmedian, fedtrimmedavg, krum"
HALFWAY = '''
import dataclasses
from typing import ClassVar

from fedjax_core.strategies import Rule, Strategy


@dataclasses.dataclass(frozen=True)
class Halfway(Strategy):
    """x_{t+1} = x_t + rate * (mean_t - x_t)."""

    name: ClassVar[str] = "halfway"
    rate: float = 0.5

    def rule(self):
        return Rule(step=lambda x, target, state: (x + self.rate * (target - x), {}))
'''


def test_an_entry_point_plugin_is_found_and_runs_on_the_director(install_plugin):
    install_plugin("fedjax-halfway", {"halfway": "halfway_plugin:Halfway"}, {"halfway_plugin": HALFWAY})
    strategy = s.strategy_from_wire("Halfway", '{"rate": 0.25}')
    assert type(strategy).__module__ == "halfway_plugin" and strategy.params() == {"rate": 0.25}
    assert list(s.STRATEGIES)[-1] == "halfway" and len(s.STRATEGIES) == 9
    assert s.as_strategy("halfway") == type(strategy)(rate=0.5)
    updates, x = make_updates(), make_global()
    model, state = run_round(strategy, updates, global_model=x)
    want = x["params/dense/kernel"] + 0.25 * (weighted_mean(updates, "params/dense/kernel") - x["params/dense/kernel"])
    np.testing.assert_allclose(model["params/dense/kernel"], want, rtol=1e-6)
    assert state == {}
    with pytest.raises(s.StrategyError, match=f"unknown aggregation 'fedsgd'; built-in strategies: {BUILT_INS}; "
                                              "plugins: halfway"):
        s.strategy_from_wire("fedsgd", "{}")


def test_plugins_are_loaded_once_and_only_when_a_strategy_is_looked_up(install_plugin, monkeypatch):
    calls = []
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: calls.append(kw) or real(**kw))
    install_plugin("fedjax-halfway", {"halfway": "halfway_plugin:Halfway"}, {"halfway_plugin": HALFWAY})
    assert calls == []
    for name in ("fedavg", "halfway", "fedadam", "halfway"):
        s.as_strategy(name)
    assert list(s.STRATEGIES) and calls == [{"group": "fedjax.strategies"}]


def test_a_plugin_that_takes_a_built_in_name_is_refused_and_the_built_in_stays(install_plugin, caplog):
    impostor = HALFWAY.replace('"halfway"', '"fedavg"')
    install_plugin("fedjax-impostor", {"fedavg": "impostor_plugin:Halfway"}, {"impostor_plugin": impostor})
    with caplog.at_level(logging.WARNING, logger="fedjax.strategies"):
        assert type(s.strategy_from_wire("fedavg", "{}")) is s.FedAvg
    message = registry.refused_plugins()["fedavg"]
    assert "entry point 'fedavg = impostor_plugin:Halfway' of package 'fedjax-impostor'" in message
    assert "'fedavg' is the name of fedjax_core.strategies.fedavg.FedAvg, which it cannot replace: give the " \
           "plugin's strategy (its name and its entry point) another name" in message
    assert message in caplog.text
    assert s.STRATEGIES["fedavg"] is s.FedAvg and len(s.STRATEGIES) == 8


def test_a_plugin_that_fails_to_import_is_named_and_the_others_still_work(install_plugin, caplog):
    install_plugin("fedjax-broken", {"broken": "broken_plugin:Broken"},
                   {"broken_plugin": "import a_module_that_is_not_installed\n"})
    install_plugin("fedjax-halfway", {"halfway": "halfway_plugin:Halfway"}, {"halfway_plugin": HALFWAY})
    with caplog.at_level(logging.WARNING, logger="fedjax.strategies"):
        assert s.as_strategy("fedadam") == s.FedAdam()  # built-ins work
    assert "entry point 'broken = broken_plugin:Broken'" in caplog.text
    with pytest.raises(s.StrategyError, match=r"aggregation 'broken': strategy plugin entry point 'broken = "
                                              r"broken_plugin:Broken' of package 'fedjax-broken' \(group "
                                              r"'fedjax.strategies'\) failed to load: ModuleNotFoundError: No module "
                                              r"named 'a_module_that_is_not_installed'\. Fix or reinstall that "
                                              r"package, or pip uninstall fedjax-broken"):
        s.strategy_from_wire("broken", "{}")
    assert s.strategy_from_wire("halfway", "{}").params() == {"rate": 0.5}  # other plugins too
    with pytest.raises(s.StrategyError, match="plugins: halfway; refused plugins \\(see the log\\): broken"):
        s.as_strategy("nothing")


@pytest.mark.parametrize("entry_point, source, problem", [
    ("halfway = odd_plugin:np", "import numpy as np\n", "is not a subclass of fedjax_core.strategies.Strategy"),
    ("other = odd_plugin:Halfway", HALFWAY, "it loads a strategy named 'halfway': name the entry point 'halfway'"),
    ("halfway = odd_plugin:Halfway", HALFWAY.replace('"halfway"', '"HalfWay"'), "must be set and lower case"),
])
def test_entry_points_that_are_not_strategies_are_refused_with_the_reason(install_plugin, entry_point, source,
                                                                          problem):
    name, value = entry_point.split(" = ")
    install_plugin("fedjax-odd", {name: value}, {"odd_plugin": source})
    with pytest.raises(s.StrategyError, match=f"entry point '{name} = {value}'"):
        s.as_strategy(name)
    assert problem in registry.refused_plugins()[name]


def test_two_plugins_of_one_name_are_both_refused(install_plugin):
    install_plugin("fedjax-halfway-a", {"halfway": "halfway_a:Halfway"}, {"halfway_a": HALFWAY})
    install_plugin("fedjax-halfway-b", {"halfway": "halfway_b:Halfway"}, {"halfway_b": HALFWAY})
    with pytest.raises(s.StrategyError, match="names a strategy 'halfway' too: uninstall or rename all but one"):
        s.as_strategy("halfway")
    assert "halfway" not in s.STRATEGIES and len(s.STRATEGIES) == 8


def test_register_refuses_a_taken_name_and_a_nameless_class():
    @dataclasses.dataclass(frozen=True)
    class Impostor(s.Strategy):
        name: ClassVar[str] = "fedadam"

    with pytest.raises(s.StrategyError, match="the name 'fedadam' is fedjax_core.strategies.fedadam.FedAdam's"):
        s.register(Impostor)
    with pytest.raises(s.StrategyError, match="a strategy's name must be set"):
        s.register(s.Strategy)
    assert s.register(s.FedAdam) is s.FedAdam and s.STRATEGIES["fedadam"] is s.FedAdam
