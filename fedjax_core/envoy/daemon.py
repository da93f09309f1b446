"""The envoy daemon: registers its shard, stays in touch, and runs one worker per experiment.

It never imports JAX. Work arrives on one server-streaming call (no polling); when the
director is unreachable the daemon reconnects with capped exponential backoff.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc

from fedjax_core import records as r
from fedjax_core.config import EnvoyConfig, EnvoyParams, resolve_path
from fedjax_core.envoy.client import EnvoyClient
from fedjax_core.errors import FedError
from fedjax_core.shard_descriptor import ShardDescriptor, load_shard_descriptor
from fedjax_core.transport import Backoff, TLSFiles

log = logging.getLogger("fedjax.envoy")
MAX_WORKER_RESTARTS = 3


def worker_environment(params: EnvoyParams, base: dict[str, str], extra_path: Path) -> dict[str, str]:
    """The worker's environment: device choice and JAX/TF memory settings, before JAX starts."""
    env = dict(base)
    if params.cuda_devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in params.cuda_devices)
        env.pop("JAX_PLATFORMS", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["JAX_PLATFORMS"] = "cpu"
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true" if params.jax_preallocate else "false"
    if params.jax_memory_fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{params.jax_memory_fraction:.3f}"
    else:
        env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"  # tensorflow-datasets must not grab the GPU beside JAX
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH", "")) if p)
    return env


def shard_info(shard: ShardDescriptor, params: EnvoyParams) -> r.ShardInfo:
    sizes = shard.split_sizes()
    devices = tuple(f"cuda:{d}" for d in params.cuda_devices) or ("cpu",)
    counts = shard.label_counts() if hasattr(shard, "label_counts") else ()
    return r.ShardInfo(description=shard.dataset_description, sample_shape=tuple(map(str, shard.sample_shape)),
                       target_shape=tuple(map(str, shard.target_shape)), train_size=int(sizes["train"]),
                       valid_size=int(sizes["valid"]), hostname=socket.gethostname(), devices=devices,
                       label_counts=tuple(int(n) for n in counts))


class EnvoyDaemon:
    def __init__(self, name: str, config: EnvoyConfig, config_dir: Path, host: str, port: int,
                 tls: TLSFiles | None):
        self.name, self.config, self.config_dir = name, config, config_dir.resolve()
        self.host, self.port, self.tls = host, port, tls
        self.stop = threading.Event()
        self.work_dir = resolve_path(config.params.work_dir, self.config_dir) / name
        self.shard = load_shard_descriptor(config.shard_descriptor.template, config.shard_descriptor.params,
                                           self.config_dir)
        self.info = shard_info(self.shard, config.params)
        self.client = EnvoyClient(name, host, port, tls, stop=self.stop)
        self._worker: subprocess.Popen | None = None
        self._worker_experiment: str | None = None
        self._worker_lock = threading.Lock()
        self._restarts: dict[str, int] = {}  # experiment -> workers started again after one died
        self._registered = threading.Event()
        self._stream = None
        self.period = 5.0

    def run(self) -> None:
        """Serve until ``stop`` is set: register, listen for experiments, reconnect on failure."""
        log.info("envoy %s: %s; %d train / %d valid samples", self.name, self.info.description,
                 self.info.train_size, self.info.valid_size)
        if self.info.label_counts:
            log.info("envoy %s: training records per label: %s", self.name,
                     ", ".join(f"{label}: {n}" for label, n in enumerate(self.info.label_counts)))
        heartbeats = threading.Thread(target=self._heartbeats, daemon=True, name="heartbeat")
        heartbeats.start()
        try:
            self._serve()
        finally:
            self.shutdown()  # whatever ended the loop, no worker outlives its daemon

    def _serve(self) -> None:
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                self.period = self.client.register(self.info, retry_s=0)
                self._registered.set()
                backoff.reset()
                log.info("envoy %s registered with the director at %s:%d", self.name, self.host, self.port)
                print(f"ENVOY READY {self.name}", flush=True)
                self._stream = self.client.experiments()
                if self.stop.is_set():  # a stop request raced with the (re)connection
                    self._stream.cancel()
                for experiment, submitter in self._stream:
                    if not self._consents(experiment, submitter):
                        continue
                    try:
                        self._start_experiment(experiment)
                    except FedError as exc:  # e.g. the experiment ended before this envoy got to it
                        log.warning("envoy %s: cannot start experiment %r: %s", self.name, experiment, exc)
            except grpc.RpcError as exc:
                self._registered.clear()
                if self.stop.is_set():
                    break
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.CANCELLED):
                    raise RuntimeError(f"director refused envoy {self.name!r}: {exc.details()}") from None
                delay = backoff.next_delay()
                why = exc.code().name
                if "unsupported certificate purpose" in (exc.details() or ""):
                    why += ", the server's certificate is not of role director"
                log.warning("envoy %s: director at %s:%d unreachable (%s); retrying in %.1fs",
                            self.name, self.host, self.port, why, delay)
                self.stop.wait(delay)

    def _heartbeats(self) -> None:
        while not self.stop.is_set():
            if not self._registered.wait(timeout=self.period) or self.stop.wait(self.period):
                continue
            try:
                if not self.client.heartbeat():
                    self.client.register(self.info, retry_s=0)
            except grpc.RpcError as exc:
                log.debug("heartbeat failed: %s", exc.code().name)

    def _consents(self, experiment: str, submitter: str) -> bool:
        """Whether this envoy runs code from ``submitter`` (settings.accept_from); a refusal is reported."""
        accept_from = self.config.settings.accept_from
        if accept_from is None or submitter in accept_from:
            return True
        reason = (f"refused experiment {experiment!r}: its submitter {submitter!r} is not in this envoy's "
                  f"settings.accept_from ({', '.join(accept_from) or 'nobody'})")
        log.warning("envoy %s %s", self.name, reason)
        try:
            self.client.report_failure(experiment, reason)
        except grpc.RpcError as exc:  # the experiment may have ended meanwhile
            log.warning("envoy %s: could not report the refusal: %s", self.name, exc.details())
        return False

    def _start_experiment(self, experiment: str) -> None:
        with self._worker_lock:
            if self._worker is not None and self._worker.poll() is None:
                if self._worker_experiment == experiment:
                    return  # pushed again after a reconnect; the worker carries on
                # the director has moved on to another experiment: the old one is over for this envoy
                log.warning("envoy %s: stopping the worker of %r for %r", self.name, self._worker_experiment, experiment)
                _stop_process(self._worker)
            exp_dir = self.work_dir / experiment
            exp_dir.mkdir(parents=True, exist_ok=True)
            bundle_path = exp_dir / "bundle.bin"
            self.client.download_bundle(experiment, bundle_path)
            spec = {
                "envoy_name": self.name, "experiment": experiment, "bundle_path": str(bundle_path),
                "director_host": self.host, "director_port": self.port,
                "tls": [str(p) for p in (self.tls.root_certificate, self.tls.certificate, self.tls.private_key)]
                if self.tls else None,
                "shard_template": self.config.shard_descriptor.template,
                "shard_params": self.config.shard_descriptor.params, "shard_base_dir": str(self.config_dir),
                "parent_pid": os.getpid(),
            }
            spec_path = exp_dir / "worker.json"
            spec_path.write_text(json.dumps(spec))
            env = worker_environment(self.config.params, dict(os.environ), self.config_dir)
            log.info("envoy %s: starting worker for experiment %r", self.name, experiment)
            self._worker = subprocess.Popen([sys.executable, "-m", "fedjax_core.envoy.worker", str(spec_path)], env=env)
            self._worker_experiment = experiment
            threading.Thread(target=self._reap, args=(self._worker, experiment), daemon=True).start()

    def _reap(self, worker: subprocess.Popen, experiment: str) -> None:
        """Wait for a worker; if it died without a word, tell the director (a dropout from the round in
        progress) and start a new one for the next rounds, at most MAX_WORKER_RESTARTS times."""
        code = worker.wait()
        log.info("envoy %s: worker for %r exited with code %d", self.name, experiment, code)
        if code == 0 or self.stop.is_set():
            return
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        restarts = self._restarts.get(experiment, 0)
        last_chance = restarts >= MAX_WORKER_RESTARTS
        try:
            self.client.report_failure(
                experiment, f"the worker process {how} (see the envoy's log)"
                + (f"; it died {restarts + 1} times, so this envoy gives up" if last_chance else ""),
                worker_lost=not last_chance)
        except grpc.RpcError:
            return  # already reported by the worker itself, or the experiment is over
        if not last_chance:
            self._restarts[experiment] = restarts + 1
            log.warning("envoy %s: starting a new worker for %r (restart %d of %d)", self.name, experiment,
                        restarts + 1, MAX_WORKER_RESTARTS)
            try:
                self._start_experiment(experiment)
            except (FedError, ConnectionError) as exc:  # the experiment ended meanwhile
                log.warning("envoy %s: no new worker for %r: %s", self.name, experiment, exc)

    def request_stop(self) -> None:
        """Safe from a signal handler: ends the experiment stream so ``run`` returns."""
        self.stop.set()
        if self._stream is not None:
            self._stream.cancel()

    def shutdown(self) -> None:
        self.stop.set()
        with self._worker_lock:
            if self._worker is not None and self._worker.poll() is None:
                _stop_process(self._worker)
        self.client.close()


def _stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
