"""Director server factory and the long-running ``fedjax director start`` entry point."""
from __future__ import annotations

import asyncio
import logging
import resource
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc

from fedjax_core.config import DirectorConfig, resolve_path
from fedjax_core.director.concurrency import Flow
from fedjax_core.director.core import Director
from fedjax_core.director.memory import tune_allocator, tune_gc
from fedjax_core.director.parsing import ParseGate
from fedjax_core.director.callers import Refusals, RoleGate
from fedjax_core.director.servicer import EnvoyServicer, FederationServicer
from fedjax_core.sinks import factories_from_config
from fedjax_core.transport import SERVER_OPTIONS, TLSFiles, server_credentials
from fedjax_proto import envoy_service_pb2_grpc as env_grpc
from fedjax_proto import federation_service_pb2_grpc as fed_grpc

log = logging.getLogger("fedjax.director")


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """The server's event loop (settings.event_loop): uvloop's, which spends less of the director's CPU on each
    call, when asked for or, with ``auto``, installed; else Python's own."""
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class DirectorServer:
    """The director's gRPC server: ``grpc.aio`` on an event loop of its own thread, so long-polls wait without
    threads (:mod:`fedjax_core.director.concurrency`); ``start``/``stop`` are called from any other thread."""

    def __init__(self, director: Director, host: str, port: int, tls: TLSFiles | None, max_workers: int = 32,
                 stream_idle_s: float = 120.0, submitters: frozenset[str] = frozenset({"api"}),
                 allowed_envoys: frozenset[str] | None = None, max_uploads: int = 4,
                 max_waiting_calls: int = 4096, event_loop: str = "auto"):
        self.director = director
        self._loop = new_event_loop(event_loop)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="director-grpc")
        self._thread.start()
        try:
            self.port = self._call(self._bind(host, port, tls, max_workers, stream_idle_s, submitters,
                                              allowed_envoys, max_uploads, max_waiting_calls))
        except BaseException:
            self._end_loop()
            raise

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _bind(self, host, port, tls, max_workers, stream_idle_s, submitters, allowed_envoys, max_uploads,
                    max_waiting_calls) -> int:
        self._short_pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="director")
        self.flow = Flow(self._loop, self._short_pool, max_uploads, stream_idle_s, max_waiting_calls)
        self.director.subscribe(self.flow.changes.notify)
        refusals = Refusals(self.director.audit)  # logged and audited once per (caller, host, reason)
        self._server = grpc.aio.server(migration_thread_pool=self._short_pool, options=SERVER_OPTIONS,
                                       interceptors=([RoleGate(allowed_envoys, refusals)] if tls else [])
                                       + [ParseGate()])
        env_grpc.add_EnvoyServiceServicer_to_server(EnvoyServicer(self.director, self.flow, refusals), self._server)
        fed_grpc.add_FederationServiceServicer_to_server(
            FederationServicer(self.director, self.flow, submitters, refusals), self._server)
        address = f"{host}:{port}"
        try:
            bound = (self._server.add_secure_port(address, server_credentials(tls)) if tls
                     else self._server.add_insecure_port(address))
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise OSError(f"cannot listen on {address}: the port is taken or the host is not local "
                          "(change settings.listen_host / settings.listen_port)")
        return bound

    def start(self) -> None:
        self._call(self._server.start())

    def stop(self, grace: float | None = 2.0) -> None:
        """End long-polls now, give other calls ``grace`` seconds, then stop the loop and the pools."""
        self.director.wake_all()
        try:
            self._call(self._server.stop(grace))
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if getattr(self, "flow", None) is not None:
            self.flow.close()
            self._short_pool.shutdown(wait=False, cancel_futures=True)


def create_server(director: Director, host: str, port: int, tls: TLSFiles | None, **settings) -> tuple[DirectorServer, int]:
    """A ready-to-start server for ``director``; returns ``(server, bound_port)`` (port 0 picks one).

    With ``tls``, every call passes ``RoleGate`` (certificate roles, ``allowed_envoys``) first.
    """
    server = DirectorServer(director, host, port, tls, **settings)
    return server, server.port


def _describe_sink(spec, log_dir: Path) -> str:
    if spec.type == "tensorboard":
        return f"TensorBoard logs in {spec.log_dir or log_dir}"
    if spec.type == "mlflow":
        return f"MLflow at {spec.tracking_uri or 'its default tracking URI'} (experiment {spec.experiment_name!r})"
    return f"W&B project {spec.project!r} ({spec.mode})"


def raise_open_files_limit(cap: int = 1 << 20) -> int:
    """Raise the soft limit on open files to the hard one (at most ``cap``): every connection is a file
    descriptor, and a low soft limit (often 1,024) lets idle connections exhaust the director. Returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, wanted, exc)
    log.info("open files: up to %d at once (soft limit; hard limit %s)", soft,
             "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return soft


def run_director(config: DirectorConfig, tls: TLSFiles | None, config_dir: Path) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully. Relative paths resolve against ``config_dir``."""
    s = config.settings
    tune_allocator()
    raise_open_files_limit()
    log_dir = resolve_path(s.log_dir, config_dir)
    sinks = factories_from_config(s.metric_sinks, log_dir, config_dir)  # a missing package: ConfigError, before serving
    director = Director(state_dir=resolve_path(s.state_dir, config_dir), log_dir=log_dir,
                        sample_shape=s.sample_shape, target_shape=s.target_shape,
                        health_check_period=s.envoy_health_check_period, max_model_bytes=s.max_model_bytes,
                        admins=s.admins, envoy_timeout_s=s.envoy_timeout_s, keep_experiments=s.keep_experiments,
                        metric_sinks=sinks,
                        audit_log=resolve_path(s.audit_log, config_dir) if s.audit_log else None)
    allowed_envoys = None if s.allowed_envoys is None else frozenset(s.allowed_envoys)
    if allowed_envoys is not None and tls is None:
        log.warning("settings.allowed_envoys applies to certificate names under mTLS; with TLS disabled any "
                    "envoy may register")
    server, port = create_server(director, s.listen_host, s.listen_port, tls, max_workers=s.max_workers,
                                 stream_idle_s=s.stream_idle_s, submitters=frozenset(s.submitters),
                                 allowed_envoys=allowed_envoys, max_uploads=s.max_uploads,
                                 max_waiting_calls=s.max_waiting_calls, event_loop=s.event_loop)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    tune_gc()
    log.info("director listening on %s:%d (%s, %s event loop); state in %s; metric sinks: %s",
             s.listen_host, port, "mTLS" if tls else "plaintext, TLS disabled", type(server.loop).__module__.split(".")[0],
             director.state_dir,
             ", ".join(_describe_sink(m, log_dir) for m in s.metric_sinks) or "none (metrics stay in the database)")
    print(f"DIRECTOR READY {s.listen_host}:{port}", flush=True)
    stop.wait()
    log.info("director stopping")
    server.stop(grace=2)  # long-polls and streams return now instead of at their timeout
    director.close()
