"""The notebook side of the FederationService: typed calls over records, errors mapped once.

``Federation`` and ``FLExperiment`` use this and never touch generated proto code.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping

import grpc
import numpy as np

from fedjax_core import records as r
from fedjax_core import serde
from fedjax_core.director import paging
from fedjax_core.spec import ExperimentSpec
from fedjax_core.tensors import assemble, iter_chunks
from fedjax_core.transport import Backoff, TLSFiles, is_retryable, open_channel, raise_domain_error
from fedjax_proto import federation_service_pb2 as fed_pb
from fedjax_proto import federation_service_pb2_grpc as fed_grpc

BUNDLE_CHUNK = 1 << 20
LONG_CALL_S = 600.0


class DirectorUnreachable(ConnectionError):
    """The director did not answer; ``retryable`` when it may be restarting."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def diagnose_connection(details: str, tls: bool) -> str:
    """What a failed connection's details most likely mean, and what to do."""
    if not tls and "Socket closed" in details:
        return ("The director closed the connection at once: it most likely runs mTLS. Connect with "
                "Federation(..., tls=True, cert_chain=..., api_cert=..., api_private_key=...) using the federation's "
                "certificates (`fedjax pki certify --name api --role api`).")
    if tls and "WRONG_VERSION_NUMBER" in details:
        return ("The TLS handshake met a plaintext server: the director was started with --disable-tls. Connect "
                "with Federation(..., tls=False), or restart the director with TLS.")
    if tls and "unsupported certificate purpose" in details:
        return ("The server's certificate is not a director's (its role does not allow serving): something other "
                "than the director answers at this address, or the director was given an envoy or api "
                "certificate. Give the director one made with `fedjax pki certify --name HOST --role director`.")
    if tls and ("CERTIFICATE_VERIFY_FAILED" in details or "certificate verify failed" in details.lower()):
        return ("The director's certificate is not signed by cert_chain: use the root_ca.crt of the PKI that "
                "issued the director's certificate.")
    return ("Is it running? Check director_node_fqdn, director_port and that tls= matches how the director was "
            "started.")


