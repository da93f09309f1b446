"""The envoy daemon: registers its shard, stays in touch, and runs one worker per experiment.

It never imports JAX and never unpickles anything. Work arrives on one server-streaming call
(no polling); when the director is unreachable the daemon reconnects with capped exponential
backoff. For each experiment it checks consent (settings.accept_from), downloads the bundle and
checks its sha256 against the director's record, holds it for the operator under
``settings.review: manual`` (see review.py), and starts a worker that gets what it needs and no
more: a sandbox (sandbox.py) with a folder of its own (workdir.py), a spec without key paths, a
scrubbed environment (WORKER_ENV_NAMES/PREFIXES), the director only through the daemon's local
proxy under TLS (proxy.py), and optionally another account (settings.worker_user). Any refusal
reaches the director as a dropout from the experiment.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc

from fedjax_core import bundle as bundle_io
from fedjax_core import records as r
from fedjax_core.config import ConfigError, EnvoyConfig, EnvoyParams, resolve_path, worker_account
from fedjax_core.envoy import landlock, sandbox
from fedjax_core.envoy.client import EnvoyClient
from fedjax_core.envoy.launch import Launched, LauncherClosed, WorkerLauncher, kill_group, stop_process
from fedjax_core.envoy.proxy import WorkerProxy
from fedjax_core.envoy import audit as envoy_audit
from fedjax_core.envoy.audit import EnvoyAudit
from fedjax_core.envoy.review import CHECK_S, ReviewDesk, describe
from fedjax_core.envoy.workdir import WorkDir
from fedjax_core.envoy.worker_env import worker_environment
from fedjax_core.errors import FedError
from fedjax_core.shard_descriptor import ShardDescriptor, checked_description, load_shard_descriptor
from fedjax_core.transport import Backoff, TLSFiles, is_retryable

log = logging.getLogger("fedjax.envoy")
MAX_WORKER_RESTARTS = 3
# A restarted daemon finds its name held by its silent predecessor until the director lets it go
# (2.5 heartbeat periods: 12.5 s at the default period); it keeps trying for settings.name_held_wait_s
# before it concludes that another live daemon has the name, and exits saying so.


def shard_info(shard: ShardDescriptor, params: EnvoyParams) -> r.ShardInfo:
    """What this envoy registers; ValueError, naming the descriptor's method, for a value it cannot be."""
    devices = (tuple(f"cuda:{d}" for d in params.cuda_devices)
               or tuple(f"cpu:{i}" for i in range(params.cpu_devices or 0)) or ("cpu",))
    return r.ShardInfo(**checked_description(shard), hostname=socket.gethostname(), devices=devices,
                       max_experiments=params.max_experiments)


@dataclasses.dataclass(frozen=True)
class Worker:
    """A running worker: its process and launch, and the token its proxy calls carry (None in plaintext)."""
    launched: Launched
    token: str | None

    @property
    def process(self) -> subprocess.Popen:
        return self.launched.process


