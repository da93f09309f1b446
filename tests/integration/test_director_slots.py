"""No single caller holds the director's slots (a real director; raw gRPC envoys the test speaks for): an
upload slot goes only to an envoy the round waits for, after its header was read and checked; empty messages
do not keep a transfer alive; the slot limit really makes the next upload wait; notebook streams have a
budget of their own, so they cannot crowd out the envoys' long-polls."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from fedjax_core import Federation, FLExperiment, ModelInterface
from fedjax_core import records as r
from fedjax_core import serde
from fedjax_core.api.client import FederationClient
from fedjax_core.runtime.model_tensors import state_to_tensors
from fedjax_core.envoy.client import EnvoyClient
from fedjax_core.local import Process, free_port
from fedjax_core.spec import from_flat
from fedjax_core.tensors import spec_of
from fedjax_proto import envoy_service_pb2 as env_pb
from fedjax_proto import envoy_service_pb2_grpc as env_grpc
from fedjax_proto import federation_service_pb2 as fed_pb
from fedjax_proto import federation_service_pb2_grpc as fed_grpc
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import FEDJAX, wait_until, write_director_config

SHARD = env_pb.ShardInfo(sample_shape=["32", "32", "3"], target_shape=["1"], train_size=64, valid_size=64,
                         description="raw", hostname="localhost")
IDLE_S = 3


class RawEnvoys:
    """Envoys that only register and beat: no daemon, no worker."""

    def __init__(self, stub, names):
        self.stub, self.names, self.stop = stub, names, threading.Event()
        for name in names:
            stub.RegisterEnvoy(env_pb.RegisterEnvoyRequest(envoy_name=name, shard_info=SHARD, instance_id=name),
                               timeout=10)
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self):
        while not self.stop.wait(0.3):
            for name in self.names:
                self.stub.Heartbeat(env_pb.HeartbeatRequest(envoy_name=name, instance_id=name), timeout=10)

    def close(self):
        self.stop.set()
        self.thread.join()


@pytest.fixture
def running(tmp_path):
    """A director (max_uploads=1, stream_idle_s=3, max_waiting_calls=8) running experiment 'slots' on env1
    and env2; 'intruder' is registered too, in no experiment. Yields its port, an envoy stub, a notebook stub and
    the director's process."""
    port = free_port()
    config = write_director_config(tmp_path / "director.yaml", port, max_uploads=1, stream_idle_s=IDLE_S,
                                   max_waiting_calls=8)
    proc = Process([*FEDJAX, "director", "start", "-c", str(config), "--disable-tls"], cwd=tmp_path, name="director")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    envoys = None
    try:
        proc.wait_for("DIRECTOR READY")
        stub = env_grpc.EnvoyServiceStub(channel)
        envoys = RawEnvoys(stub, ["env1", "env2", "intruder"])
        exp = FLExperiment(federation=Federation(director_node_fqdn="127.0.0.1", director_port=port, tls=False),
                           experiment_name="slots")
        exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
                  data_loader=SubsetDataset(limit=64), rounds_to_train=1, envoys=["env1", "env2"])
        assert exp.get_experiment_status().state == "running"
        yield port, stub, fed_grpc.FederationServiceStub(channel), proc
    finally:
        if envoys is not None:
            envoys.close()
        channel.close()
        proc.stop()


def header_then(envoy: str, release: threading.Event):
    """An update stream that sends its header, then nothing until ``release``."""
    yield env_pb.UploadUpdateRequest(header=env_pb.UploadUpdateRequest.Header(
        envoy_name=envoy, experiment_name="slots", round=0, train_sample_count=64))
    release.wait(60)


def test_an_upload_from_an_envoy_no_round_waits_for_is_refused_without_a_slot(running):
    _, stub, _, _ = running
    release = threading.Event()
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stub.UploadUpdate(header_then("intruder", release), timeout=60)
        assert refused.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
        assert "intruder" in refused.value.details()  # refused on its header, not ended for stalling
    finally:
        release.set()


def test_empty_messages_do_not_keep_a_submission_slot(running):
    _, _, fed, _ = running
    release = threading.Event()
    def held(name: str):  # a valid header, then an empty bundle message every half second: bytes that never come
        header = from_flat(dict(name=name, rounds=1, opt_treatment="RESET", bundle_size=10,
                                    model_spec=(spec_of("params/w", np.ones(4, np.float32)),)))
        yield fed_pb.SubmitExperimentRequest(spec=serde.experiment_spec_to_proto(header))
        while not release.wait(0.5):
            yield fed_pb.SubmitExperimentRequest(bundle_data=b"")

    try:
        calls = [fed.SubmitExperiment.future(held(f"held{i}"), timeout=60) for i in range(2)]  # both slots
        for call in calls:
            error = call.exception(timeout=30)
            assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
            assert "bytes in" in error.details() and "settings.stream_idle_s" in error.details()
    finally:
        release.set()