def followed_events(client, name: str, timeout_s: float = math.inf, reconnect_s: float = 120.0,
                    on_retry: Callable[[DirectorUnreachable], None] = lambda exc: None,
                    sleep: Callable[[float], None] = time.sleep) -> Iterator[r.MetricEvent]:
    """Experiment ``name``'s events in order to its 'done' event, riding out a director restart of up to
    ``reconnect_s`` (``on_retry`` hears of each reconnection). The director replays every event from the start
    on each call, so after a reconnect the ones already seen are skipped. TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    seen, backoff, down_since = 0, Backoff(), None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"experiment {name!r} did not finish within {timeout_s}s")
        try:
            for index, event in enumerate(client.events(name, timeout_s=None if math.isinf(remaining) else remaining)):
                down_since = None
                if index >= seen:
                    seen += 1
                    yield event
            return
        except DirectorUnreachable as exc:
            down_since = down_since or time.monotonic()
            if not exc.retryable or time.monotonic() - down_since > reconnect_s:
                raise
            on_retry(exc)
            sleep(backoff.next_delay())


class FederationClient:
    def __init__(self, host: str, port: int, tls: TLSFiles | None, timeout_s: float = 10.0):
        self.address = f"{host}:{port}"
        self.tls = tls is not None
        self.timeout_s = timeout_s
        self._channel = open_channel(self.address, tls)
        self._stub = fed_grpc.FederationServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _error(self, exc: grpc.RpcError) -> DirectorUnreachable:
        raise_domain_error(exc)
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # busy: the director answered, and asks to wait
            return DirectorUnreachable(f"the director at {self.address} is busy ({exc.details()}); try again in "
                                       "a few seconds", retryable=True)
        return DirectorUnreachable(
            f"cannot reach the director at {self.address} ({exc.code().name}: {exc.details()}). "
            + diagnose_connection(exc.details() or "", self.tls), retryable=is_retryable(exc))

    def _unary(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def dataset_info(self) -> tuple[list[str], list[str]]:
        info = self._unary("GetDatasetInfo", fed_pb.GetDatasetInfoRequest())
        return list(info.sample_shape), list(info.target_shape)

    def shard_registry(self) -> list[r.EnvoyEntry]:
        """Every registered envoy, by name (the director answers in pages)."""
        return [serde.envoy_entry_from_proto(e)
                for e in self._pages("GetShardRegistry", fed_pb.GetShardRegistryRequest, "envoys")]

    def experiments(self) -> list[r.ExperimentStatus]:
        """Every experiment this client may see, in submission order, without each round's participants."""
        return [serde.status_from_proto(s)
                for s in self._pages("ListExperiments", fed_pb.ListExperimentsRequest, "experiments")]

    def _pages(self, method: str, request: type, field: str) -> Iterator:
        token = ""
        while True:
            reply = self._unary(method, request(page_size=paging.MAX_PAGE_ROWS, page_token=token))
            yield from getattr(reply, field)
            token = reply.next_page_token
            if not token:
                return

    def status(self, name: str) -> r.ExperimentStatus:
        return serde.status_from_proto(self._unary("GetExperimentStatus", fed_pb.GetExperimentStatusRequest(name=name)))

    def cancel(self, name: str) -> r.ExperimentStatus:
        return serde.status_from_proto(self._unary("CancelExperiment", fed_pb.CancelExperimentRequest(name=name)))

    def submit(self, spec: ExperimentSpec, bundle: bytes, tensors: Mapping[str, np.ndarray]) -> int:
        """Stream spec, code bundle and initial model; returns the queue position (0: running now)."""
        def requests():
            yield fed_pb.SubmitExperimentRequest(spec=serde.experiment_spec_to_proto(spec))
            for offset in range(0, len(bundle), BUNDLE_CHUNK):
                yield fed_pb.SubmitExperimentRequest(bundle_data=bundle[offset:offset + BUNDLE_CHUNK])
            for message in serde.chunk_protos(iter_chunks(tensors)):
                yield fed_pb.SubmitExperimentRequest(chunk=message)

        try:
            return self._stub.SubmitExperiment(requests(), timeout=LONG_CALL_S).queue_position
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def events(self, name: str, timeout_s: float | None = None, follow: bool = True,
               calls: list | None = None) -> Iterator[r.MetricEvent]:
        """Every event of experiment ``name`` from the start, then new ones, ending with a 'done' event; with
        ``follow=False`` only the events recorded so far. The gRPC call is appended to ``calls`` when given, so
        that another thread can ``cancel()`` it (the iteration then raises DirectorUnreachable)."""
        request = fed_pb.StreamMetricsRequest(experiment_name=name, snapshot=not follow)
        received = False
        try:
            call = self._stub.StreamMetricBatches(request, timeout=timeout_s)
            if calls is not None:
                calls.append(call)
            for batch in call:
                received = True
                for msg in batch.events:
                    yield serde.metric_event_from_proto(msg)
            return
        except grpc.RpcError as exc:
            if received or exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise self._error(exc) from None
        try:  # a director from before StreamMetricBatches: one message an event
            call = self._stub.StreamMetrics(request, timeout=timeout_s)
            if calls is not None:
                calls.append(call)
            for msg in call:
                yield serde.metric_event_from_proto(msg)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def audit(self, since: float = 0.0) -> Iterator[r.AuditEntry]:
        """The director's audit trail from ``since`` (Unix time), oldest first: all of it for an admin, else
        what this client did and what was done to its experiments."""
        after = 0
        while True:
            reply = self._unary("GetAuditLog", fed_pb.GetAuditLogRequest(since=since, after_id=after,
                                                                          page_size=paging.MAX_PAGE_ROWS))
            for message in reply.entries:
                yield serde.audit_entry_from_proto(message)
                after = message.id
            if not reply.more or not reply.entries:
                return

    def model(self, name: str, which: str) -> dict[str, np.ndarray]:
        request = fed_pb.GetModelRequest(experiment_name=name, which=which)
        try:
            return assemble(serde.chunk_stream(self._stub.GetModel(request, timeout=LONG_CALL_S)))
        except grpc.RpcError as exc:
            raise self._error(exc) from None