class EnvoyDaemon:
    def __init__(self, name: str, config: EnvoyConfig, config_dir: Path, host: str, port: int,
                 tls: TLSFiles | None, config_path: Path | None = None):
        self.name, self.config, self.config_dir = name, config, config_dir.resolve()
        self.host, self.port, self.tls = host, port, tls
        self.stop = threading.Event()
        self.work_dir = resolve_path(config.params.work_dir, self.config_dir) / name
        self.account = worker_account(config.settings)  # (uid, gid, home) of settings.worker_user, or None
        self.workdir = WorkDir(self.work_dir, self.account, policy=None)  # its policy once the proxy is known
        self.cache_dir = compilation_cache_dir(config, self.workdir)
        self.policy = sandbox_policy(config, self.config_dir, config_path, tls, self.work_dir, self.cache_dir)
        self.shard = load_shard_descriptor(config.shard_descriptor.template, config.shard_descriptor.params,
                                           self.config_dir)
        self.info = shard_info(self.shard, config.params)
        self.client = EnvoyClient(name, f"{host}:{port}", tls, stop=self.stop)
        self.desk = ReviewDesk(self.workdir.review) if config.settings.review == "manual" else None
        self.audit = EnvoyAudit(self.work_dir / envoy_audit.FILE)
        self._consented: dict[str, dict] = {}  # experiment -> its submitter and checked bundle sha256
        # Under TLS the worker reaches the director only through this proxy, so it never holds the key;
        # in plaintext (loopback only) there is no key to keep and the worker connects directly.
        self.proxy = WorkerProxy(name, self.client.channel, self.workdir.proxy,
                                 self.account[:2] if self.account else None) if tls is not None else None
        if self.proxy is not None and self.policy is not None:  # the one socket its sandbox leaves in reach
            self.policy = dataclasses.replace(self.policy, keep_socket=str(self.proxy.socket))
        self.workdir.policy = self.policy
        user = {"user": self.account[0], "group": self.account[1], "extra_groups": []} if self.account else {}
        self.launcher = WorkerLauncher(worker_environment(config.params, dict(os.environ), self.config_dir,
                                                          home=self.account[2] if self.account else None),
                                       user, standby=config.params.standby_worker, workdir=self.workdir)
        self.max_experiments = config.params.max_experiments
        self._workers: dict[str, Worker] = {}  # experiment -> its worker, in the order they started
        self._worker_lock = threading.Lock()
        self._restarts: dict[str, int] = {}  # experiment -> workers started again after one died
        self._registered = threading.Event()
        self._stream = None
        self._review_wake = threading.Event()  # set when an experiment is held for review
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
        sandbox.make_undumpable()  # processes of this account, workers included, cannot read our memory
        self.workdir.open()
        self._log_sandbox()
        if self.cache_dir is not None:
            self.workdir.private_dir(self.cache_dir.parent)
            self.workdir.private_dir(self.cache_dir)
            log.info("envoy %s: compiled programs are kept across experiments in %s (params.jax_compilation_cache)",
                     self.name, self.cache_dir.parent)
        self.launcher.prepare()
        if self.proxy is not None:
            self.proxy.start()
        if self.desk is not None:
            self.desk.open()
            log.info("envoy %s: settings.review is manual: experiments wait for `fedjax envoy review` (%s)",
                     self.name, self.desk.root)
            threading.Thread(target=self._watch_reviews, daemon=True, name="review").start()
        try:
            self._serve()
        finally:
            self.shutdown()  # whatever ended the loop, no worker outlives its daemon

    def _serve(self) -> None:
        backoff = Backoff()
        name_held_since = None
        while not self.stop.is_set():
            try:
                self.period = self.client.register(self.info, retry_s=0)
                self._registered.set()
                backoff.reset()
                name_held_since = None
                log.info("envoy %s registered with the director at %s:%d", self.name, self.host, self.port)
                print(f"ENVOY READY {self.name}", flush=True)
                self._stream = self.client.experiments()
                if self.stop.is_set():  # a stop request raced with the (re)connection
                    self._stream.cancel()
                for experiment, submitter, sha256, running in self._stream:
                    try:
                        self._stop_ended(running)
                        self._receive(experiment, submitter, sha256)
                    except (FedError, ConnectionError, LauncherClosed) as exc:  # e.g. it ended before we got to it
                        log.warning("envoy %s: cannot start experiment %r: %s", self.name, experiment, exc)
            except grpc.RpcError as exc:
                self._registered.clear()
                if self.stop.is_set():
                    break
                delay = backoff.next_delay()
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                    name_held_since = name_held_since or time.monotonic()
                    if time.monotonic() - name_held_since < self.config.settings.name_held_wait_s:
                        log.warning("envoy %s: %s; retrying in %.1fs (a restarted envoy waits for its old daemon "
                                    "to fall silent)", self.name, exc.details(), delay)
                        self.stop.wait(delay)
                        continue
                if not is_retryable(exc) and exc.code() != grpc.StatusCode.CANCELLED:
                    raise RuntimeError(f"director refused envoy {self.name!r}: {exc.details()}") from None
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

    def _log_sandbox(self) -> None:
        if self.policy is None:
            log.warning("envoy %s: workers run WITHOUT a sandbox (settings.sandbox.experiment_code_may_read_envoy_"
                        "secrets: true): experiment code can read this envoy's key, config and other experiments' "
                        "files", self.name)
            return
        log.info("envoy %s: workers run in a sandbox (Landlock ABI %d): they read Python, its packages, the shard "
                 "descriptor and its data%s, and write only their own folder under %s", self.name, self.policy.abi,
                 " and settings.sandbox paths" if self.config.settings.sandbox.read_paths
                 or self.config.settings.sandbox.write_paths else "", self.workdir.runs)
        for gap in landlock.missing_rights(self.policy.abi):
            log.warning("envoy %s: on this kernel the sandbox is weaker: %s", self.name, gap)

    def _receive(self, experiment: str, submitter: str, sha256: str) -> None:
        """A pushed experiment: consent, bundle check, review, then a worker; any refusal is reported."""
        accept_from = self.config.settings.accept_from
        if accept_from is not None and submitter not in accept_from:
            self._refuse(experiment, f"its submitter {submitter!r} is not in this envoy's settings.accept_from "
                                     f"({', '.join(accept_from) or 'nobody'})", submitter=submitter)
            return
        with self._worker_lock:
            if self._running(experiment):
                return  # pushed again after a reconnect; the worker carries on
        if self.desk is not None and self.max_experiments == 1:  # one at a time: a new one means the last is over
            for gone in self.desk.forget_all_but(experiment):
                self.workdir.discard_bundle(gone)
                log.info("envoy %s: experiment %r is no longer pending review: the director moved on", self.name, gone)
        try:
            bundle_path = self.workdir.bundle(experiment)
        except ValueError as exc:
            self._refuse(experiment, str(exc))
            return
        digest = self.client.download_bundle(experiment, bundle_path)
        if not sha256:
            log.warning("envoy %s: the director recorded no sha256 for %r (submitted before it kept one)",
                        self.name, experiment)
        elif digest != sha256:
            bundle_path.unlink(missing_ok=True)
            self._refuse(experiment, f"the downloaded bundle has sha256 {digest}, but the director recorded "
                                     f"{sha256} when it was submitted: it was altered on the way or on the "
                                     "director's disk, so this envoy does not run it")
            return
        self._consented[experiment] = {"submitter": submitter, "bundle_sha256": digest,
                                       "approved": "automatically" if self.desk is None else "in review"}
        if self.desk is not None:
            decision = self.desk.decision(experiment, digest)
            if decision is None:
                self._hold(experiment, submitter, digest, bundle_path)
                return
            if not decision["approve"]:
                self._refuse(experiment, _refused_in_review(decision))
                return
        self._start_worker(experiment)

    def _refuse(self, experiment: str, reason: str, submitter: str | None = None) -> None:
        """Tell the director this envoy refuses ``experiment``: it drops out of the experiment."""
        log.warning("envoy %s refused experiment %r: %s", self.name, experiment, reason)
        consented = self._consented.pop(experiment, {})
        self.audit.record("refuse", experiment, reason=reason, submitter=consented.get("submitter", submitter),
                          bundle_sha256=consented.get("bundle_sha256"))
        self.workdir.discard_bundle(experiment)
        try:
            self.client.report_failure(experiment, reason, refused=True)
        except grpc.RpcError as exc:  # the experiment may have ended meanwhile
            log.warning("envoy %s: could not report the refusal: %s", self.name, exc.details())

    def _hold(self, experiment: str, submitter: str, digest: str, bundle_path: Path) -> None:
        """settings.review manual: keep the experiment pending; only the bundle's JSON header is read."""
        assert self.desk is not None
        try:
            meta = bundle_io.read_meta(bundle_path)
        except (bundle_io.BundleError, ValueError, OSError) as exc:
            self._refuse(experiment, f"its bundle cannot be read for review: {exc}")
            return
        entry = {"experiment": experiment, "submitter": submitter, "sha256": digest,
                 "bundle_bytes": bundle_path.stat().st_size, "tasks": meta.get("tasks"),
                 "versions": meta.get("versions", {}),
                 "device_assignment_policy": meta.get("device_assignment_policy")}
        self.desk.hold(entry)
        log.warning("envoy %s holds %s\n  approve: fedjax envoy review -c CONFIG --approve %s (or --refuse %s "
                    "--reason TEXT)", self.name, describe(entry), experiment, experiment)
        self._review_wake.set()

    def _watch_reviews(self) -> None:
        """Apply the operator's decisions: checks every review.CHECK_S seconds while anything is pending
        (waiting on the stop event in between), and sleeps on an event while nothing is."""
        assert self.desk is not None
        while not self.stop.is_set():
            pending = self.desk.pending()
            if not pending:
                self._review_wake.clear()
                if not self.desk.pending():
                    self._review_wake.wait()
                continue
            for entry in pending:
                decision = self.desk.decision(entry["experiment"], entry["sha256"])
                if decision is not None:
                    self._apply(entry["experiment"], decision)
            self.stop.wait(review_check_s())

    def _apply(self, experiment: str, decision: dict) -> None:
        assert self.desk is not None
        self.desk.forget(experiment)
        if not decision["approve"]:
            self._refuse(experiment, _refused_in_review(decision))
            return
        log.info("envoy %s: experiment %r approved in review", self.name, experiment)
        try:
            self._start_worker(experiment)
        except (FedError, ConnectionError, OSError, LauncherClosed) as exc:
            log.warning("envoy %s: cannot start experiment %r: %s", self.name, experiment, exc)

    def _running(self, experiment: str) -> bool:
        """Under the worker lock: whether ``experiment``'s worker is alive."""
        worker = self._workers.get(experiment)
        return worker is not None and worker.process.poll() is None

    def _stop_ended(self, running: frozenset[str]) -> None:
        """The director pushed an experiment and named every one this envoy works for now: a worker of any
        other has outlived its experiment (it ended while the worker wound down) and stops. A director that
        names none (older than side-by-side experiments) runs one at a time: the last one is over."""
        with self._worker_lock:
            over = [name for name in self._workers if name not in running] if running else list(self._workers)
            for name in over:
                worker = self._workers.pop(name)  # popped first: its reaper neither reports nor restarts it
                if worker.process.poll() is None:
                    log.warning("envoy %s: the director has moved on from %r: stopping its worker", self.name, name)
                    stop_process(worker.process)
                self.workdir.discard_bundle(name)

    def _start_worker(self, experiment: str) -> None:
        """Start the worker of ``experiment``, whose bundle is downloaded and checked."""
        with self._worker_lock:
            if self._running(experiment):
                return  # pushed again after a reconnect; the worker carries on
            spec = {  # no key paths: under TLS the worker talks to the daemon's proxy, never to the director
                "envoy_name": self.name, "experiment": experiment,
                "director_target": self.proxy.target if self.proxy is not None else self.client.address,
                "shard_template": self.config.shard_descriptor.template,
                "shard_params": self.config.shard_descriptor.params, "shard_base_dir": str(self.config_dir),
            }
            if self.cache_dir is not None:  # the one accepted submitter's folder (config validation)
                spec["compilation_cache_dir"] = str(self.cache_dir)
            token = None
            if self.proxy is not None:  # this worker's calls only: a process an earlier one left has an old token
                spec["proxy_token"] = token = self.proxy.admit(experiment)
            try:
                launched = self.launcher.launch(lambda run: self.workdir.fill_run(run, experiment, spec))
            except BaseException:
                if token is not None:
                    self.proxy.revoke(token)
                raise
            log.info("envoy %s: starting worker for experiment %r (pid %d, %s; folder %s)", self.name, experiment,
                     launched.process.pid, "the standby" if launched.warm else "cold", launched.run)
            worker = self._workers[experiment] = Worker(launched, token)
            self.audit.record("run", experiment, pid=launched.process.pid, **self._consented.get(experiment, {}))
            threading.Thread(target=self._reap, args=(worker, experiment), daemon=True).start()
            if sum(self._running(name) for name in self._workers) < self.max_experiments:
                self.launcher.prepare()  # room for another experiment: its standby waits ready

    def _reap(self, worker: Worker, experiment: str) -> None:
        """Wait for a worker and clear its folder; if it died without a word, tell the director (a dropout
        from the round in progress) and start a new one for the next rounds, at most MAX_WORKER_RESTARTS
        times. The experiment's bundle goes once no worker of it will start again."""
        process = worker.process
        code = process.wait()
        kill_group(process)  # what it started goes with it
        log.info("envoy %s: worker for %r exited with code %d", self.name, experiment, code)
        self.audit.record("worker_exit", experiment, pid=process.pid, code=code)
        if code == 0:
            self._consented.pop(experiment, None)
        self.workdir.close_run(worker.launched.run)
        if worker.token is not None:
            self.proxy.revoke(worker.token)
        if self.stop.is_set():
            return
        with self._worker_lock:  # held, so a worker started meanwhile finds the standby ready
            replaced = self._workers.get(experiment) is not worker  # a restarted worker took over
            if self._workers.get(experiment) is worker:
                del self._workers[experiment]
            self.launcher.prepare()  # for the next experiment, or this one's restarted worker
        if replaced:
            return
        if code == 0:
            self.workdir.discard_bundle(experiment)
            return
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        restarts = self._restarts.get(experiment, 0)
        last_chance = restarts >= MAX_WORKER_RESTARTS
        if last_chance:
            self.workdir.discard_bundle(experiment)
        try:
            self.client.report_failure(
                experiment, f"the worker process {how} (see the envoy's log)"
                + (f"; it died {restarts + 1} times, so this envoy gives up" if last_chance else ""),
                worker_lost=not last_chance)
        except grpc.RpcError:
            self.workdir.discard_bundle(experiment)
            return  # already reported by the worker itself, or the experiment is over
        if not last_chance:
            self._restarts[experiment] = restarts + 1
            log.warning("envoy %s: starting a new worker for %r (restart %d of %d)", self.name, experiment,
                        restarts + 1, MAX_WORKER_RESTARTS)
            try:
                self._start_worker(experiment)
            except (FedError, ConnectionError, OSError, LauncherClosed) as exc:  # it ended, or we are stopping
                log.warning("envoy %s: no new worker for %r: %s", self.name, experiment, exc)

    def request_stop(self) -> None:
        """Safe from a signal handler: ends the experiment stream so ``run`` returns."""
        self.stop.set()
        self._review_wake.set()
        if self._stream is not None:
            self._stream.cancel()

    def shutdown(self) -> None:
        self.stop.set()
        self.launcher.close()
        with self._worker_lock:
            for worker in self._workers.values():
                if worker.process.poll() is None:
                    stop_process(worker.process)
        self._review_wake.set()
        if self.proxy is not None:
            self.proxy.stop()
        self.workdir.discard_bundles()  # a restarted daemon downloads them again when the director pushes
        self.client.close()


