"""FLExperiment.start's new round settings: what the notebook checks before anything is sent,
and what it sends (a fake client records the spec)."""
from __future__ import annotations

import json

import pytest

from fedjax_core import FedAdam, FLExperiment, Krum, ModelInterface, Periodic
from fedjax_core.api.interfaces import TaskError
from fedjax_core.spec import BestModel, Communication, Deadline, Sampling, SyncMode, validate
from fedjax_core.strategies import StrategyError
from fl_experiment import SubsetDataset, create_train_state, make_tasks


class RecordingClient:
    def __init__(self):
        self.specs = []

    def submit(self, spec, bundle, tensors):
        self.specs.append(spec)
        return 0


class FakeFederation:
    client_id = "api"

    def __init__(self):
        self.client = RecordingClient()


def start(**kwargs):
    fed = FakeFederation()
    FLExperiment(federation=fed, experiment_name="exp").start(
        model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
        data_loader=SubsetDataset(), **{"rounds_to_train": 3, **kwargs})
    return fed.client.specs[-1]


def test_strategy_sampling_and_round_config_travel_in_the_spec():
    spec = start(aggregation=FedAdam(eta=0.05), envoys_per_round=2, sampling_seed=11, min_envoys=2,
                 round_timeout_s=30, compression="int8", best_metric="val/loss",
                 round_config=lambda rnd: {"train": {"lr_scale": 0.5 ** rnd}} if rnd else {})
    assert (spec.strategy.name, json.loads(spec.strategy.params)) == ("fedadam", FedAdam(eta=0.05).params())
    assert spec.sampling == Sampling(envoys_per_round=2, fraction=0.0, seed=11)
    assert spec.deadline == Deadline(round_timeout_s=30, min_envoys=2)
    assert spec.communication == Communication(compression="int8")
    assert spec.best == BestModel("val/loss", higher_is_better=False)
    assert json.loads(spec.round_config) == [{}, {"train": {"lr_scale": 0.5}}, {"train": {"lr_scale": 0.25}}]
    assert spec.bundle_size > 0 and spec.submitter == "api" and spec.rounds == 3
    validate(spec)  # what the director checks first


def test_defaults_keep_fedavg_every_envoy_and_a_recorded_random_seed():
    spec, spec2 = start(), start()
    assert (spec.strategy.name, spec.sampling.envoys_per_round, spec.sampling.fraction) == ("fedavg", 0, 0.0)
    assert spec.round_config == "" and spec.communication == Communication()
    assert spec.sampling.seed != spec2.sampling.seed  # drawn per experiment, and stored with it
    assert start(envoys_per_round=0.5).sampling.fraction == 0.5
    assert start(aggregation="fedmedian").strategy.name == "fedmedian"
    assert start(sync=Periodic(every=3)).communication == Communication(sync=SyncMode.PERIODIC, sync_every=3)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(aggregation="fedsgd"), StrategyError, "unknown aggregation 'fedsgd'"),
    (dict(aggregation=Krum), StrategyError, "aggregation must be a strategy"),
    (dict(envoys_per_round=0), ValueError, "envoys_per_round must be a count"),
    (dict(envoys_per_round=1.5), ValueError, "envoys_per_round must be a count"),
    (dict(envoys_per_round=True), ValueError, "envoys_per_round must be a count"),
    (dict(sampling_seed=-1), ValueError, "sampling_seed must be an integer"),
    (dict(rounds_to_train="3"), ValueError, "rounds_to_train must be an integer from 0"),
    (dict(opt_treatment="GLOBAL"), ValueError, "opt_treatment 'GLOBAL' is not one of RESET"),
    (dict(min_envoys=-1), ValueError, "min_envoys must be an integer from 0"),
    (dict(round_timeout_s=float("inf")), ValueError, "round_timeout_s must be a number of seconds"),
    (dict(compression="zip"), ValueError, "compression='zip' is not a codec"),
    (dict(compress_downloads=True), ValueError, "compress_downloads=True needs a codec"),
    (dict(send_deltas=1), TypeError, "send_deltas must be True or False"),
    (dict(sync=Periodic(every=2), envoys_per_round=1), ValueError, "cannot be combined with envoys_per_round"),
    (dict(sync="periodic"), TypeError, "sync must be fedjax_core.Periodic"),
    (dict(round_config={"train": {}}), TypeError, "round_config must be a function"),
    (dict(round_config=lambda rnd: [1]), TypeError, r"round_config\(0\) returned list"),
    (dict(round_config=lambda rnd: {"fit": {"lr": 1}}), TaskError, "has no task 'fit'; registered tasks: train"),
    (dict(round_config=lambda rnd: {"train": 0.1}), TypeError, r"round_config\(0\)\['train'\] is float"),
    (dict(round_config=lambda rnd: {"validate": {"lr": 1}}), TaskError,
     "gives task 'validate' the keyword argument 'lr', which it does not take"),
    (dict(round_config=lambda rnd: {"train": {"state": 1}}), TaskError, "the platform fills in"),
    (dict(round_config=lambda rnd: {"train": {"lr_scale": object()}}), TypeError, r"round_config\(0\) is not JSON"),
    (dict(round_config=lambda rnd: {"train": {"lr_scale": float("nan")}}), TypeError, "is not JSON"),
])
def test_bad_round_settings_fail_in_the_notebook_naming_the_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        start(**kwargs)
