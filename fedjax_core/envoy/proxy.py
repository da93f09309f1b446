"""The daemon's local proxy for its worker: the worker never holds the envoy's private key.

The daemon serves the EnvoyService calls a worker needs (the list below) on a Unix domain
socket in a private folder (0700, owned by the worker's account). Each call is checked (this
envoy's name, the experiment its worker runs) and forwarded, as raw bytes, over the daemon's
own mTLS channel to the director; streams are forwarded message by message, never buffered.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from fedjax_core.envoy.client import TOKEN_KEY
from fedjax_proto import envoy_service_pb2 as env_pb

log = logging.getLogger("fedjax.envoy")
SERVICE = "fedjax.EnvoyService"
# What a worker calls; registration, the experiment stream and the bundle stay with the daemon.
WORKER_METHODS = ("WaitTask", "GetRoundModel", "ReportMetrics", "UploadUpdate", "UploadSmallUpdate", "ReportFailure",
                  "CheckIn", "SecAgg")
_MAX_UNIX_PATH = 100  # sun_path holds 108 bytes


class WorkerProxy:
    def __init__(self, envoy_name: str, channel: grpc.Channel, socket_dir: Path, owner: tuple[int, int] | None = None):
        self.envoy_name = envoy_name
        self._tokens: dict[str, str] = {}  # each running worker's token (its spec holds it) -> its experiment
        self._channel = channel
        # a work dir too deep for a socket address (sun_path): a private folder under the temp dir instead
        self._temporary = len(str(socket_dir / "envoy.sock")) > _MAX_UNIX_PATH
        self.socket_dir = Path(tempfile.mkdtemp(prefix="fedjax-envoy-")) if self._temporary else socket_dir
        self.socket = self.socket_dir / "envoy.sock"
        self._owner = owner
        self._server: grpc.Server | None = None

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    def start(self) -> WorkerProxy:
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.socket_dir, 0o700)
        self.socket.unlink(missing_ok=True)
        server = grpc.server(ThreadPoolExecutor(max_workers=16, thread_name_prefix="worker-proxy"))
        methods = {m.name: m for m in env_pb.DESCRIPTOR.services_by_name["EnvoyService"].methods}
        handlers = {name: self._handler(name, methods[name]) for name in WORKER_METHODS}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if not server.add_insecure_port(self.target):
            raise OSError(f"cannot listen on {self.socket}")
        server.start()
        if self._owner is not None:  # the worker's account must reach the socket, and nobody else
            for path in (self.socket_dir, self.socket):
                os.chown(path, *self._owner)
        self._server = server
        log.info("envoy %s: worker proxy on %s", self.envoy_name, self.target)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait()
            self._server = None
        self.socket.unlink(missing_ok=True)
        if self._temporary:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def admit(self, experiment: str) -> str:
        """A new token for the worker of ``experiment``: its calls, for that experiment only, get through."""
        token = secrets.token_hex(16)
        self._tokens[token] = experiment
        return token

    def revoke(self, token: str) -> None:
        """That worker is gone: a process it left behind holds a token that no longer opens anything."""
        self._tokens.pop(token, None)

    def _experiment_of(self, given: str) -> str | None:
        found = None
        for token, experiment in list(self._tokens.items()):  # compared in constant time, each of them
            if hmac.compare_digest(given.encode(), token.encode()):
                found = experiment
        return found

    # ---------------------------------------------------------------- checks
    def _check(self, method: str, request, context: grpc.ServicerContext) -> None:
        """Only a running worker (its token), under this envoy's name and for its own experiment, gets through:
        a process an earlier experiment left behind holds a revoked token."""
        experiment = self._experiment_of(str(dict(context.invocation_metadata()).get(TOKEN_KEY, "")))
        if experiment is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "the envoy's worker proxy forwards the calls of this envoy's current workers only")
        target = request.header if method in ("UploadUpdate", "UploadSmallUpdate") else request
        if target.envoy_name != self.envoy_name or target.experiment_name != experiment:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the envoy's worker proxy forwards calls of envoy {self.envoy_name!r} for its worker's "
                          f"experiment only, not of {target.envoy_name!r} for {target.experiment_name!r}")
        if method == "ReportFailure" and request.refused:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "only the envoy daemon may refuse an experiment")

    def _parse(self, request_type, data: bytes, context: grpc.ServicerContext):
        message = request_type()
        try:
            message.ParseFromString(data)
        except Exception:  # noqa: BLE001  (any decode error)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request does not decode")
        return message

    # ------------------------------------------------------------- handlers
    def _handler(self, name: str, method) -> grpc.RpcMethodHandler:
        path = f"/{SERVICE}/{name}"
        request_type = getattr(env_pb, method.input_type.name)

        def timeout(context: grpc.ServicerContext) -> float | None:
            return context.time_remaining()

        def abort(context: grpc.ServicerContext, exc: grpc.RpcError):
            context.abort(exc.code(), exc.details() or "")

        def result(future, context: grpc.ServicerContext) -> bytes:
            try:
                return future.result()
            except grpc.FutureCancelledError:  # the worker went away (or the daemon stops)
                context.abort(grpc.StatusCode.CANCELLED, "the worker's call was cancelled")
            except grpc.RpcError as exc:
                abort(context, exc)

        if method.client_streaming:  # UploadUpdate: the header first, then chunks as they come
            forward_stream = self._channel.stream_unary(path)

            def stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
                first = next(requests, None)
                if first is None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an update stream must start with its header")
                self._check(name, self._parse(request_type, first, context), context)

                def upstream() -> Iterator[bytes]:
                    yield first
                    yield from requests

                future = forward_stream.future(upstream(), timeout=timeout(context))
                context.add_callback(future.cancel)
                return result(future, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary)

        if method.server_streaming:  # GetRoundModel: chunks forwarded one by one
            forward_many = self._channel.unary_stream(path)

            def unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                self._check(name, self._parse(request_type, request, context), context)
                call = forward_many(request, timeout=timeout(context))
                context.add_callback(call.cancel)
                try:
                    yield from call
                except grpc.RpcError as exc:
                    abort(context, exc)

            return grpc.unary_stream_rpc_method_handler(unary_stream)

        forward_one = self._channel.unary_unary(path)

        def unary_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._check(name, self._parse(request_type, request, context), context)
            future = forward_one.future(request, timeout=timeout(context))
            context.add_callback(future.cancel)
            return result(future, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary)