def sandbox_policy(config: EnvoyConfig, config_dir: Path, config_path: Path | None, tls: TLSFiles | None,
                   work_dir: Path, cache_dir: Path | None = None) -> sandbox.Policy | None:
    """The sandbox every worker of this envoy enters, or None where the operator opted out; ConfigError,
    before anything starts, where the kernel offers no sandbox and the operator did not opt out, or a
    settings.sandbox path does not exist."""
    settings = config.settings.sandbox
    extra = {}
    for key in ("read_paths", "write_paths"):
        extra[key] = [resolve_path(value, config_dir) for value in getattr(settings, key)]
        for i, path in enumerate(extra[key]):
            if not path.exists() or (key == "write_paths" and not path.is_dir()):
                raise ConfigError(f"settings.sandbox.{key}[{i}]: {path} is not an existing "
                                  f"{'folder' if key == 'write_paths' else 'file or folder'}; create it or "
                                  "remove the entry")
    if settings.experiment_code_may_read_envoy_secrets:
        return None
    try:
        abi = landlock.abi_version()
    except landlock.LandlockUnavailable as exc:
        raise ConfigError(
            f"settings.sandbox: this machine cannot sandbox experiment code: {exc}. Without a sandbox a submitted "
            "experiment could read this envoy's private key and config, the daemon's environment and other "
            "experiments' files. Run the envoy on Linux 5.13 or later with Landlock enabled (in a container: a "
            "seccomp profile that allows landlock_create_ruleset, landlock_add_rule and landlock_restrict_self), "
            "or accept that risk with settings.sandbox.experiment_code_may_read_envoy_secrets: true") from None
    denied = [work_dir.parent, *([config_path] if config_path else []),
              *([tls.root_certificate, tls.certificate, tls.private_key] if tls else [])]
    return sandbox.policy_for(abi=abi, config_dir=config_dir, denied=[Path(p) for p in denied],
                              shard_params=config.shard_descriptor.params, gpus=bool(config.params.cuda_devices),
                              read_paths=extra["read_paths"], write_paths=extra["write_paths"],
                              cache_dir=cache_dir)


def compilation_cache_dir(config: EnvoyConfig, workdir: WorkDir) -> Path | None:
    """The one accepted submitter's compilation cache folder, when params.jax_compilation_cache is on."""
    if not config.params.jax_compilation_cache:
        return None
    (submitter,) = set(config.settings.accept_from or ())  # validated with the config
    return workdir.cache_root / cache_folder(submitter)


def cache_folder(submitter: str) -> str:
    """A folder name for ``submitter``'s compilation cache: readable, and distinct for distinct names."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", submitter)[:64]
    return f"{readable}-{hashlib.sha256(submitter.encode()).hexdigest()[:12]}"


def review_check_s() -> float:
    """How often pending reviews are checked (FEDJAX_REVIEW_CHECK_S overrides review.CHECK_S)."""
    try:
        return float(os.environ.get("FEDJAX_REVIEW_CHECK_S", CHECK_S))
    except ValueError:
        return CHECK_S


def _refused_in_review(decision: dict) -> str:
    return "refused in review by the envoy's operator" + (f": {decision['reason']}" if decision.get("reason") else "")
