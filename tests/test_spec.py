"""fedjax_core.spec: one typed experiment spec, one validate, and the stored and legacy forms it reads."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fedjax_core import serde
from fedjax_core import spec as s
from fedjax_core.errors import InvalidRequestError
from fedjax_core.records import OptTreatment
from fedjax_core.tensors import spec_of
from fedjax_proto import federation_service_pb2 as fed_pb

MODEL = (spec_of("params/w", np.zeros((3, 2), np.float32)), spec_of("opt_state/mu", np.zeros(4, np.float32)))


def full_spec(**overrides) -> s.ExperimentSpec:
    """A spec with every section away from its defaults."""
    fields = dict(
        name="exp-1", rounds=6, opt_treatment=OptTreatment.CONTINUE_LOCAL, model_spec=MODEL, envoys=("a", "b", "c"),
        submitter="alice", bundle_size=123, round_config=json.dumps([{"train": {"lr": i}} for i in range(6)]),
        sampling=s.Sampling(envoys_per_round=0, fraction=0.5, seed=7), deadline=s.Deadline(30.0, 1),
        communication=s.Communication("int8", True, True, s.SyncMode.EVERY_ROUND),
        strategy=s.StrategySpec("fedadam", json.dumps({"eta": 0.01})), best=s.BestModel("val/loss", False))
    return s.ExperimentSpec(**{**fields, **overrides})


def test_a_full_spec_is_valid_and_round_trips_through_json_and_proto():
    spec = full_spec()
    s.validate(spec)
    assert s.from_json(s.to_json(spec)) == spec
    wire = serde.experiment_spec_to_proto(spec).SerializeToString()
    assert serde.experiment_spec_from_proto(fed_pb.ExperimentSpec.FromString(wire)) == spec


def test_the_proto_nests_as_the_spec_does():
    """One message per section, one field per setting: the proto maps one to one onto the spec."""
    message = fed_pb.ExperimentSpec.DESCRIPTOR
    assert {f.name for f in message.fields} == {f.name for f in dataclasses.fields(s.ExperimentSpec)}
    for section, cls in (("sampling", s.Sampling), ("deadline", s.Deadline), ("communication", s.Communication),
                         ("strategy", s.StrategySpec), ("best", s.BestModel)):
        nested = message.fields_by_name[section].message_type
        assert [f.name for f in nested.fields] == [f.name for f in dataclasses.fields(cls)], section


# A row an older director wrote: the flat header, as JSON.
OLD_ROW = json.dumps({
    "name": "old", "rounds": 4, "opt_treatment": "RESET", "aggregation": "fedadam", "best_metric": "acc",
    "best_higher_is_better": True, "bundle_size": 9, "envoys": ["a", "b"], "submitter": "bob",
    "model_spec": [{"name": "params/w", "dtype": "float32", "shape": [3, 2], "encoding": None}], "min_envoys": 1,
    "round_timeout_s": 60.0, "aggregation_params": "{\"eta\": 0.1}", "envoys_per_round": 1, "envoys_fraction": 0.0,
    "sampling_seed": 5, "round_config": "", "compression": "fp16", "send_deltas": False, "compress_downloads": False,
    "sync": "", "sync_every": 0, "sync_threshold": 0.0})


def test_an_old_directors_flat_row_reads_as_the_same_spec():
    spec = s.from_json(OLD_ROW)
    assert spec == s.ExperimentSpec(
        name="old", rounds=4, opt_treatment=OptTreatment.RESET, model_spec=(MODEL[0],), envoys=("a", "b"),
        submitter="bob", bundle_size=9, sampling=s.Sampling(1, 0.0, 5), deadline=s.Deadline(60.0, 1),
        communication=s.Communication("fp16"), strategy=s.StrategySpec("fedadam", "{\"eta\": 0.1}"),
        best=s.BestModel("acc", True))
    s.validate(spec)


def test_rows_from_before_the_sync_and_sampling_settings_take_their_old_defaults():
    old = json.loads(OLD_ROW)
    for key in ("sync", "sync_every", "sync_threshold", "envoys_per_round", "envoys_fraction", "sampling_seed",
                "compression", "send_deltas", "compress_downloads", "round_config"):
        del old[key]
    spec = s.from_dict(old)
    assert spec.sampling == s.Sampling() and spec.communication == s.Communication() and spec.round_config == ""


def test_a_legacy_header_message_reads_as_the_spec_a_new_notebook_sends():
    spec = full_spec(sampling=s.Sampling(2, 0.0, 3), communication=s.Communication("bf16", sync=s.SyncMode.PERIODIC,
                                                                                   sync_every=2))
    spec = dataclasses.replace(spec, sampling=s.Sampling(), round_config="")  # periodic sync takes no sampling
    legacy = fed_pb.ExperimentHeader(
        name=spec.name, rounds=spec.rounds, opt_treatment=str(spec.opt_treatment), aggregation=spec.strategy.name,
        aggregation_params=spec.strategy.params, best_metric=spec.best.metric,
        best_higher_is_better=spec.best.higher_is_better, bundle_size=spec.bundle_size, envoys=list(spec.envoys),
        submitter=spec.submitter, model_spec=[serde.spec_to_proto(t) for t in spec.model_spec],
        min_envoys=spec.deadline.min_envoys, round_timeout_s=spec.deadline.round_timeout_s,
        compression="bf16", sync="periodic", sync_every=2)
    assert serde.spec_from_legacy_header(legacy) == spec


@pytest.mark.parametrize("value, setting", [("GLOBAL", "opt_treatment"), ("", "opt_treatment")])
def test_unknown_enum_names_on_the_wire_are_refused_naming_the_choices(value, setting):
    message = serde.experiment_spec_to_proto(full_spec())
    message.opt_treatment = value
    with pytest.raises(InvalidRequestError, match=f"{setting} '{value}' is not one of RESET, CONTINUE_LOCAL"):
        serde.experiment_spec_from_proto(message)
    message = serde.experiment_spec_to_proto(full_spec())
    message.communication.sync = "sometimes"
    with pytest.raises(InvalidRequestError, match="sync 'sometimes' is not one of every_round, periodic, dynamic"):
        serde.experiment_spec_from_proto(message)


@pytest.mark.parametrize("overrides, message", [
    (dict(name="../etc"), "experiment name '../etc' is not valid"),
    (dict(rounds=-1), "rounds_to_train must be an integer from 0 to 100000"),
    (dict(rounds=True), "rounds_to_train must be an integer"),
    (dict(opt_treatment="GLOBAL"), "opt_treatment 'GLOBAL' is not one of RESET"),
    (dict(model_spec=()), "the model has no tensors"),
    (dict(model_spec=(MODEL[1],)), "the model has no 'params' tensors"),
    (dict(envoys=("a", "a")), "envoys lists an envoy twice"),
    (dict(envoys=("a b",)), "envoy name 'a b' is not valid"),
    (dict(sampling=s.Sampling(envoys_per_round=-1)), "envoys_per_round must be an integer from 0"),
    (dict(sampling=s.Sampling(fraction=1.5)), r"envoys_per_round as a fraction must be in \(0, 1\], got 1.5"),
    (dict(sampling=s.Sampling(2, 0.5)), "as a count or as a fraction, not both"),
    (dict(sampling=s.Sampling(seed=-1)), "sampling_seed must be an integer from 0"),
    (dict(deadline=s.Deadline(min_envoys=-2)), "min_envoys must be an integer from 0 .* got -2"),
    (dict(deadline=s.Deadline(round_timeout_s=float("nan"))), "round_timeout_s must be a number of seconds"),
    (dict(deadline=s.Deadline(round_timeout_s=-1)), "round_timeout_s must be a number of seconds"),
    (dict(communication=s.Communication("zip")), "compression='zip' is not a codec"),
    (dict(communication=s.Communication(compress_downloads=True)), "compress_downloads=True needs a codec"),
    (dict(communication=s.Communication(sync=s.SyncMode.PERIODIC, sync_every=7)),
     r"Periodic\(every=7\) must be between 1 and rounds_to_train \(6\)"),
    (dict(communication=s.Communication(sync=s.SyncMode.DYNAMIC)), r"Dynamic\(delta_threshold=0.0\) must be"),
    (dict(communication=s.Communication(sync=s.SyncMode.DYNAMIC, sync_threshold=1.0)),
     "cannot be combined with envoys_per_round"),
    (dict(strategy=s.StrategySpec("fedsgd")), "unknown aggregation 'fedsgd'"),
    (dict(strategy=s.StrategySpec("fedadam", "{\"beta\": 1}")), "beta"),
    (dict(best=s.BestModel("m" * 300)), "best_metric is 300 characters long"),
    (dict(round_config="[{}]"), r"round_config must list one entry per training round \(6\), got 1"),
    (dict(round_config="not json"), "round_config is not valid JSON"),
])
def test_validate_refuses_what_cannot_run_naming_the_setting(overrides, message):
    with pytest.raises(s.SpecError, match=message) as refused:
        s.validate(full_spec(**overrides))
    assert isinstance(refused.value, ValueError)  # the notebook's callers see a ValueError
    assert isinstance(refused.value, InvalidRequestError)  # the director's an INVALID_ARGUMENT
