"""Director server factory and the long-running ``fedjax director start`` entry point."""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc

from fedjax_core.config import DirectorConfig, resolve_path
from fedjax_core.director.budget import StreamBudget, stream_limit
from fedjax_core.director.core import Director
from fedjax_core.director.memory import limit_arenas
from fedjax_core.director.servicer import EnvoyServicer, FederationServicer, RoleGate
from fedjax_core.sinks import factories_from_config
from fedjax_core.transport import SERVER_OPTIONS, TLSFiles, server_credentials
from fedjax_proto import envoy_service_pb2_grpc as env_grpc
from fedjax_proto import federation_service_pb2_grpc as fed_grpc

log = logging.getLogger("fedjax.director")


def create_server(director: Director, host: str, port: int, tls: TLSFiles | None, max_workers: int = 128,
                  stream_idle_s: float = 120.0,
                  submitters: frozenset[str] = frozenset({"api"}),
                  allowed_envoys: frozenset[str] | None = None) -> tuple[grpc.Server, int]:
    """A started-ready gRPC server for ``director``; returns ``(server, bound_port)`` (port 0 picks one).

    With ``tls``, every call passes ``RoleGate`` (certificate roles, ``allowed_envoys``) first.
    """
    interceptors = [RoleGate(allowed_envoys)] if tls else []
    interceptors.append(StreamBudget(stream_limit(max_workers), stream_idle_s))  # after the role check
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="director"),
                         options=SERVER_OPTIONS, interceptors=interceptors)
    env_grpc.add_EnvoyServiceServicer_to_server(EnvoyServicer(director), server)
    fed_grpc.add_FederationServiceServicer_to_server(FederationServicer(director, submitters), server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, server_credentials(tls)) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}: the port is taken or the host is not local "
                      "(change settings.listen_host / settings.listen_port)")
    return server, bound


def _describe_sink(spec, log_dir: Path) -> str:
    if spec.type == "tensorboard":
        return f"TensorBoard logs in {spec.log_dir or log_dir}"
    if spec.type == "mlflow":
        return f"MLflow at {spec.tracking_uri or 'its default tracking URI'} (experiment {spec.experiment_name!r})"
    return f"W&B project {spec.project!r} ({spec.mode})"


def run_director(config: DirectorConfig, tls: TLSFiles | None, config_dir: Path) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully. Relative paths resolve against ``config_dir``."""
    s = config.settings
    limit_arenas()
    log_dir = resolve_path(s.log_dir, config_dir)
    sinks = factories_from_config(s.metric_sinks, log_dir, config_dir)  # a missing package: ConfigError, before serving
    director = Director(state_dir=resolve_path(s.state_dir, config_dir), log_dir=log_dir,
                        sample_shape=s.sample_shape, target_shape=s.target_shape,
                        health_check_period=s.envoy_health_check_period, max_model_bytes=s.max_model_bytes,
                        admins=s.admins, envoy_timeout_s=s.envoy_timeout_s, keep_experiments=s.keep_experiments,
                        metric_sinks=sinks)
    allowed_envoys = None if s.allowed_envoys is None else frozenset(s.allowed_envoys)
    if allowed_envoys is not None and tls is None:
        log.warning("settings.allowed_envoys applies to certificate names under mTLS; with TLS disabled any "
                    "envoy may register")
    server, port = create_server(director, s.listen_host, s.listen_port, tls, s.max_workers, s.stream_idle_s,
                                 frozenset(s.submitters),
                                 allowed_envoys)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    log.info("director listening on %s:%d (%s); state in %s; metric sinks: %s",
             s.listen_host, port, "mTLS" if tls else "plaintext, TLS disabled", director.state_dir,
             ", ".join(_describe_sink(m, log_dir) for m in s.metric_sinks) or "none (metrics stay in the database)")
    print(f"DIRECTOR READY {s.listen_host}:{port}", flush=True)
    stop.wait()
    log.info("director stopping")
    director.wake_all()  # long-polls and streams return now instead of at their timeout
    server.stop(grace=2).wait()
    director.close()
