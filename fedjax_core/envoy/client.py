"""The envoy side of the EnvoyService: typed calls with reconnection, used by daemon and worker."""
from __future__ import annotations

import collections
import hashlib
import os
import threading
import uuid
from typing import NamedTuple
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import grpc
import numpy as np

from fedjax_core import codecs
from fedjax_core import records as r
from fedjax_core import serde
from fedjax_core.envoy.held_reports import HeldReports
from fedjax_core.tensors import assemble, chunk_views
from fedjax_core.transport import SMALL_UPDATE_BYTES, TLSFiles, call_with_retry, open_channel
from fedjax_proto import envoy_service_pb2 as env_pb
from fedjax_proto import envoy_service_pb2_grpc as env_grpc


_CHUNK_KEY = serde.field_key(env_pb.UploadUpdateRequest.DESCRIPTOR.fields_by_name["chunk"])


def upload_chunk_messages(chunks: Iterable[r.TensorChunk]) -> Iterator[bytes]:
    """``UploadUpdateRequest(chunk=...)`` messages for ``chunks`` (small ones packed), serialized: the bytes
    protobuf writes, with each chunk's data (bytes or a memoryview) copied once (see serde.message_wire)."""
    for group in serde.pack(chunks):
        parts = serde.message_wire(group)
        size = sum(memoryview(part).nbytes for part in parts)
        yield b"".join((_CHUNK_KEY, serde.varint(size), *parts))


NEXT_TASK_WAIT_S = 30.0  # an upload's answer waits up to this long for the worker's next task (sparing a WaitTask)
TOKEN_KEY = "fedjax-worker-token"  # the metadata key of a worker's proxy token (proxy.py)


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")), grpc.ClientCallDetails):
    pass


