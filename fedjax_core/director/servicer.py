"""Thin gRPC servicers: translate protos to records, call the Director, translate back."""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Iterator
from typing import NoReturn

import grpc

from fedjax_core import pki, serde
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
# Under mTLS, the role a caller's certificate needs for each service (pki module docstring).
SERVICE_ROLES = {env_pb.DESCRIPTOR.services_by_name["EnvoyService"].full_name: pki.ENVOY,
                 fed_pb.DESCRIPTOR.services_by_name["FederationService"].full_name: pki.API}
_WHO_CALLS = {pki.ENVOY: "envoys and their workers", pki.API: "notebooks"}


@functools.lru_cache(maxsize=1024)
def _identity(pem: bytes) -> pki.Identity:
    try:
        return pki.identity(pem)
    except ValueError:  # not a certificate we can read: no identity
        return pki.Identity(None, None)


def check_role(context: grpc.ServicerContext, method: str, allowed_envoys: frozenset[str] | None) -> None:
    """Under mTLS, the one gate every RPC passes (see ``RoleGate``): the client certificate must carry
    a usable name and the role that ``method``'s service needs (``SERVICE_ROLES``), and an envoy must
    be in ``allowed_envoys`` when that is set. Refusals raise PermissionDeniedError, logged once."""
    service, _, rpc = method.strip("/").partition("/")
    call, needs = f"{service.rsplit('.', 1)[-1]}.{rpc}", SERVICE_ROLES.get(service)
    pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
    who = _identity(pem) if pem else pki.Identity(None, None)
    if needs is None:
        error = f"{call} is not a fedjax service"
    elif who.name is None:
        error = (f"the client certificate carries no usable name (one common name of letters, digits, '.', '_' "
                 f"or '-'), so {call} is refused: issue one with `{pki.fix_command(needs)}`")
    elif who.role is None:
        error = (f"the client certificate {who.name!r} carries no role (issued before roles, or by hand), but "
                 f"{call} needs role {needs}: issue it again with `{pki.fix_command(needs, who.name)}`")
    elif who.role != needs:
        error = (f"the client certificate {who.name!r} has role {who.role}, but {call} needs role {needs} (only "
                 f"{_WHO_CALLS[needs]} call the {service.rsplit('.', 1)[-1]}): use an {needs} certificate, made "
                 f"with `{pki.fix_command(needs, 'api' if needs == pki.API else 'ENVOY_NAME')}`")
    elif needs == pki.ENVOY and allowed_envoys is not None and who.name not in allowed_envoys:
        error = (f"envoy {who.name!r} is not in this director's settings.allowed_envoys "
                 f"({', '.join(sorted(allowed_envoys)) or 'empty'}): add {who.name} there and restart the director")
    else:
        return
    _refusals.refuse(context, who.name or "", PermissionDeniedError(error))


class RoleGate(grpc.ServerInterceptor):
    """Runs ``check_role`` before every RPC of a TLS server, new RPCs included; refusals end PERMISSION_DENIED."""

    def __init__(self, allowed_envoys: frozenset[str] | None = None):
        self.allowed_envoys = allowed_envoys

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def gate(behavior):
            def guarded(request, context):
                try:
                    check_role(context, method, self.allowed_envoys)
                except PermissionDeniedError as exc:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
                return behavior(request, context)
            return guarded

        factory, behavior = {
            (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
            (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
            (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
            (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
        }[(handler.request_streaming, handler.response_streaming)]
        return factory(gate(behavior), request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


def _check_envoy_identity(context: grpc.ServicerContext, envoy_name: str) -> None:
    """Under mTLS an envoy (and its worker) may act only under the name its certificate carries."""
    common_name = peer_common_name(context)
    if common_name is not None and common_name != envoy_name:
        _refusals.refuse(context, common_name, PermissionDeniedError(
            f"the client certificate is for {common_name!r}, not for envoy {envoy_name!r}: give each envoy "
            f"its own certificate ({pki.fix_command(pki.ENVOY, envoy_name)})"))


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
        context.add_callback(self.director.wake)  # an envoy that goes away frees its thread at once
        sent = None
        while context.is_active():
            name = self.director.wait_experiment(request.envoy_name, sent, timeout=MAX_LONG_POLL_S,
                                                 is_active=context.is_active)
            if name is not None:
                sent = name
                yield env_pb.WaitExperimentResponse(experiment_name=name,
                                                    submitter=self.director.experiment_submitter(name),
                                                    bundle_sha256=self.director.experiment_bundle_sha256(name))

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
        if math.isnan(request.max_wait_s):  # min/max pass NaN through, and a NaN timeout never expires
            raise InvalidRequestError(f"max_wait_s is NaN; give the seconds to wait (0 to {MAX_LONG_POLL_S:g})")
        wait = min(max(request.max_wait_s, 0.0), MAX_LONG_POLL_S)
        context.add_callback(self.director.wake)  # a worker that goes away frees its thread at once
        return serde.task_to_proto(self.director.wait_task(request.envoy_name, request.experiment_name, wait,
                                                           context.is_active))

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
                                     request.round if request.HasField("round") else None, request.worker_lost,
                                     request.refused)
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
        context.add_callback(self.director.wake)  # a notebook that goes away frees its thread at once
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
