"""End to end: a real director and two envoy processes talking gRPC on loopback."""
import numpy as np
import pytest

from fedjax_core import Federation, FLExperiment, ModelInterface
from fl_experiment import SubsetDataset, create_train_state, evaluate, make_tasks


def run(stack, name, rounds=2, opt_treatment="CONTINUE_GLOBAL", style="inplace", limit=256):
    fed = Federation(client_id="api", director_node_fqdn="127.0.0.1", director_port=stack.port, tls=False)
    state = create_train_state()
    exp = FLExperiment(federation=fed, experiment_name=name)
    exp.start(model_provider=ModelInterface(model=state, optimizer=None), task_keeper=make_tasks(style),
              data_loader=SubsetDataset(limit=limit), rounds_to_train=rounds, opt_treatment=opt_treatment,
              device_assignment_policy="CPU_ONLY")
    rows = exp.stream_metrics(tensorboard_logs=False, progress=False)
    return fed, exp, rows


def test_two_envoys_train_and_return_models(stack):
    fed, exp, rows = run(stack, "e2e", rounds=2)
    registry = fed.get_shard_registry()
    assert sorted(registry) == ["env1", "env2"]
    assert registry["env1"]["shard_info"]["n_samples"] == {"train": 2585, "valid": 509}
    status = exp.get_experiment_status()
    assert status.state == "finished", stack.logs()
    assert [row["round"] for row in rows] == [0, 1, 2]
    best, last = exp.get_best_model(), exp.get_last_model()
    assert status.best_round in (1, 2)
    print(rows)