def trickle(envoy: str, name: str, tensor: np.ndarray, release: threading.Event):
    """An upload that keeps moving (2 KiB of one tensor every half second, enough never to count as stalled)
    and never ends until ``release``: it holds its upload slot as long as the test wants."""
    yield env_pb.UploadUpdateRequest(header=env_pb.UploadUpdateRequest.Header(
        envoy_name=envoy, experiment_name="slots", round=0, train_sample_count=64))
    data = tensor.tobytes()
    for offset in range(0, len(data), 2048):
        chunk = serde.chunk_to_proto(r.TensorChunk(spec=spec_of(name, tensor) if offset == 0 else None, name=name,
                                                   offset=offset, data=data[offset:offset + 2048]))
        yield env_pb.UploadUpdateRequest(chunk=chunk)
        if release.wait(0.5):
            return


def test_a_held_slot_makes_the_next_upload_wait_for_it(running):
    """With max_uploads=1, env2's upload cannot finish while env1's holds the slot, however long it is given;
    it finishes once env1's call ends."""
    port, stub, _, _ = running
    release = threading.Event()
    env2 = EnvoyClient("env2", f"127.0.0.1:{port}", None, retry_s=0)
    pool = ThreadPoolExecutor(1)
    try:
        task = env2.wait_task("slots")
        tensors = {n: t for n, t in state_to_tensors(create_train_state()).items() if n in task.upload_tensors}
        name, big = max(tensors.items(), key=lambda item: item[1].nbytes)
        holder = stub.UploadUpdate.future(trickle("env1", name, big, release), timeout=120)
        wait_until(lambda: "already in progress" in probe(stub, "env1"), 30, "env1's upload to hold the slot")
        upload = pool.submit(env2.upload, "slots", 0, 64, tensors)
        with pytest.raises(TimeoutError):  # a director without the limit takes it at once
            upload.result(timeout=3)
        assert not holder.done()  # env1 still moving, still holding the slot
        holder.cancel()  # env1 gives up: its slot frees
        assert upload.result(timeout=60) > 0  # env2's wait was not its stall: it went through
    finally:
        release.set()
        pool.shutdown(wait=True, cancel_futures=True)
        env2.close()


def test_notebook_streams_have_a_budget_of_their_own(running):
    _, stub, fed, _ = running
    streams = [fed.StreamMetrics(fed_pb.StreamMetricsRequest(experiment_name="slots"), timeout=30) for _ in range(9)]
    waits = []
    try:
        wait_until(lambda: any(call.done() for call in streams), 30, "the stream past the budget to be refused")
        refused = [call for call in streams if call.done()]
        assert len(refused) == 1 and refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "notebook streams" in refused[0].details()
        waits = [stub.WaitExperiment(env_pb.WaitExperimentRequest(envoy_name=f"idle{i}"), timeout=30)
                 for i in range(8)]
        assert [_ended_with(call) for call in waits] == [None] * 8  # all eight still waiting
    finally:
        for call in streams + waits:
            call.cancel()


def probe(stub, envoy: str) -> str:
    """What the director answers a second upload from ``envoy`` at once (refused before it could take a slot);
    one the director admits waits for the slot and is given up after half a second."""
    try:
        stub.UploadUpdate(iter([next(header_then(envoy, threading.Event()))]), timeout=0.5)
    except grpc.RpcError as exc:
        return exc.details() or ""
    return ""


def _ended_with(call, within_s: float = 1.0):
    """The status a streaming call ended with within ``within_s``, or None while it is still open."""
    done = threading.Event()
    call.add_done_callback(lambda _: done.set())
    if not done.wait(within_s):
        return None
    return call.code()


def test_a_download_the_caller_stops_reading_is_ended_at_stream_idle_s(tmp_path):
    """An envoy that opens its round model and stops reading holds nothing: once gRPC's flow control stops the
    director's writes (a 64 MiB model is far more than the connection buffers), the transfer's watchdog ends
    the call after stream_idle_s."""
    port = free_port()
    config = write_director_config(tmp_path / "director.yaml", port, stream_idle_s=IDLE_S)
    proc = Process([*FEDJAX, "director", "start", "-c", str(config), "--disable-tls"], cwd=tmp_path, name="director")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 8 << 20)])
    envoys = None
    try:
        proc.wait_for("DIRECTOR READY")
        stub = env_grpc.EnvoyServiceStub(channel)
        envoys = RawEnvoys(stub, ["env1"])
        model = {"params/w": np.ones((16, 1 << 20), np.float32)}  # 64 MiB
        client = FederationClient("127.0.0.1", port, None)
        client.submit(from_flat(dict(name="big", rounds=1, opt_treatment="RESET", bundle_size=3, envoys=("env1",),
                                         model_spec=tuple(spec_of(k, v) for k, v in model.items()))), b"abc", model)
        client.close()
        stream = stub.GetRoundModel(env_pb.GetRoundModelRequest(envoy_name="env1", experiment_name="big", round=0),
                                    timeout=120)
        next(stream)  # the first message, then nothing more is read
        proc.wait_for(r"ended GetRoundModel from .*: it took no message for 3 s", timeout=60)
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "took no message" in ended.value.details()
    finally:
        if envoys is not None:
            envoys.close()
        channel.close()
        proc.stop()
