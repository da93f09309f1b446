"""An envoy with `cpu_devices: 2` trains data-parallel over its mesh: real processes on loopback."""
from __future__ import annotations

import pytest

from fedjax_core import FLExperiment, ModelInterface
from fedjax_core import records as r
from fl_experiment import SubsetDataset, create_train_state, make_mesh_tasks
from processes import Stack


@pytest.fixture
def two_device_envoys(tmp_path):
    s = Stack(tmp_path, envoy_params={"cpu_devices": 2})
    try:
        s.start()
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        s.stop()


def test_a_task_asking_for_the_mesh_trains_over_both_devices(two_device_envoys):
    fed = two_device_envoys.federation()
    assert fed.get_shard_registry()["env1"]["shard_info"]["devices"] == ["cpu:0", "cpu:1"]
    exp = FLExperiment(federation=fed, experiment_name="mesh")
    exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_mesh_tasks(),
              data_loader=SubsetDataset(limit=256), rounds_to_train=2, device_assignment_policy="CPU_ONLY")
    exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    assert exp.get_experiment_status().state == "finished", two_device_envoys.logs()
    train = {(e.envoy, e.round): {m.name: m.value for m in e.metrics}
             for e in exp.history if e.envoy and e.stage == r.Stage.TRAIN}
    assert len(train) == 4
    for (envoy, rnd), m in train.items():
        assert m["mesh_devices"] == 2 and m["rows_per_device"] == 32  # each device took half of every batch
        assert m["param_devices_at_start"] == 2  # the model arrived replicated, as the template is
    for envoy in ("env1", "env2"):
        assert train[(envoy, 1)]["traces"] == train[(envoy, 0)]["traces"]  # no recompilation in round 1
