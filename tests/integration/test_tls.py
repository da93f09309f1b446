"""Secure by default: a whole federation over mTLS, and envoys bound to their certificates."""
from __future__ import annotations

import pytest

from fedjax_core import FLExperiment, ModelInterface
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import Stack


@pytest.fixture
def tls_stack(tmp_path):
    stack = Stack(tmp_path, tls=True)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        print(stack.logs())


def test_experiment_over_mtls(tls_stack):
    fed = tls_stack.federation()
    assert sorted(fed.get_shard_registry()) == ["env1", "env2"]
    exp = FLExperiment(federation=fed, experiment_name="secure")
    exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
              data_loader=SubsetDataset(limit=128), rounds_to_train=1, device_assignment_policy="CPU_ONLY",
              opt_treatment="CONTINUE_GLOBAL")
    rows = exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    assert exp.get_experiment_status().state == "finished"
    assert [row["round"] for row in rows] == [0, 1]
    assert int(exp.get_best_model().step) == 128 // 64
    assert "mTLS" in tls_stack.director.output()


def test_envoy_certificate_cannot_drive_experiments(tls_stack):
    from fedjax_core import Federation
    from fedjax_core.errors import PermissionDeniedError

    pki = tls_stack.pki
    with pytest.raises(PermissionDeniedError, match="belongs to envoy 'env1'"):
        Federation(director_node_fqdn="127.0.0.1", director_port=tls_stack.port, tls=True,
                   cert_chain=str(pki / "root_ca.crt"), api_cert=str(pki / "env1.crt"),
                   api_private_key=str(pki / "env1.key"))


def test_envoy_cannot_use_another_envoys_name(tls_stack):
    impostor = tls_stack.start_envoy(1, name="env1")  # env2's certificate, env1's name
    assert impostor.proc.wait(timeout=60) != 0
    impostor.wait_for(r"certificate is for 'env2', not for envoy 'env1'")
