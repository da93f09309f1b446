"""Idle streams cannot starve heartbeats: a real director with 8 threads, flooded with idle streams."""
from __future__ import annotations

import threading

import grpc
import pytest

from fedjax_core.director.budget import stream_limit
from fedjax_core.local import Process, free_port
from fedjax_core.transport import BUSY, is_retryable
from fedjax_proto import envoy_service_pb2 as env_pb
from fedjax_proto import envoy_service_pb2_grpc as env_grpc
from processes import FEDJAX, write_director_config

MAX_WORKERS = 8


@pytest.fixture
def director(tmp_path):
    port = free_port()
    config = write_director_config(tmp_path / "director.yaml", port, max_workers=MAX_WORKERS, stream_idle_s=1)
    proc = Process([*FEDJAX, "director", "start", "-c", str(config), "--disable-tls"], cwd=tmp_path, name="director")
    try:
        proc.wait_for("DIRECTOR READY")
        yield port
    finally:
        proc.stop()


class Streams:
    """Idle WaitExperiment streams, each consumed on its own thread; records how each ended."""

    def __init__(self, stub):
        self.stub = stub
        self.calls = []
        self.ended: list[grpc.StatusCode] = []
        self.details: list[str] = []
        self.changed = threading.Condition()

    def open(self, n: int) -> None:
        for i in range(n):
            call = self.stub.WaitExperiment(env_pb.WaitExperimentRequest(envoy_name=f"idle{len(self.calls)}"),
                                            timeout=120)
            self.calls.append(call)
            threading.Thread(target=self._drain, args=(call,), daemon=True).start()

    def _drain(self, call) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            with self.changed:
                self.ended.append(exc.code())
                self.details.append(exc.details() or "")
                self.changed.notify_all()

    def wait_refused(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(
                lambda: self.ended.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= n, timeout=30), self.ended

    def cancel_all(self) -> None:
        for call in self.calls:
            call.cancel()


def test_idle_streams_past_the_budget_are_refused_and_heartbeats_still_answer(director):
    limit = stream_limit(MAX_WORKERS)
    channel = grpc.insecure_channel(f"127.0.0.1:{director}")
    stub = env_grpc.EnvoyServiceStub(channel)
    streams = Streams(stub)
    try:
        streams.open(limit + 6)  # more idle streams than the server has threads
        streams.wait_refused(6)
        assert all(d.startswith(BUSY) and "settings.max_workers" in d for d in streams.details)
        for _ in range(20):  # short calls find a thread at once
            stub.Heartbeat(env_pb.HeartbeatRequest(envoy_name="idle0"), timeout=5)
        streams.cancel_all()  # their slots come back
        with streams.changed:
            assert streams.changed.wait_for(lambda: len(streams.ended) == limit + 6, timeout=30)
        fresh = Streams(stub)
        fresh.open(limit + 1)
        fresh.wait_refused(1)  # exactly one over the budget again: every freed slot was reusable
        assert fresh.ended == [grpc.StatusCode.RESOURCE_EXHAUSTED]
        fresh.cancel_all()
    finally:
        streams.cancel_all()
        channel.close()


def test_a_transfer_that_stalls_is_cancelled_by_the_director_and_frees_its_thread(director):
    channel = grpc.insecure_channel(f"127.0.0.1:{director}")
    stub = env_grpc.EnvoyServiceStub(channel)
    release = threading.Event()

    def stalled_upload():  # connects, then never sends its header: a slow-loris peer
        release.wait(timeout=120)
        yield env_pb.UploadUpdateRequest()

    stalled = [stub.UploadUpdate.future(stalled_upload(), timeout=120) for _ in range(stream_limit(MAX_WORKERS))]
    try:
        codes = [call.exception(timeout=60).code() for call in stalled]  # ended by the server, not the deadline
        assert codes == [grpc.StatusCode.CANCELLED] * len(stalled)
        streams = Streams(stub)  # every slot came back: a full budget of new streams is accepted
        streams.open(stream_limit(MAX_WORKERS) + 1)
        streams.wait_refused(1)
        assert streams.ended == [grpc.StatusCode.RESOURCE_EXHAUSTED]
        streams.cancel_all()
    finally:
        release.set()
        for call in stalled:
            call.cancel()
        channel.close()


class FakeError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_only_a_busy_director_makes_resource_exhausted_worth_retrying():
    assert is_retryable(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{BUSY}: it serves its maximum"))
    assert not is_retryable(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"))
    assert is_retryable(FakeError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert not is_retryable(FakeError(grpc.StatusCode.PERMISSION_DENIED, BUSY))
