"""Who calls the director: the caller's identity from its client certificate, the role each service admits under
mTLS (``RoleGate``, every call), and refusals logged and audited once per caller and reason."""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import NoReturn

import grpc

from fedjax_core import pki
from fedjax_core.director.audit import AuditTrail
from fedjax_core.director.gates import WrappedHandlers, guarded_handler
from fedjax_core.errors import PermissionDeniedError
from fedjax_core.transport import peer_common_name
from fedjax_proto import envoy_service_pb2 as env_pb
from fedjax_proto import federation_service_pb2 as fed_pb

log = logging.getLogger("fedjax.director")


class Refusals:
    """Logs and audits each refused caller once per certificate name, host and reason, so that a caller retrying
    stays one line; the audit trail also rate-limits each caller (AuditTrail.refused), so that one varying its
    requests cannot flood it."""

    MAX_REMEMBERED = 10_000  # (name, host, reason) keys remembered; past it the memory starts afresh

    def __init__(self, audit: AuditTrail | None = None):
        self.audit = audit
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def refuse(self, peer: str, name: str, error: PermissionDeniedError) -> NoReturn:
        key = (name, peer.rsplit(":", 1)[0], str(error))
        with self._lock:
            first = key not in self._seen
            if first and len(self._seen) >= self.MAX_REMEMBERED:
                self._seen.clear()
            self._seen.add(key)
        if first:
            log.warning("refused a call from %s (certificate %r): %s", peer, name, error)
            if self.audit is not None:
                self.audit.refused(name, peer, reason=str(error))
        raise error


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who made a call, read once from its context (an asyncio context belongs to the event loop's thread)."""
    peer: str
    common_name: str | None  # of the client certificate under mTLS; None in plaintext
    role: str | None = None  # the certificate's role (pki.ROLES)

    @classmethod
    def of(cls, context) -> "Caller":
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        return cls(context.peer(), peer_common_name(context), _identity(pem).role if pem else None)

    @property
    def viewer(self) -> str | None:
        """Whose experiments the caller sees: its own (its certificate's name); None (all) for an admin
        certificate or in plaintext, where there are no identities."""
        return None if self.role == pki.ADMIN else self.common_name


# Under mTLS, the role a caller's certificate needs for each service (pki module docstring).
SERVICE_ROLES = {env_pb.DESCRIPTOR.services_by_name["EnvoyService"].full_name: pki.ENVOY,
                 fed_pb.DESCRIPTOR.services_by_name["FederationService"].full_name: pki.API}
_WHO_CALLS = {pki.ENVOY: "envoys and their workers", pki.API: "notebooks and admins"}


@functools.lru_cache(maxsize=1024)
def _identity(pem: bytes) -> pki.Identity:
    try:
        return pki.identity(pem)
    except ValueError:  # not a certificate we can read: no identity
        return pki.Identity(None, None)


def check_role(context: grpc.ServicerContext, method: str, allowed_envoys: frozenset[str] | None,
               refusals: Refusals) -> None:
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
    elif who.role != needs and not (needs == pki.API and who.role == pki.ADMIN):  # an admin uses the notebook API
        error = (f"the client certificate {who.name!r} has role {who.role}, but {call} needs role {needs} (only "
                 f"{_WHO_CALLS[needs]} call the {service.rsplit('.', 1)[-1]}): use an {needs} certificate, made "
                 f"with `{pki.fix_command(needs, 'api' if needs == pki.API else 'ENVOY_NAME')}`")
    elif needs == pki.ENVOY and allowed_envoys is not None and who.name not in allowed_envoys:
        error = (f"envoy {who.name!r} is not in this director's settings.allowed_envoys "
                 f"({', '.join(sorted(allowed_envoys)) or 'empty'}): add {who.name} there and restart the director")
    else:
        return
    refusals.refuse(context.peer(), who.name or "", PermissionDeniedError(error))


class RoleGate(grpc.aio.ServerInterceptor):
    """Runs ``check_role`` before every RPC of a TLS server, new RPCs included; refusals end PERMISSION_DENIED.
    Wraps plain, coroutine and async generator handlers alike, keeping their kind."""

    def __init__(self, allowed_envoys: frozenset[str] | None = None, refusals: Refusals | None = None):
        self.allowed_envoys = allowed_envoys
        self.refusals = refusals or Refusals()
        self._handlers = WrappedHandlers(self._guarded)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._handlers.of(handler, handler_call_details.method)

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        def refusal(request, context) -> tuple[grpc.StatusCode, str] | None:
            try:
                check_role(context, method, self.allowed_envoys, self.refusals)
            except PermissionDeniedError as exc:
                return grpc.StatusCode.PERMISSION_DENIED, str(exc)
            return None

        return guarded_handler(handler, refusal)


def check_envoy_identity(caller: Caller, envoy_name: str, refusals: Refusals) -> None:
    """Under mTLS an envoy (and its worker) may act only under the name its certificate carries."""
    if caller.common_name is not None and caller.common_name != envoy_name:
        refusals.refuse(caller.peer, caller.common_name, PermissionDeniedError(
            f"the client certificate is for {caller.common_name!r}, not for envoy {envoy_name!r}: give each envoy "
            f"its own certificate ({pki.fix_command(pki.ENVOY, envoy_name)})"))
