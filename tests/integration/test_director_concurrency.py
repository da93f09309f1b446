"""The director's asyncio server: waiting calls hold no thread, past a limit they are refused as busy,
uploads past ``max_uploads`` wait their turn, and a transfer that stalls is ended. A real director process."""
from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from fedjax_core.local import Process, free_port
from fedjax_core.transport import BUSY, is_retryable
from fedjax_proto import envoy_service_pb2 as env_pb
from fedjax_proto import envoy_service_pb2_grpc as env_grpc
from processes import FEDJAX, write_director_config


class Director:
    def __init__(self, tmp_path: Path, **settings):
        self.port = free_port()
        config = write_director_config(tmp_path / "director.yaml", self.port, **settings)
        self.proc = Process([*FEDJAX, "director", "start", "-c", str(config), "--disable-tls"], cwd=tmp_path,
                            name="director")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = env_grpc.EnvoyServiceStub(self.channel)

    def threads(self) -> int:
        """Threads the director's Python code started. gRPC core names its own threads (event_engine,
        lifeguard, ...) and grows that pool on demand under load, so those are left out; Python's keep the
        process's name."""
        proc = Path(f"/proc/{self.proc.proc.pid}")
        name = (proc / "comm").read_text()
        return sum((task / "comm").read_text() == name for task in (proc / "task").iterdir())

    def stop(self) -> None:
        self.channel.close()
        self.proc.stop()


@pytest.fixture
def start_director(tmp_path):
    started = []

    def start(**settings) -> Director:
        director = Director(tmp_path, **settings)
        started.append(director)
        director.proc.wait_for("DIRECTOR READY")
        return director

    yield start
    for director in started:
        director.stop()


class Streams:
    """Idle WaitExperiment streams, each consumed on its own thread; records how each ended."""

    def __init__(self, stub):
        self.stub = stub
        self.calls = []
        self.ended: list[grpc.StatusCode] = []
        self.details: list[str] = []
        self.changed = threading.Condition()

    def open(self, n: int) -> None:
        for _ in range(n):
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

    def wait_ended(self, n: int, code: grpc.StatusCode | None = None) -> None:
        with self.changed:
            assert self.changed.wait_for(
                lambda: sum(code is None or c == code for c in self.ended) >= n, timeout=60), self.ended

    def cancel_all(self) -> None:
        for call in self.calls:
            call.cancel()


def test_hundreds_of_waiting_calls_hold_no_thread_and_heartbeats_still_answer(start_director):
    director = start_director(max_workers=4)
    director.stub.Heartbeat(env_pb.HeartbeatRequest(envoy_name="idle0"), timeout=10)  # every pool has started
    before = director.threads()
    streams = Streams(director.stub)
    waits = [director.stub.WaitTask.future(env_pb.WaitTaskRequest(envoy_name=f"w{i}", experiment_name="none",
                                                                   max_wait_s=30), timeout=60) for i in range(50)]
    try:
        streams.open(300)  # far more waiting calls than the director has threads
        for _ in range(20):
            # answered while 350 calls wait (the bound only says how long a failure takes)
            assert director.stub.Heartbeat(env_pb.HeartbeatRequest(envoy_name="idle0"), timeout=30).known is False
        assert streams.ended == []  # all still waiting, none refused
        # at most the 4 short-call threads and the heartbeat pool's second more than before (they start on
        # demand), not one per call
        assert director.threads() <= before + 4 + 1, (before, director.threads())
        for call in waits:  # a task long-poll for an experiment that does not exist ends at once
            assert call.exception(timeout=30).code() == grpc.StatusCode.NOT_FOUND
    finally:
        streams.cancel_all()


def test_waiting_calls_past_the_limit_are_refused_as_busy_and_every_freed_place_is_reusable(start_director):
    director = start_director(max_waiting_calls=8)
    streams = Streams(director.stub)
    try:
        streams.open(8 + 3)
        streams.wait_ended(3, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert len(streams.ended) == 3
        assert all(d.startswith(BUSY) and "settings.max_waiting_calls" in d for d in streams.details)
        streams.cancel_all()  # their places come back
        streams.wait_ended(8 + 3)
        fresh = Streams(director.stub)
        fresh.open(8 + 1)
        fresh.wait_ended(1)  # exactly one over the limit again
        assert fresh.ended == [grpc.StatusCode.RESOURCE_EXHAUSTED]
        fresh.cancel_all()
    finally:
        streams.cancel_all()


def test_uploads_that_never_send_their_header_are_ended_and_hold_nothing(start_director):
    """Slow-loris uploads end DEADLINE_EXCEEDED at stream_idle_s, and the director answers the next upload at
    once. (That an admitted upload past max_uploads waits for a slot: test_director_slots.py.)"""
    director = start_director(max_uploads=2, stream_idle_s=1)
    release = threading.Event()

    def stalled_upload():  # connects, then never sends its header: a slow-loris peer
        release.wait(timeout=120)
        yield env_pb.UploadUpdateRequest()

    stalled = [director.stub.UploadUpdate.future(stalled_upload(), timeout=120) for _ in range(3)]
    try:
        errors = [call.exception(timeout=60) for call in stalled]  # ended by the director, not the deadline
        assert [e.code() for e in errors] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
        assert all("sent no message for 1 s (the director's settings.stream_idle_s)" in e.details() for e in errors)
        director.proc.wait_for(r"ended UploadUpdate from ipv4:127\.0\.0\.1:\d+: it sent no message for 1 s")
        # nothing is held: the next upload is answered, not left waiting
        with pytest.raises(grpc.RpcError) as refused:
            director.stub.UploadUpdate(iter([env_pb.UploadUpdateRequest()]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must start with its header" in refused.value.details()
    finally:
        release.set()
        for call in stalled:
            call.cancel()


class FakeError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_only_a_busy_director_makes_resource_exhausted_worth_retrying():
    assert is_retryable(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{BUSY}: it holds its maximum"))
    assert not is_retryable(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"))
    assert is_retryable(FakeError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert not is_retryable(FakeError(grpc.StatusCode.PERMISSION_DENIED, BUSY))


def test_a_busy_refusal_reaches_the_notebook_as_retryable_not_as_a_storage_error():
    from fedjax_core.api.client import FederationClient
    from fedjax_core.errors import StorageError
    from fedjax_core.transport import raise_domain_error

    client = FederationClient("127.0.0.1", free_port(), None)
    try:
        busy = client._error(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{BUSY}: it holds its maximum of 8"))
        assert busy.retryable and "is busy" in str(busy) and "try again" in str(busy)
    finally:
        client.close()
    with pytest.raises(StorageError, match="disk is full"):
        raise_domain_error(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the director's disk is full"))
