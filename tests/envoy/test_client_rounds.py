"""EnvoyClient's round in two calls (the model inside the task, the reports inside the upload) against a director
that offers it, and in six against an older one that does not: the same arrays and reports reach it either way."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from fedjax_core import records as r
from fedjax_core import serde
from fedjax_core.envoy.client import EnvoyClient
from fedjax_core.errors import InvalidRequestError
from fedjax_core.tensors import iter_chunks
from fedjax_proto import envoy_service_pb2 as env_pb
from fedjax_proto import envoy_service_pb2_grpc as env_grpc
from processes import fake_servers

MODEL = {"params/w": np.arange(12, dtype=np.float32).reshape(3, 4), "step": np.array(3, np.int32)}


class FakeDirector(env_grpc.EnvoyServiceServicer):
    """Answers one TRAIN task for round 2 and records every call; ``offers``: a director with two-call rounds."""

    def __init__(self, offers: bool, refuse_upload: bool = False, next_task: r.Task | None = None,
                 small: bool = False):
        self.offers, self.refuse_upload = offers, refuse_upload
        self.small = small  # offers UploadSmallUpdate (False: a director from before it, which answers UNIMPLEMENTED)
        self.small_refused = 0
        self.received: list[int] = []
        self.next_task = next_task  # answered inside the upload when asked for (None: an older director)
        self.asked_next: list[float] = []
        self.calls: list[str] = []
        self.reports: list[r.StageReport] = []
        self.uploaded_reports: list[r.StageReport] = []
        self.asked_inline: list[bool] = []
        self._lock = threading.Lock()

    def _called(self, name: str) -> None:
        with self._lock:
            self.calls.append(name)

    def WaitTask(self, request, context):
        self._called("WaitTask")
        self.asked_inline.append(request.inline_model)
        response = serde.task_to_proto(r.Task(kind=r.TaskKind.TRAIN, round=2, upload_tensors=tuple(MODEL),
                                              reports_with_upload=self.offers))
        if self.offers and request.inline_model:
            response.model.extend(serde.chunk_protos(iter_chunks(MODEL)))
            response.model_inline = True
        return response

    def GetRoundModel(self, request, context):
        self._called("GetRoundModel")
        yield from serde.chunk_protos(iter_chunks(MODEL))

    def ReportMetrics(self, request, context):
        self._called("ReportMetrics")
        self.reports.append(r.StageReport(request.stage, serde.metrics_from_proto(request.metrics),
                                          request.sample_count))
        return env_pb.ReportMetricsResponse()

    def UploadUpdate(self, request_iterator, context):
        self._called("UploadUpdate")
        header = next(request_iterator).header
        return self._uploaded(header, [c for m in request_iterator for c in serde.unpacked_chunks(m.chunk)], context)

    def UploadSmallUpdate(self, request, context):
        if not self.small:
            self.small_refused += 1
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self._called("UploadSmallUpdate")
        return self._uploaded(request.header, [c for m in request.chunks for c in serde.unpacked_chunks(m)], context)

    def _uploaded(self, header, chunks: list[r.TensorChunk], context):
        received = sum(len(c.data) for c in chunks)
        self.received.append(received)
        if self.refuse_upload:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "update from 'env': NaN in params/w")
        self.uploaded_reports = [serde.stage_report_from_proto(m) for m in header.reports]
        self.asked_next.append(header.next_task_wait_s)
        response = env_pb.UploadUpdateResponse(bytes_received=received)
        if self.next_task is not None and header.next_task_wait_s > 0:
            response.next_task.CopyFrom(serde.task_to_proto(self.next_task))
            if self.next_task.kind == r.TaskKind.TRAIN and header.inline_model:
                response.next_task.model.extend(serde.chunk_protos(iter_chunks(MODEL)))
                response.next_task.model_inline = True
        return response


@pytest.fixture
def serve():
    with fake_servers(env_grpc.add_EnvoyServiceServicer_to_server,
                      lambda port: EnvoyClient("env", f"127.0.0.1:{port}", None, retry_s=0)) as start:
        yield start


def play_round(client: EnvoyClient) -> dict[str, np.ndarray]:
    """What a worker does in a TRAIN round (round_runner's calls, in order)."""
    task = client.wait_task("exp")
    model = client.round_model("exp", task.round)
    client.report_metrics("exp", task.round, r.Stage.AGGREGATED, {"validate": {"acc": 0.25}}, 5)
    client.report_metrics("exp", task.round, r.Stage.TRAIN, {"train": {"loss": 1.5}}, 10)
    client.report_metrics("exp", task.round, r.Stage.LOCAL, {"validate": {"acc": 0.5}}, 5)
    client.upload("exp", task.round, 10, {name: model[name] + 1 for name in task.upload_tensors})
    return model


EXPECTED_REPORTS = [r.StageReport(r.Stage.AGGREGATED, (r.Metric("validate", "acc", 0.25),), 5),
                    r.StageReport(r.Stage.TRAIN, (r.Metric("train", "loss", 1.5),), 10),
                    r.StageReport(r.Stage.LOCAL, (r.Metric("validate", "acc", 0.5),), 5)]


def test_a_director_that_offers_it_gets_the_round_in_two_calls(serve):
    director = FakeDirector(offers=True)
    client = serve(director)
    model = play_round(client)
    assert director.calls == ["WaitTask", "UploadUpdate"]
    assert director.uploaded_reports == EXPECTED_REPORTS and director.reports == []
    assert director.asked_next[0] > 0  # asked for the next task; a director that sends none: WaitTask, as before
    client.wait_task("exp")
    assert director.calls == ["WaitTask", "UploadUpdate", "WaitTask"]
    for name, array in MODEL.items():
        np.testing.assert_array_equal(model[name], array)
        assert not model[name].flags.writeable  # as GetRoundModel's arrays: JAX may take them without a copy


def test_the_next_task_inside_the_upload_spares_the_wait_task_call(serve):
    director = FakeDirector(offers=True, next_task=r.Task(kind=r.TaskKind.TRAIN, round=3, upload_tensors=tuple(MODEL),
                                                          reports_with_upload=True))
    client = serve(director)
    play_round(client)
    assert client.wait_task("exp").round == 3  # the upload brought it
    model = client.round_model("exp", 3)  # and its model
    assert director.calls == ["WaitTask", "UploadUpdate"] and director.asked_next[0] > 0
    for name, array in MODEL.items():
        np.testing.assert_array_equal(model[name], array)
    client.report_metrics("exp", 3, r.Stage.TRAIN, {"train": {"loss": 1.5}}, 10)
    client.upload("exp", 3, 10, {name: model[name] for name in MODEL})
    assert director.uploaded_reports == [EXPECTED_REPORTS[1]]  # the round's reports held for its upload, as ever


def test_no_next_task_within_the_wait_means_asking_with_wait_task(serve):
    director = FakeDirector(offers=True, next_task=r.Task(kind=r.TaskKind.NONE))
    client = serve(director)
    play_round(client)
    assert client.wait_task("exp").round == 2  # WaitTask's answer
    assert director.calls == ["WaitTask", "UploadUpdate", "WaitTask"]


def test_a_director_before_it_gets_every_call_as_before(serve):
    director = FakeDirector(offers=False)
    model = play_round(serve(director))
    assert director.asked_inline == [True]  # asked; an older director ignores the field
    assert director.calls == ["WaitTask", "GetRoundModel", "ReportMetrics", "ReportMetrics", "ReportMetrics",
                              "UploadUpdate"]
    assert director.reports == EXPECTED_REPORTS and director.uploaded_reports == []
    for name, array in MODEL.items():
        np.testing.assert_array_equal(model[name], array)


def test_reports_held_for_an_upload_that_failed_are_sent_on_their_own(serve):
    director = FakeDirector(offers=True, refuse_upload=True)
    client = serve(director)
    with pytest.raises(InvalidRequestError, match="NaN"):
        play_round(client)
    assert director.reports == []
    client.send_held_reports("exp", 2)  # what the worker does before it reports the round's failure
    assert director.reports == EXPECTED_REPORTS
    client.send_held_reports("exp", 2)
    assert director.reports == EXPECTED_REPORTS  # sent once


def test_a_new_task_forgets_the_reports_of_a_round_that_went_on(serve):
    director = FakeDirector(offers=True)
    client = serve(director)
    task = client.wait_task("exp")
    client.report_metrics("exp", task.round, r.Stage.AGGREGATED, {"validate": {"acc": 0.25}}, 5)
    client.wait_task("exp")  # the round closed without this envoy: the next task comes
    client.send_held_reports("exp", task.round)
    assert director.reports == []


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_report_held_past_hold_s_goes_on_its_own_so_the_notebook_sees_it_while_the_envoy_trains(serve):
    director = FakeDirector(offers=True)
    client = serve(director)
    client._reports.hold_s = 0.05
    task = client.wait_task("exp")
    client.round_model("exp", task.round)
    client.report_metrics("exp", task.round, r.Stage.AGGREGATED, {"validate": {"acc": 0.25}}, 5)
    wait_for(lambda: director.reports == EXPECTED_REPORTS[:1])  # training takes long: sent without the upload
    client._reports.hold_s = 60
    client.report_metrics("exp", task.round, r.Stage.TRAIN, {"train": {"loss": 1.5}}, 10)
    client.report_metrics("exp", task.round, r.Stage.LOCAL, {"validate": {"acc": 0.5}}, 5)
    client.upload("exp", task.round, 10, {name: MODEL[name] for name in task.upload_tensors})
    assert director.uploaded_reports == EXPECTED_REPORTS[1:]  # each report once, none lost
    assert director.calls == ["WaitTask", "ReportMetrics", "UploadUpdate"]


def test_the_upload_raises_the_failure_of_a_report_sent_on_its_own_and_does_not_upload(serve):
    class Refusing(FakeDirector):
        def ReportMetrics(self, request, context):
            self._called("ReportMetrics")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "envoy 'env' reported validate/acc = nan")

    director = Refusing(offers=True)
    client = serve(director)
    client._reports.hold_s = 0.05
    task = client.wait_task("exp")
    client.report_metrics("exp", task.round, r.Stage.AGGREGATED, {"validate": {"acc": float("nan")}}, 5)
    wait_for(lambda: "ReportMetrics" in director.calls)
    with pytest.raises(InvalidRequestError, match="nan"):
        client.upload("exp", task.round, 10, {name: MODEL[name] for name in task.upload_tensors})
    assert "UploadUpdate" not in director.calls


def test_a_small_update_goes_in_one_call_and_a_large_one_streams(serve, monkeypatch):
    director = FakeDirector(offers=True, small=True)
    client = serve(director)
    play_round(client)
    assert director.calls == ["WaitTask", "UploadSmallUpdate"]
    assert director.uploaded_reports == EXPECTED_REPORTS and director.received == [sum(a.nbytes for a in MODEL.values())]
    monkeypatch.setattr("fedjax_core.envoy.client.SMALL_UPDATE_BYTES", 16)  # this model is larger: the stream
    client.upload("exp", 2, 10, MODEL)
    assert director.calls[-1] == "UploadUpdate" and director.received[-1] == director.received[0]


def test_a_director_before_small_updates_gets_the_stream_and_is_asked_once(serve):
    director = FakeDirector(offers=True)
    client = serve(director)
    play_round(client)
    client.upload("exp", 2, 10, MODEL)
    assert director.small_refused == 1  # remembered: the second upload went straight to the stream
    assert director.calls == ["WaitTask", "UploadUpdate", "UploadUpdate"]
    assert director.uploaded_reports == [] and director.received == [sum(a.nbytes for a in MODEL.values())] * 2
