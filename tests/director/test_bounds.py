"""Every header field and count an experiment submission carries is bounded, and refused with
INVALID_ARGUMENT-mapped errors before the director holds anything for it; state per round stays O(1)."""
from __future__ import annotations

import json
import tracemalloc

import pytest

from fedjax_core.director.submission import check_submission, plan_rounds
from fedjax_core.spec import MAX_ROUNDS, MAX_TENSORS
from fedjax_core.errors import InvalidRequestError
from fedjax_core.tensors import spec_of
from test_round_engine import INITIAL, header, make_director, submit


@pytest.mark.parametrize("overrides, message", [
    (dict(rounds=10**8), f"rounds_to_train must be an integer from 0 to {MAX_ROUNDS} .0: validate the given model only., got 100000000"),
    (dict(rounds=2**62), "rounds_to_train must be an integer from 0 to"),
    (dict(best_metric="m" * (5 << 20)), "best_metric is 5242880 characters long; at most 256"),
    (dict(aggregation_params="[" * 100_000 + "]" * 100_000), "the aggregation's parameters are 200000 characters of JSON"),
    (dict(aggregation_params="[" * 5000 + "]" * 5000), r"not valid JSON \(or nest too deeply\)"),
    (dict(model_spec=tuple(spec_of(f"params/t{i}", INITIAL["params/b"]) for i in range(MAX_TENSORS + 1))),
     f"the model has {MAX_TENSORS + 1} tensors; at most {MAX_TENSORS}"),
])
def test_oversized_header_fields_are_refused(overrides, message):
    with pytest.raises(InvalidRequestError, match=message):
        check_submission(header(**overrides), registered={"a", "b"})


def test_a_plan_holds_nothing_per_round():
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        plan = plan_rounds(header(rounds=MAX_ROUNDS), ["a", "b"])
        assert tracemalloc.get_traced_memory()[0] - before < 64 << 10
    finally:
        tracemalloc.stop()
    assert plan.round_kwargs == ()


def test_the_most_rounds_run_with_o1_state(tmp_path):
    d = make_director(tmp_path)
    submit(d, header(rounds=MAX_ROUNDS))
    assert d.workers.current_task("a", "exp").task_kwargs == "" and d.catalog.experiment_status("exp").rounds == MAX_ROUNDS
    d.close()


def test_round_config_still_reaches_each_round(tmp_path):
    config = [{"train": {"lr_scale": 0.5}}, {}, {"train": {"lr_scale": 2.0}}]
    d = make_director(tmp_path)
    submit(d, header(round_config=json.dumps(config)))
    assert json.loads(d.workers.current_task("a", "exp").task_kwargs) == config[0]
    d.close()
