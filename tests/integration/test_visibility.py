"""Experiments are their submitter's: another notebook certificate cannot list them, read their status or
metrics, cancel them or download their models; a certificate of role admin sees and cancels every one
(a real director over mTLS)."""
from __future__ import annotations

import grpc
import pytest

from fedjax_core import FLExperiment, Federation, ModelInterface, pki
from fedjax_core.errors import FedError
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import Stack


def connect(stack: Stack, name: str) -> Federation:
    return Federation(client_id=name, director_node_fqdn="127.0.0.1", director_port=stack.port, tls=True,
                      cert_chain=str(stack.pki / "root_ca.crt"), api_cert=str(stack.pki / f"{name}.crt"),
                      api_private_key=str(stack.pki / f"{name}.key"))


def refused(call) -> str:
    with pytest.raises((FedError, grpc.RpcError)) as caught:
        call()
    return str(caught.value)


def test_an_experiment_is_seen_by_its_submitter_and_admins_only(tmp_path):
    stack = Stack(tmp_path, n_envoys=1, tls=True, director_settings={"submitters": ["api", "alice"]})
    pki.certify(stack.pki, "alice", role=pki.API)
    pki.certify(stack.pki, "ops", role=pki.ADMIN)
    try:
        stack.start_director()  # no envoy online: the experiment waits in the queue
        alice, bob, ops = connect(stack, "alice"), connect(stack, "api"), connect(stack, "ops")
        mine = FLExperiment(federation=alice, experiment_name="alices")
        mine.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
                   data_loader=SubsetDataset(limit=64), rounds_to_train=1)
        assert [s.name for s in alice.client.experiments()] == ["alices"]

        assert bob.client.experiments() == []  # another submitter does not even see it
        theirs = FLExperiment(federation=bob, experiment_name="alices")
        theirs.set_model_template(create_train_state())
        for attempt in (theirs.get_experiment_status, theirs.cancel, theirs.get_last_model,
                        lambda: next(iter(theirs._events(timeout_s=30)))):
            assert "no experiment named 'alices'" in refused(attempt)

        assert [s.name for s in ops.client.experiments()] == ["alices"]  # an admin sees every experiment
        with pytest.raises((FedError, grpc.RpcError), match="may not use the notebook API"):
            FLExperiment(federation=ops, experiment_name="by_ops").start(
                model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
                data_loader=SubsetDataset(limit=64), rounds_to_train=1)  # but submits only if listed
        assert FLExperiment(federation=ops, experiment_name="alices").cancel().state == "cancelled"
        assert mine.get_experiment_status().state == "cancelled"
    finally:
        stack.stop()
