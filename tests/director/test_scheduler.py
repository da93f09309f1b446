"""The queue's decisions on their own: who starts, on which envoys, and why the others wait."""
from __future__ import annotations

from fedjax_core.director.scheduler import Decision, decide, load_of


def test_disjoint_experiments_start_side_by_side_and_a_busy_envoy_makes_one_wait():
    online = {"a": 1, "b": 1, "c": 1, "d": 1}
    load = load_of([("a", "b")])
    assert decide(("c", "d"), online, load) == Decision(envoys=("c", "d"))
    waits = decide(("b", "c"), online, load)
    assert waits.envoys == () and waits.wait.endswith("(params.max_experiments): b")


def test_an_envoy_runs_as_many_experiments_as_its_max_experiments():
    online = {"a": 2, "b": 1}
    assert decide(("a",), online, load_of([("a",)])) == Decision(envoys=("a",))
    assert "busy" in decide(("a",), online, load_of([("a",), ("a", "b")])).wait


def test_an_experiment_naming_no_envoys_takes_every_online_one_and_waits_while_any_is_busy():
    online = {"b": 1, "a": 1}
    assert decide((), online, load_of([])) == Decision(envoys=("a", "b"))
    assert "busy" in decide((), online, load_of([("b",)])).wait
    assert decide((), {}, load_of([])).wait == "no envoy is online"


def test_an_offline_envoy_is_named_in_the_reason():
    assert decide(("a", "x", "y"), {"a": 1}, load_of([])).wait == "offline: x, y"
