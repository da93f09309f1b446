"""Thin gRPC servicers: translate protos to records, call the Director, translate back."""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from typing import NoReturn

import grpc

from fedjax_core import serde
from fedjax_core.director.core import Director
from fedjax_core.errors import InvalidRequestError, PermissionDeniedError
from fedjax_core.transport import maps_errors, peer_common_name
from fedjax_proto import envoy_service_pb2 as env_pb
from fedjax_proto import envoy_service_pb2_grpc as env_grpc
from fedjax_proto import federation_service_pb2 as fed_pb
from fedjax_proto import federation_service_pb2_grpc as fed_grpc

log = logging.getLogger("fedjax.director")
BUNDLE_CHUNK = 1 << 20
MAX_LONG_POLL_S = 30.0


class _Refusals:
    """Logs each refused caller once (per certificate name, host and reason), so floods stay one line."""

    def __init__(self):
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def refuse(self, context: grpc.ServicerContext, name: str, error: PermissionDeniedError) -> NoReturn:
        host = context.peer().rsplit(":", 1)[0]
        key = (name, host, str(error))
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
        if first:
            log.warning("refused a call from %s (certificate %r): %s", context.peer(), name, error)
        raise error


_refusals = _Refusals()


def _check_envoy_identity(context: grpc.ServicerContext, envoy_name: str) -> None:
    """Under mTLS an envoy (and its worker) may act only under the name its certificate carries."""
    common_name = peer_common_name(context)
    if common_name is not None and common_name != envoy_name:
        _refusals.refuse(context, common_name, PermissionDeniedError(
            f"the client certificate is for {common_name!r}, not for envoy {envoy_name!r}: give each envoy "
            f"its own certificate (fedjax pki certify --name {envoy_name})"))