class _WithToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the worker's proxy token to every call's metadata."""

    def __init__(self, token: str):
        self._entry = (TOKEN_KEY, token)

    def _details(self, d) -> _CallDetails:
        return _CallDetails(d.method, d.timeout, (*(d.metadata or ()), self._entry), d.credentials,
                            d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class EnvoyClient:
    def __init__(self, envoy_name: str, target: str, tls: TLSFiles | None,
                 stop: threading.Event | None = None, retry_s: float = 3600.0, token: str | None = None):
        """``target``: the director's ``host:port``, or the daemon's worker proxy (``unix:PATH``), which wants
        the worker's ``token`` on every call."""
        self.envoy_name = envoy_name
        self.instance_id = uuid.uuid4().hex  # this process's claim on the name
        self.address = target
        self._channel = open_channel(target, tls)
        if token:
            self._channel = grpc.intercept_channel(self._channel, _WithToken(token))
        self._stub = env_grpc.EnvoyServiceStub(self._channel)
        # UploadUpdate with requests this client serializes itself (upload_chunk_messages), same wire bytes
        self._upload = self._channel.stream_unary("/fedjax.EnvoyService/UploadUpdate", request_serializer=None,
                                                  response_deserializer=env_pb.UploadUpdateResponse.FromString,
                                                  _registered_method=True)
        self._upload_small = self._channel.unary_unary("/fedjax.EnvoyService/UploadSmallUpdate", request_serializer=None,
                                                       response_deserializer=env_pb.UploadUpdateResponse.FromString,
                                                       _registered_method=True)
        self._small_uploads = True  # until a director (or worker proxy) from before UploadSmallUpdate says UNIMPLEMENTED
        self._stop = stop or threading.Event()
        self._retry_s = retry_s
        self._inline: dict[tuple[str, int], dict[str, np.ndarray]] = {}  # (experiment, round) -> model its task carried
        self._next: dict[str, env_pb.WaitTaskResponse] = {}  # experiment -> the next task its last upload brought
        self._reports = HeldReports(self._send_report)  # a round's metric reports, for its upload

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def close(self) -> None:
        self._channel.close()

    def _retry(self, fn, what: str):
        return call_with_retry(fn, f"{what} at {self.address}", self._retry_s, stop=self._stop.is_set,
                               wait=self._stop.wait)

    def register(self, info: r.ShardInfo, retry_s: float | None = None) -> float:
        req = env_pb.RegisterEnvoyRequest(envoy_name=self.envoy_name, shard_info=serde.shard_info_to_proto(info),
                                          instance_id=self.instance_id)
        fn = lambda: self._stub.RegisterEnvoy(req, timeout=10).health_check_period_s  # noqa: E731
        return fn() if retry_s == 0 else self._retry(fn, "register")

    def heartbeat(self) -> bool:
        request = env_pb.HeartbeatRequest(envoy_name=self.envoy_name, instance_id=self.instance_id)
        return self._stub.Heartbeat(request, timeout=10).known

    def experiments(self) -> "ExperimentStream":
        """Experiments, pushed by the director as they are assigned (one open stream)."""
        return ExperimentStream(self._stub.WaitExperiment(env_pb.WaitExperimentRequest(envoy_name=self.envoy_name)))

    def download_bundle(self, experiment: str, path: Path) -> str:
        """Download the experiment's bundle to ``path``; returns its hex SHA-256."""
        def fetch() -> str:
            tmp = path.with_suffix(".partial")
            digest = hashlib.sha256()
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as f:
                req = env_pb.GetExperimentBundleRequest(envoy_name=self.envoy_name, experiment_name=experiment)
                for chunk in self._stub.GetExperimentBundle(req, timeout=600):
                    digest.update(chunk.data)
                    f.write(chunk.data)
            tmp.replace(path)
            return digest.hexdigest()
        return self._retry(fetch, "download the experiment bundle")

    def wait_task(self, experiment: str, max_wait_s: float = 30.0) -> r.Task:
        """The next task. A small round model comes inside the answer (kept for :meth:`round_model`), and the
        director may ask for the round's metric reports inside its upload (kept by :meth:`report_metrics`)."""
        response = self._next.pop(experiment, None)
        if response is None or response.kind == env_pb.WaitTaskResponse.NONE:
            req = env_pb.WaitTaskRequest(envoy_name=self.envoy_name, experiment_name=experiment,
                                         max_wait_s=max_wait_s, inline_model=True)
            response = self._retry(lambda: self._stub.WaitTask(req, timeout=max_wait_s + 30), "wait for a task")
        task = serde.task_from_proto(response)
        if task.kind == r.TaskKind.NONE:
            return task
        self._inline = {}
        if response.model_inline:
            self._inline[(experiment, task.round)] = _decoded(serde.chunk_stream(response.model))
        self._reports.round_started(experiment, task.round, task.reports_with_upload)
        return task

    def round_model(self, experiment: str, round_: int) -> dict[str, np.ndarray]:
        """The round's model, decoded when it travelled compressed."""
        carried = self._inline.pop((experiment, round_), None)
        if carried is not None:
            return carried
        req = env_pb.GetRoundModelRequest(envoy_name=self.envoy_name, experiment_name=experiment, round=round_)
        fetch = lambda: _decoded(serde.chunk_stream(self._stub.GetRoundModel(req, timeout=600)))  # noqa: E731
        return self._retry(fetch, "download the round's model")

    def check_in(self, experiment: str, round_: int, divergence: float) -> bool:
        """Report this round's divergence; True when the director wants the trained model now."""
        req = env_pb.CheckInRequest(envoy_name=self.envoy_name, experiment_name=experiment, round=round_,
                                    divergence=divergence)
        return self._retry(lambda: self._stub.CheckIn(req, timeout=60).upload, "check in")

    def report_metrics(self, experiment: str, round_: int, stage: str, metrics: Mapping[str, Mapping[str, float]],
                       sample_count: int) -> None:
        """Report one stage's metrics; held for the upload when the round's task said reports_with_upload (see
        HeldReports: one held a while is sent on its own)."""
        report = r.StageReport(stage, tuple(r.Metric(task, name, value) for task, values in metrics.items()
                                            for name, value in values.items()), sample_count)
        if not self._reports.hold(experiment, round_, report):
            self._send_report(experiment, round_, report)

    def _send_report(self, experiment: str, round_: int, report: r.StageReport) -> None:
        req = env_pb.ReportMetricsRequest(envoy_name=self.envoy_name, experiment_name=experiment, round=round_,
                                          stage=report.stage, sample_count=report.sample_count,
                                          metrics=serde.metrics_to_proto(report.metrics))
        self._retry(lambda: self._stub.ReportMetrics(req, timeout=60), "report metrics")

    def send_held_reports(self, experiment: str, round_: int) -> None:
        """Send, one ReportMetrics each, the reports held for a round that ends without an upload (a task failed)."""
        self._reports.send_now(experiment, round_)

    def upload(self, experiment: str, round_: int, sample_count: int, tensors: Mapping[str, np.ndarray],
               encodings: Mapping[str, r.Encoding] | None = None, applied: tuple[float, float] = (0.0, 0.0)) -> int:
        """``applied``: the (clip_norm, noise_std) the update was privatised with, which the director checks."""
        with self._reports.for_upload(experiment, round_) as held:
            header = env_pb.UploadUpdateRequest.Header(envoy_name=self.envoy_name, experiment_name=experiment,
                                                       round=round_, train_sample_count=sample_count,
                                                       clip_norm=applied[0], noise_std=applied[1],
                                                       reports=[serde.stage_report_to_proto(rep) for rep in held],
                                                       next_task_wait_s=NEXT_TASK_WAIT_S, inline_model=True)

            def requests():  # serialized here: each chunk's data is copied once, straight from the arrays
                yield env_pb.UploadUpdateRequest(header=header).SerializeToString()
                yield from upload_chunk_messages(chunk_views(tensors, encodings=encodings))

            small = sum(getattr(t, "nbytes", None) or np.asarray(t).nbytes for t in tensors.values()) <= SMALL_UPDATE_BYTES

            def send() -> env_pb.UploadUpdateResponse:
                if small and self._small_uploads:
                    try:  # SmallUpdateRequest's wire bytes are the stream's messages one after another
                        return self._upload_small(b"".join(requests()), timeout=600 + NEXT_TASK_WAIT_S)
                    except grpc.RpcError as exc:
                        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                            raise
                        self._small_uploads = False  # an older director or worker proxy: the stream from now on
                return self._upload(requests(), timeout=600 + NEXT_TASK_WAIT_S)

            response = self._retry(send, "upload the update")
        if response.HasField("next_task"):  # kept for wait_task (an older director sends none)
            self._next[experiment] = response.next_task
        return response.bytes_received

    def secagg(self, experiment: str, round_: int, phase: str, keys: r.SecAggKeys | None = None,
               items: Mapping[str, bytes] | None = None) -> None:
        """A step of the round's secure aggregation: ``keys`` (phase 'keys'), or encrypted ('shares') or revealed
        ('reveal') shares by neighbour."""
        req = env_pb.SecAggRequest(envoy_name=self.envoy_name, experiment_name=experiment, round=round_)
        if phase == "keys":
            req.keys.CopyFrom(serde.secagg_keys_to_proto(keys))
        else:
            getattr(req, phase).items.update(dict(items or {}))
        self._retry(lambda: self._stub.SecAgg(req, timeout=60), f"send its secure aggregation {phase}")

    def report_failure(self, experiment: str, error: str, round_: int | None = None,
                       worker_lost: bool = False, refused: bool = False) -> None:
        """``round_``: a task failed in that round (a dropout); ``worker_lost``: the worker died (a dropout
        from the round in progress); ``refused``: this envoy refuses the experiment (it drops out of it);
        none: this envoy cannot go on at all."""
        req = env_pb.ReportFailureRequest(envoy_name=self.envoy_name, experiment_name=experiment, error=error,
                                          round=round_, worker_lost=worker_lost, refused=refused)
        self._stub.ReportFailure(req, timeout=30)


def _decoded(chunks: Iterable[r.TensorChunk]) -> dict[str, np.ndarray]:
    """A round model's arrays from its chunks, decoded when it travelled compressed, read-only (JAX may take these
    buffers as they are, without a copy)."""
    specs: dict[str, r.TensorSpec] = {}
    arrays = assemble(chunks, specs)
    decoded = {name: codecs.decode(array, specs[name].encoding) for name, array in arrays.items()}
    for array in decoded.values():
        array.flags.writeable = False
    return decoded


class Pushed(NamedTuple):
    """An experiment the director pushed to this envoy."""
    experiment: str
    submitter: str
    sha256: str  # of its bundle, as the director received it
    running: frozenset[str]  # every experiment the envoy works for now (empty from a director before 0.1)


class ExperimentStream:
    """Iterates :class:`Pushed` experiments from an open WaitExperiment call; ``cancel()`` ends it."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> Iterator[Pushed]:
        for msg in self._call:
            yield Pushed(msg.experiment_name, msg.submitter, msg.bundle_sha256, frozenset(msg.running))

    def cancel(self) -> None:
        self._call.cancel()
