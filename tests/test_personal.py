"""Personal-layer patterns (fedjax_core/personal.py) and their checks in the spec's one validate."""
from __future__ import annotations

import dataclasses

import pytest

from fedjax_core import personal
from fedjax_core.director import rules
from fedjax_core.errors import InvalidRequestError
from fedjax_core.records import OptTreatment, TensorSpec
from fedjax_core.spec import ExperimentSpec, SpecError, validate

NAMES = ["params/body/Dense_0/kernel", "params/body/Dense_0/bias", "params/head/kernel", "params/head/bias",
         "batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var", "params/BatchNorm_0/scale",
         "opt_state/0/trace/head/kernel", "step"]


@pytest.mark.parametrize("pattern,name,hit", [
    ("params/head/kernel", "params/head/kernel", True),
    ("params/head/kernel", "params/head/kernel2", False),  # a pattern spans the whole name
    ("params/head", "params/head/kernel", False),
    ("params/head/*", "params/head/kernel", True),
    ("params/head/*", "params/head/a/b", False),  # '*' stays within one segment
    ("params/head/**", "params/head/a/b", True),
    ("params/**/bias", "params/bias", True),  # '**' also matches no segment
    ("params/**/bias", "params/body/Dense_0/bias", True),
    ("params/Dense_*/bias", "params/Dense_12/bias", True),
    ("params/Dense_*/bias", "params/Conv_0/bias", False),
    ("**/BatchNorm_*/**", "params/BatchNorm_0/scale", True),
    ("**", "step", True),
    ("params/a.b/[x]", "params/a.b/[x]", True),  # regex characters match themselves
    ("params/a.b/[x]", "params/aXb/x", False),
])
def test_matches(pattern, name, hit):
    assert personal.matches(pattern, name) is hit


def test_split_keeps_the_order_and_parts_names_by_any_pattern():
    shared, own = personal.split(NAMES, ["params/head/**", "batch_stats/**"])
    assert own == ("params/head/kernel", "params/head/bias", "batch_stats/BatchNorm_0/mean",
                   "batch_stats/BatchNorm_0/var")
    assert shared == tuple(n for n in NAMES if n not in own)
    assert personal.personal_names(NAMES, ()) == ()


@pytest.mark.parametrize("pattern,says", [
    ("", "non-empty"), ("/params/head", "empty path segment"), ("params//head", "empty path segment"),
    ("params/head/", "empty path segment"), ("params/he**", "whole segment"), ("params/head\tkernel", "control characters"),
    ("p" * 300, "at most 256"),
])
def test_bad_syntax_is_refused_naming_the_pattern_and_the_fix(pattern, says):
    with pytest.raises(personal.PatternError, match=says):
        personal.check_syntax(pattern)


def test_crafted_patterns_match_in_linear_time():
    """A backtracking regex took seconds on these (the director matches submitters' patterns); segment by
    segment it is immediate. Counted in steps, not timed: the loop below would take minutes with a regex."""
    name = "a/" * 16 + "b"
    for pattern, expected in [("**/" * 40 + "zz", False), ("**/" * 40 + "b", True),
                              ("params/" + "*a" * 60 + "b", False)]:
        assert personal.matches(pattern, name if pattern.startswith("**") else "params/" + "a" * 120) is expected


def test_names_with_spaces_and_regex_characters_match_as_written():
    assert personal.matches("params/my head/ker.nel[0]+", "params/my head/ker.nel[0]+")
    assert not personal.matches("params/my head/ker.nel", "params/my head/kerXnel")
    assert personal.matches("params/*_[*]/**", "params/Dense_[3]/kernel/x")
    with pytest.raises(personal.PatternError, match=r"lists 'params/head/\*\*' twice: drop the copies"):
        personal.check_patterns(["params/head/**", "params/head/**"], [("params/head/w", True), ("params/b", True)])
    with pytest.raises(personal.PatternError, match="not a non-empty string"):  # a list in the list
        personal.check_patterns([["params/head/**"]], [("params/head/w", True)])


def spec(patterns, opt_treatment=OptTreatment.RESET, names=NAMES) -> ExperimentSpec:
    model = tuple(TensorSpec(n, "int32" if n == "step" else "float32", (2,)) for n in names)
    return ExperimentSpec(name="e", rounds=2, opt_treatment=opt_treatment, model_spec=model, personal=tuple(patterns))


def test_validate_takes_fedper_and_fedbn_patterns():
    validate(spec(["params/head/**"]))
    validate(spec(["batch_stats/**", "params/**/BatchNorm_*/*"]))


@pytest.mark.parametrize("patterns,says", [
    (["params/heads/**"], "'params/heads/\\*\\*' matches no tensor of the model"),
    (["params/**"], "leave at least one layer shared"),
    (["params/head/**", "params/head/**"], "twice"),
    ([f"params/x{i}" for i in range(65)], "at most 64"),
    (["params//head"], "empty path segment"),
])
def test_validate_refuses_patterns_that_cannot_run(patterns, says):
    with pytest.raises(SpecError, match=says):
        validate(spec(patterns))


def test_validate_refuses_personal_layers_with_averaged_optimizer_state():
    with pytest.raises(SpecError, match="CONTINUE_GLOBAL.*use 'CONTINUE_LOCAL'"):
        validate(spec(["params/head/**"], OptTreatment.CONTINUE_GLOBAL))
    validate(spec(["params/head/**"], OptTreatment.CONTINUE_LOCAL))


def test_upload_names_leave_out_the_personal_tensors():
    s = spec(["params/head/**", "batch_stats/**"])
    assert rules.upload_names(s) == ("params/body/Dense_0/kernel", "params/body/Dense_0/bias",
                                      "params/BatchNorm_0/scale")
    assert rules.upload_names(dataclasses.replace(s, personal=())) == tuple(n for n in NAMES if n.startswith("params/"))


def test_an_upload_carrying_a_personal_tensor_is_a_protocol_violation():
    personal.check_not_personal(frozenset({"params/head/kernel"}), "env_1", "params/body/Dense_0/kernel")
    with pytest.raises(InvalidRequestError, match="protocol violation.*'env_1'.*'params/head/kernel'"):
        personal.check_not_personal(frozenset({"params/head/kernel"}), "env_1", "params/head/kernel")


def test_tasks_carry_the_patterns_over_the_wire():
    from fedjax_core import records as r
    from fedjax_core import serde

    task = r.Task(kind=r.TaskKind.TRAIN, round=3, upload_tensors=("params/body/w",), personal=("params/head/**",))
    assert serde.task_from_proto(serde.task_to_proto(task)) == task
