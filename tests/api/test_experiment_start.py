"""FLExperiment.start's new round settings: what the notebook checks before anything is sent,
and what it sends (a fake client records the header)."""
from __future__ import annotations

import json

import pytest

from fedjax_core import FedAdam, FLExperiment, Krum, ModelInterface
from fedjax_core.api.interfaces import TaskError
from fedjax_core.strategies import StrategyError
from fl_experiment import SubsetDataset, create_train_state, make_tasks


class RecordingClient:
    def __init__(self):
        self.headers = []

    def submit(self, header, bundle, tensors):
        self.headers.append(header)
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
    return fed.client.headers[-1]


def test_strategy_sampling_and_round_config_travel_in_the_header():
    h = start(aggregation=FedAdam(eta=0.05), envoys_per_round=2, sampling_seed=11,
              round_config=lambda rnd: {"train": {"lr_scale": 0.5 ** rnd}} if rnd else {})
    assert (h.aggregation, json.loads(h.aggregation_params)) == ("fedadam", FedAdam(eta=0.05).params())
    assert (h.envoys_per_round, h.envoys_fraction, h.sampling_seed) == (2, 0.0, 11)
    assert json.loads(h.round_config) == [{}, {"train": {"lr_scale": 0.5}}, {"train": {"lr_scale": 0.25}}]


def test_defaults_keep_fedavg_every_envoy_and_a_recorded_random_seed():
    h, h2 = start(), start()
    assert (h.aggregation, h.envoys_per_round, h.envoys_fraction, h.round_config) == ("fedavg", 0, 0.0, "")
    assert h.sampling_seed != h2.sampling_seed  # drawn per experiment, and stored with it
    assert start(envoys_per_round=0.5).envoys_fraction == 0.5
    assert start(aggregation="fedmedian").aggregation == "fedmedian"


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(aggregation="fedsgd"), StrategyError, "unknown aggregation 'fedsgd'"),
    (dict(aggregation=Krum), StrategyError, "aggregation must be a strategy"),
    (dict(envoys_per_round=0), ValueError, "envoys_per_round must be a count"),
    (dict(envoys_per_round=1.5), ValueError, "envoys_per_round must be a count"),
    (dict(envoys_per_round=True), ValueError, "envoys_per_round must be a count"),
    (dict(sampling_seed=-1), ValueError, "sampling_seed must be an integer"),
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
