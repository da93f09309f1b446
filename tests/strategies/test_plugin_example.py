"""docs/strategies.md, "Writing a strategy": the worked example, installed through the entry point the docs show."""
from __future__ import annotations

import re
import statistics
import tomllib
from pathlib import Path

import numpy as np
import pytest
from strategy_data import PARAM_NAMES, make_global, make_updates, round_updates, run_round

from fedjax_core import strategies as s
from fedjax_core.aggregation import ArraySource, aggregate, init_state

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "examples" / "fedjax_clipped_mean.py"


def docs_pyproject() -> dict:
    section = (REPO / "docs" / "strategies.md").read_text().split("## Writing a strategy", 1)[1]
    (toml,) = re.findall(r"```toml\n(.*?)```", section.split("\n## ", 1)[0], re.DOTALL)
    return tomllib.loads(toml)["project"]


@pytest.fixture
def clipped_mean(install_plugin):
    project = docs_pyproject()
    entry_points = project["entry-points"][s.ENTRY_POINT_GROUP]
    assert entry_points == {"clippedmean": "fedjax_clipped_mean:ClippedMean"}
    install_plugin(project["name"], entry_points, {"fedjax_clipped_mean": EXAMPLE.read_text()})
    return s.lookup("clippedmean")


def reference(uploads, weights, x, clip, lr):
    """Coordinate by coordinate, in Python floats: clip around the median, weighted mean, server step."""
    out = {}
    for name in PARAM_NAMES:
        columns = np.stack([np.asarray(u[name], np.float64).ravel() for u in uploads], axis=1)
        new = []
        for x_j, values in zip(np.asarray(x[name], np.float64).ravel(), columns.tolist()):
            median = statistics.median(values)
            clipped = [min(max(v, median - clip), median + clip) for v in values]
            mean = sum(w * c for w, c in zip(weights, clipped)) / sum(weights)
            new.append(x_j + lr * (mean - x_j))
        out[name] = np.reshape(new, np.shape(x[name]))
    return out


def test_the_example_registers_through_its_entry_point_and_travels_by_name(clipped_mean):
    assert clipped_mean.__module__ == "fedjax_clipped_mean" and "clippedmean" in s.STRATEGIES
    strategy = clipped_mean(clip=0.5, server_learning_rate=0.8)
    assert s.strategy_from_wire(*strategy.to_wire()) == strategy
    assert not strategy.stateful and init_state(strategy, []) == {}
    with pytest.raises(s.StrategyError, match=r"ClippedMean\(clip=0\): clip must be > 0"):
        s.strategy_from_wire("clippedmean", '{"clip": 0}')


@pytest.mark.parametrize("clip, lr", [(0.5, 1.0), (2.0, 0.3), (100.0, 1.0)])
def test_the_example_matches_a_reference_written_another_way(clipped_mean, clip, lr):
    uploads, weights, x = make_updates(), (10, 37, 1000, 5, 64), make_global()
    uploads[1] = {**uploads[1], "params/conv/bias": np.full(8, 1e4, np.float32)}  # an outlier, clipped
    model, state = run_round(clipped_mean(clip=clip, server_learning_rate=lr), uploads, weights, x)
    want = reference(uploads, weights, x, clip, lr)
    for name in PARAM_NAMES:
        tol = dict(rtol=2e-3, atol=2e-3) if name == "params/half" else dict(rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(model[name], np.float64), want[name], err_msg=name, **tol)
    assert state == {}
    fedavg, _ = run_round(s.FedAvg(), uploads, weights, x)
    assert np.abs(model["params/conv/bias"]).max() < 30 < 300 < np.abs(fedavg["params/conv/bias"]).max()


def test_a_huge_clip_is_the_weighted_mean_and_the_engine_keeps_the_other_leaves(clipped_mean):
    uploads, x = make_updates(), make_global()
    got, _ = aggregate(clipped_mean(clip=1e9), ArraySource({}), ArraySource(x), round_updates(uploads))
    fedavg, _ = run_round(s.FedAvg(), uploads, global_model=x)
    for name in fedavg:
        tol = 2e-3 if name == "params/half" else 1e-6
        np.testing.assert_allclose(np.asarray(got[name], np.float64), np.asarray(fedavg[name], np.float64),
                                   rtol=tol, atol=tol, err_msg=name)
