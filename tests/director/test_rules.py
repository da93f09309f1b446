"""The director's pure rules: sampling, metric aggregation, and what counts as best."""
from __future__ import annotations

import math
import random

import pytest

from fedjax_core import records as r
from fedjax_core.director import rules
from fedjax_core.spec import from_flat


def test_sampling_is_the_documented_seeded_draw_and_covers_everyone_over_rounds():
    envoys = ("d", "a", "c", "b", "e")
    for t in range(20):
        chosen = rules.select_participants(envoys, 2, 42, t)
        assert chosen == tuple(sorted(random.Random(f"42/{t}").sample(["a", "b", "c", "d", "e"], 2)))
        assert chosen == rules.select_participants(tuple(reversed(envoys)), 2, 42, t)  # order of the list: no matter
    assert set().union(*(rules.select_participants(envoys, 2, 42, t) for t in range(20))) == set(envoys)
    assert rules.select_participants(envoys, 5, 42, 0) == ("a", "b", "c", "d", "e")


@pytest.mark.parametrize("count, fraction, n, k", [(0, 0.0, 7, 7), (3, 0.0, 7, 3), (0, 0.5, 7, 3),
                                                   (0, 0.01, 7, 1), (0, 1.0, 7, 7)])
def test_participants_per_round(count, fraction, n, k):
    h = from_flat(dict(name="x", rounds=1, opt_treatment="RESET", envoys_per_round=count, envoys_fraction=fraction))
    assert rules.participants_per_round(h, n) == k


@pytest.mark.parametrize("value, best, higher, better", [
    (0.5, None, True, True), (0.6, 0.5, True, True), (0.4, 0.5, True, False), (0.4, 0.5, False, True),
    (math.inf, 0.5, True, False), (math.nan, None, True, False), (-math.inf, 0.5, False, False),
    (0.1, math.inf, True, True),  # a best pinned by an earlier inf is replaced by the first finite value
])
def test_non_finite_metrics_never_become_best(value, best, higher, better):
    assert rules.is_better(value, best, higher) is better


def test_metrics_are_weighted_by_sample_counts_per_stage():
    events = [(r.MetricEvent(0, "a", r.Stage.TRAIN, (r.Metric("train", "acc", 0.0),)), 1.0),
              (r.MetricEvent(0, "b", r.Stage.TRAIN, (r.Metric("train", "acc", 1.0),)), 3.0),
              (r.MetricEvent(0, "a", r.Stage.AGGREGATED, (r.Metric("validate", "acc", 0.5),)), 0.0)]
    out = {e.stage: e.metrics[0].value for e in rules.aggregate_metrics(0, events)}
    assert out == {r.Stage.TRAIN: 0.75, r.Stage.AGGREGATED: 0.5}  # weight 0 everywhere: the plain mean