class EnvoyServicer(env_grpc.EnvoyServiceServicer):
    def __init__(self, director: Director):
        self.director = director

    @maps_errors
    def RegisterEnvoy(self, request, context):
        _check_envoy_identity(context, request.envoy_name)
        period = self.director.register_envoy(request.envoy_name, serde.shard_info_from_proto(request.shard_info),
                                              request.instance_id)
        return env_pb.RegisterEnvoyResponse(health_check_period_s=period)

    @maps_errors
    def Heartbeat(self, request, context):
        _check_envoy_identity(context, request.envoy_name)
        return env_pb.HeartbeatResponse(known=self.director.heartbeat(request.envoy_name, request.instance_id))

    @maps_errors
    def WaitExperiment(self, request, context):
        _check_envoy_identity(context, request.envoy_name)
        sent = None
        while context.is_active():
            name = self.director.wait_experiment(request.envoy_name, sent, timeout=MAX_LONG_POLL_S)
            if name is not None:
                sent = name
                yield env_pb.WaitExperimentResponse(experiment_name=name,
                                                    submitter=self.director.experiment_submitter(name))

    @maps_errors
    def GetExperimentBundle(self, request, context):
        _check_envoy_identity(context, request.envoy_name)
        path = self.director.experiment_bundle(request.envoy_name, request.experiment_name)
        size = path.stat().st_size
        with open(path, "rb") as f:
            while data := f.read(BUNDLE_CHUNK):
                yield env_pb.BundleChunk(data=data, total_size=size)

    @maps_errors
    def WaitTask(self, request, context):
        _check_envoy_identity(context, request.envoy_name)
        wait = min(max(request.max_wait_s, 0.0), MAX_LONG_POLL_S)
        return serde.task_to_proto(self.director.wait_task(request.envoy_name, request.experiment_name, wait))

    @maps_errors
    def GetRoundModel(self, request, context):
        _check_envoy_identity(context, request.envoy_name)
        for chunk in self.director.round_model(request.envoy_name, request.experiment_name, request.round):
            yield serde.chunk_to_proto(chunk)

    @maps_errors
    def ReportMetrics(self, request, context):
        _check_envoy_identity(context, request.envoy_name)
        self.director.report_metrics(request.envoy_name, request.experiment_name, request.round, request.stage,
                                     serde.metrics_from_proto(request.metrics), request.sample_count)
        return env_pb.ReportMetricsResponse()

    @maps_errors
    def UploadUpdate(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidRequestError("an update stream must start with its header")
        h = first.header
        _check_envoy_identity(context, h.envoy_name)

        def chunks() -> Iterator:
            for msg in request_iterator:
                if not msg.HasField("chunk"):
                    raise InvalidRequestError("only tensor chunks may follow the update header")
                yield serde.chunk_from_proto(msg.chunk)

        received = self.director.accept_update(h.envoy_name, h.experiment_name, h.round, h.train_sample_count, chunks())
        return env_pb.UploadUpdateResponse(bytes_received=received)

    @maps_errors
    def ReportFailure(self, request, context):
        _check_envoy_identity(context, request.envoy_name)
        self.director.report_failure(request.envoy_name, request.experiment_name, request.error,
                                     request.round if request.HasField("round") else None, request.worker_lost)
        return env_pb.ReportFailureResponse()

    @maps_errors
    def CheckIn(self, request, context):
        _check_envoy_identity(context, request.envoy_name)
        upload = self.director.check_in(request.envoy_name, request.experiment_name, request.round,
                                        request.divergence)
        return env_pb.CheckInResponse(upload=upload)


class FederationServicer(fed_grpc.FederationServiceServicer):
    def __init__(self, director: Director, submitters: frozenset[str] = frozenset({"api"})):
        self.director = director
        self.submitters = submitters

    def _check_submitter(self, context: grpc.ServicerContext) -> None:
        """Under mTLS only the certificates named in settings.submitters may use the notebook API."""
        common_name = peer_common_name(context)
        if common_name is not None and common_name not in self.submitters:
            _refusals.refuse(context, common_name, PermissionDeniedError(
                f"the client certificate {common_name!r} may not use the notebook API; this director allows "
                f"{', '.join(sorted(self.submitters))} (settings.submitters in its config)"))

    @maps_errors
    def GetDatasetInfo(self, request, context):
        self._check_submitter(context)
        sample, target = self.director.dataset_info()
        return fed_pb.GetDatasetInfoResponse(sample_shape=list(sample), target_shape=list(target))

    @maps_errors
    def GetShardRegistry(self, request, context):
        self._check_submitter(context)
        return fed_pb.GetShardRegistryResponse(
            envoys=[serde.envoy_entry_to_proto(e) for e in self.director.shard_registry()])

    @maps_errors
    def SubmitExperiment(self, request_iterator, context):
        self._check_submitter(context)
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidRequestError("an experiment submission must start with its header")
        header = serde.header_from_proto(first.header)
        common_name = peer_common_name(context)
        if common_name is not None:  # under mTLS the certificate names the submitter, not the client
            header = dataclasses.replace(header, submitter=common_name)
        pending: list = []

        def bundle() -> Iterator[bytes]:
            for msg in request_iterator:
                if msg.HasField("bundle_data"):
                    yield msg.bundle_data
                elif msg.HasField("chunk"):
                    pending.append(serde.chunk_from_proto(msg.chunk))
                    return
                else:
                    raise InvalidRequestError("a second header in one submission")

        def chunks() -> Iterator:
            yield from pending
            for msg in request_iterator:
                if not msg.HasField("chunk"):
                    raise InvalidRequestError("bundle data must come before the model's tensor chunks")
                yield serde.chunk_from_proto(msg.chunk)

        position = self.director.submit_experiment(header, bundle(), chunks())
        return fed_pb.SubmitExperimentResponse(queue_position=position)

    @maps_errors
    def ListExperiments(self, request, context):
        self._check_submitter(context)
        return fed_pb.ListExperimentsResponse(
            experiments=[serde.status_to_proto(s) for s in self.director.experiments()])

    @maps_errors
    def GetExperimentStatus(self, request, context):
        self._check_submitter(context)
        return serde.status_to_proto(self.director.experiment_status(request.name))

    @maps_errors
    def StreamMetrics(self, request, context):
        self._check_submitter(context)
        for event in self.director.stream_events(request.experiment_name, context.is_active):
            yield serde.metric_event_to_proto(event)

    @maps_errors
    def CancelExperiment(self, request, context):
        self._check_submitter(context)
        return serde.status_to_proto(self.director.cancel_experiment(request.name, by=peer_common_name(context)))

    @maps_errors
    def GetModel(self, request, context):
        self._check_submitter(context)
        for chunk in self.director.model_chunks(request.experiment_name, request.which,
                                                by=peer_common_name(context)):
            yield serde.chunk_to_proto(chunk)
