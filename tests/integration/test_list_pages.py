"""List answers come in pages (a real director, raw gRPC): envoys whose label counts together pass gRPC's
8 MiB message limit no longer break the shard registry for every notebook; experiments list page by page in
submission order; a bad page size or token is INVALID_ARGUMENT; the notebook client reads every page."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from fedjax_core import Federation, serde
from fedjax_core.director.paging import DEFAULT_PAGE_ROWS, MAX_PAGE_ROWS
from fedjax_core.local import Process, free_port
from fedjax_core.spec import ExperimentSpec
from fedjax_core.tensors import iter_chunks, spec_of
from fedjax_proto import envoy_service_pb2 as env_pb
from fedjax_proto import envoy_service_pb2_grpc as env_grpc
from fedjax_proto import federation_service_pb2 as fed_pb
from fedjax_proto import federation_service_pb2_grpc as fed_grpc
from processes import FEDJAX, write_director_config

MODEL = {"params/w": np.ones((2, 2), np.float32)}


@pytest.fixture
def director(tmp_path):
    port = free_port()
    config = write_director_config(tmp_path / "director.yaml", port)
    proc = Process([*FEDJAX, "director", "start", "-c", str(config), "--disable-tls"], cwd=tmp_path, name="director")
    try:
        proc.wait_for("DIRECTOR READY")
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            yield port, env_grpc.EnvoyServiceStub(ch), fed_grpc.FederationServiceStub(ch)
    finally:
        proc.stop()


def submit(stub, name: str) -> None:
    spec = ExperimentSpec(name=name, rounds=1, bundle_size=3, model_spec=tuple(spec_of(k, v) for k, v in MODEL.items()))
    items = [fed_pb.SubmitExperimentRequest(spec=serde.experiment_spec_to_proto(spec)), fed_pb.SubmitExperimentRequest(bundle_data=b"abc")]
    items += [fed_pb.SubmitExperimentRequest(chunk=serde.chunk_to_proto(c)) for c in iter_chunks(MODEL)]
    stub.SubmitExperiment(iter(items), timeout=30)


def test_registry_of_envoys_with_huge_label_counts_is_paged(director):
    port, envoys, fed = director
    shard = env_pb.ShardInfo(sample_shape=["32", "32", "3"], target_shape=["1"], train_size=8, valid_size=8,
                             label_counts=[2**62] * (1 << 16), hostname="localhost")
    names = [f"env{i:02d}" for i in range(16)]  # ~650 KiB each: 10 MiB in all, over gRPC's 8 MiB limit
    for name in names:
        envoys.RegisterEnvoy(env_pb.RegisterEnvoyRequest(envoy_name=name, shard_info=shard, instance_id=name),
                             timeout=30)
    first = fed.GetShardRegistry(fed_pb.GetShardRegistryRequest(), timeout=30)
    assert 0 < len(first.envoys) < len(names) and first.next_page_token == first.envoys[-1].name
    assert first.ByteSize() < 5 << 20

    federation = Federation(client_id="api", director_node_fqdn="127.0.0.1", director_port=port, tls=False)
    try:
        registry = federation.get_shard_registry()
    finally:
        federation.close()
    assert sorted(registry) == names
    assert all(len(entry["shard_info"]["label_counts"]) == 1 << 16 for entry in registry.values())


def test_experiments_list_in_pages_in_submission_order(director):
    port, _, fed = director
    names = [f"exp-{i:03d}" for i in range(DEFAULT_PAGE_ROWS + 20)]
    for name in reversed(names[:10]):  # names out of alphabetical order: the list keeps submission order
        submit(fed, name)
    for name in names[10:]:
        submit(fed, name)
    order = [*reversed(names[:10]), *names[10:]]

    first = fed.ListExperiments(fed_pb.ListExperimentsRequest(), timeout=30)
    assert [e.name for e in first.experiments] == order[:DEFAULT_PAGE_ROWS] and first.next_page_token
    small = fed.ListExperiments(fed_pb.ListExperimentsRequest(page_size=7, page_token=first.next_page_token),
                                timeout=30)
    assert [e.name for e in small.experiments] == order[DEFAULT_PAGE_ROWS:DEFAULT_PAGE_ROWS + 7]
    rest = fed.ListExperiments(fed_pb.ListExperimentsRequest(page_size=MAX_PAGE_ROWS,
                                                             page_token=small.next_page_token), timeout=30)
    assert [e.name for e in rest.experiments] == order[DEFAULT_PAGE_ROWS + 7:] and rest.next_page_token == ""

    federation = Federation(client_id="api", director_node_fqdn="127.0.0.1", director_port=port, tls=False)
    try:
        assert [s.name for s in federation.client.experiments()] == order
    finally:
        federation.close()

    for request, message in [(fed_pb.ListExperimentsRequest(page_size=MAX_PAGE_ROWS + 1), "page_size is 1001"),
                             (fed_pb.ListExperimentsRequest(page_size=-1), "page_size is -1"),
                             (fed_pb.ListExperimentsRequest(page_token="exp-003"), "not one this director gave"),
                             (fed_pb.GetShardRegistryRequest(page_token="x" * 300), "at most 256")]:
        call = fed.ListExperiments if isinstance(request, fed_pb.ListExperimentsRequest) else fed.GetShardRegistry
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()
