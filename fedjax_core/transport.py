"""gRPC plumbing shared by every party: channels, server credentials, retries, error codes.

mTLS by default: each party presents a certificate signed by the federation's root CA
(``fedjax pki``). Plaintext only when ``--disable-tls`` is given explicitly.
"""
from __future__ import annotations

import functools
import inspect
import ipaddress
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from fedjax_core.errors import (AlreadyExistsError, FedError, InvalidRequestError, NotFoundError,
                                PermissionDeniedError, PreconditionError, StorageError)

MAX_MESSAGE_BYTES = 8 << 20  # chunks are 1 MiB; nothing near gRPC's limits ever travels
SMALL_UPDATE_BYTES = 256 << 10  # an update with up to this many tensor bytes goes in one UploadSmallUpdate call
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]

_STATUS_OF = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    StorageError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_ERROR_OF = {code: cls for cls, code in _STATUS_OF.items()}


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one party: the federation's root CA, its own certificate and key."""

    root_certificate: Path
    certificate: Path
    private_key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        out = []
        for label, path in (("root certificate", self.root_certificate), ("certificate", self.certificate),
                            ("private key", self.private_key)):
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"TLS {label} not found: {path} (create one with `fedjax pki`, or pass --disable-tls)")
            out.append(Path(path).read_bytes())
        return out[0], out[1], out[2]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) reaches this machine only: 127.0.0.0/8, ::1, localhost."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    root, cert, key = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=root, require_client_auth=True)


def open_channel(target: str, tls: TLSFiles | None) -> grpc.Channel:
    """A channel to a gRPC target: ``host:port``, or ``unix:PATH`` (an envoy daemon's worker proxy)."""
    if tls is None:
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    root, cert, key = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)


def _code_of(exc: FedError) -> grpc.StatusCode:
    return next((code for cls, code in _STATUS_OF.items() if isinstance(exc, cls)), grpc.StatusCode.UNKNOWN)


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the client certificate (mTLS), or None on a plaintext connection."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode() if names else None


def maps_errors(method: Callable) -> Callable:
    """Servicer decorator: domain errors become distinct gRPC status codes with their message.

    Works on plain and generator methods (sync servers, and an asyncio server's thread pool) and on
    coroutine and async generator methods (an asyncio server's own)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def async_stream(self, request, context):
            try:
                async for response in method(self, request, context):
                    yield response
            except FedError as exc:
                await context.abort(_code_of(exc), str(exc))
        return async_stream

    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def coroutine(self, request, context):
            try:
                return await method(self, request, context)
            except FedError as exc:
                await context.abort(_code_of(exc), str(exc))
        return coroutine

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except FedError as exc:
                context.abort(_code_of(exc), str(exc))
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except FedError as exc:
            context.abort(_code_of(exc), str(exc))
    return unary


def raise_domain_error(exc: grpc.RpcError) -> None:
    """Client side: turn a status code back into the domain error it came from, if any (a busy director's
    RESOURCE_EXHAUSTED is not one: it is worth retrying, see ``is_retryable``)."""
    code = exc.code() if hasattr(exc, "code") else None
    cls = None if is_retryable(exc) else _ERROR_OF.get(code)
    if cls is not None:
        raise cls(exc.details()) from None


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
BUSY = "the director is busy"  # starts the details of a RESOURCE_EXHAUSTED that is worth retrying


def is_retryable(exc: grpc.RpcError) -> bool:
    """The director is unreachable, slow, or busy with other long calls: trying again may succeed."""
    code = exc.code() if hasattr(exc, "code") else None
    return code in RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED
                                 and (exc.details() or "").startswith(BUSY))
T = TypeVar("T")


class Backoff:
    """Exponential backoff with jitter, capped; used to reconnect, never to poll for work."""

    def __init__(self, initial: float = 0.2, maximum: float = 10.0):
        self.initial, self.maximum, self.delay = initial, maximum, initial

    def reset(self) -> None:
        self.delay = self.initial

    def next_delay(self) -> float:
        delay = self.delay * (0.5 + random.random() / 2)
        self.delay = min(self.delay * 2, self.maximum)
        return delay


def call_with_retry(fn: Callable[[], T], what: str, deadline_s: float, stop: Callable[[], bool] = lambda: False,
                    wait: Callable[[float], bool] | None = None) -> T:
    """Call ``fn`` until it succeeds or a non-retryable error or ``deadline_s`` comes.

    ``wait(seconds)`` should return True if the caller is stopping (an Event's wait fits).
    """
    backoff = Backoff()
    give_up = time.monotonic() + deadline_s
    while True:
        try:
            return fn()
        except grpc.RpcError as exc:
            if not is_retryable(exc) or time.monotonic() > give_up or stop():
                raise_domain_error(exc)
                raise ConnectionError(f"{what}: {exc.code().name}: {exc.details()}") from None
            delay = backoff.next_delay()
            if wait is not None:
                if wait(delay):
                    raise ConnectionError(f"{what}: stopped while retrying") from None
            else:
                time.sleep(delay)
