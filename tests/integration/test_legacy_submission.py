"""A notebook of fedjax-core 0.1.0 sends the flat ExperimentHeader; this release's director still takes it
(a real director, raw gRPC), as the same experiment a new notebook's ExperimentSpec describes."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from fedjax_core import serde
from fedjax_core.local import Process, free_port
from fedjax_core.tensors import iter_chunks, spec_of
from fedjax_proto import federation_service_pb2 as fed_pb
from fedjax_proto import federation_service_pb2_grpc as fed_grpc
from processes import FEDJAX, write_director_config

MODEL = {"params/w": np.ones((2, 2), np.float32)}


@pytest.fixture
def federation(tmp_path):
    port = free_port()
    config = write_director_config(tmp_path / "director.yaml", port)
    proc = Process([*FEDJAX, "director", "start", "-c", str(config), "--disable-tls"], cwd=tmp_path, name="director")
    try:
        proc.wait_for("DIRECTOR READY")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield fed_grpc.FederationServiceStub(channel)
    finally:
        proc.stop()


def submit_legacy(stub, **fields) -> fed_pb.SubmitExperimentResponse:
    header = fed_pb.ExperimentHeader(**{
        "name": "old", "rounds": 4, "opt_treatment": "RESET", "aggregation": "fedadam",
        "aggregation_params": '{"eta": 0.1}', "bundle_size": 3, "round_timeout_s": 60.0, "min_envoys": 1,
        "model_spec": [serde.spec_to_proto(spec_of(k, v)) for k, v in MODEL.items()], **fields})
    items = [fed_pb.SubmitExperimentRequest(header=header), fed_pb.SubmitExperimentRequest(bundle_data=b"abc")]
    items += [fed_pb.SubmitExperimentRequest(chunk=serde.chunk_to_proto(c)) for c in iter_chunks(MODEL)]
    return stub.SubmitExperiment(iter(items), timeout=30)


def test_a_flat_header_from_an_older_notebook_is_queued_as_its_spec(federation):
    assert submit_legacy(federation).queue_position == 1  # no envoy online: it waits in the queue
    status = federation.GetExperimentStatus(fed_pb.GetExperimentStatusRequest(name="old"), timeout=30)
    assert (status.name, status.state, status.rounds) == ("old", "queued", 4)


@pytest.mark.parametrize("fields, message", [
    (dict(opt_treatment="GLOBAL"), "opt_treatment 'GLOBAL' is not one of RESET, CONTINUE_LOCAL, CONTINUE_GLOBAL"),
    (dict(sync="sometimes"), "sync 'sometimes' is not one of every_round, periodic, dynamic"),
    (dict(aggregation="fedsgd"), "unknown aggregation 'fedsgd'"),
])
def test_a_bad_flat_header_is_refused_as_a_bad_spec_would_be(federation, fields, message):
    with pytest.raises(grpc.RpcError) as refused:
        submit_legacy(federation, **fields)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()
