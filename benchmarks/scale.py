#!/usr/bin/env python
"""``make bench-scale``: many connected envoys on one machine, and the director's cost per envoy.

A real director (``python -m fedjax_core director start --disable-tls`` on loopback) and N
simulated envoys, spread as threads over a few child processes of this script, which never
import JAX. Each simulated envoy does what an envoy daemon and its worker do, through the
real EnvoyService and ``fedjax_core.envoy.client.EnvoyClient``: it registers a shard, sends a
heartbeat every health-check period, holds the WaitExperiment stream, and when an experiment
is pushed runs the worker's loop on a connection of its own (WaitTask, GetRoundModel,
ReportMetrics for the worker's three stages, UploadUpdate of exactly the tensors the task
names, as downloaded plus 1e-6); no data, no JAX, the code bundle is not fetched
(``--download-bundle`` fetches and discards it). The benchmark process submits one
experiment with a tiny flax model through the notebook API and follows it to its end.

Measured: round times; every heartbeat's latency and the gaps between heartbeats, while the
envoys connect, idle with all of them connected (``--idle-periods``), during the experiment,
and for a period and a second after it (so that a heartbeat missed during a short experiment
still shows as a late gap); the director's CPU, memory and threads per envoy, and who used the
machine's CPUs. Exits 1 if the rounds do not complete or any heartbeat failed, was answered
known=False or was late (a gap between two answers more than 1 s over the period).

    python benchmarks/scale.py              # 256 envoys in 8 processes, 5 rounds
    python benchmarks/scale.py --quick      # smoke run: 16 envoys, 2 processes, 2 rounds

Figures go to stdout and to ``bench-results/scale.json`` (``--out``). MiB = 2^20 bytes.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from fedjax_core import codecs
from fedjax_core import records as r
from fedjax_core.envoy import client as client_module
from fedjax_core.envoy.client import EnvoyClient
from fedjax_core.errors import FedError, PreconditionError
from fedjax_core.local import Process, free_port
from fedjax_core.tensors import is_float_dtype
from fedjax_core.transport import CHANNEL_OPTIONS, Backoff, is_retryable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import StatusSampler, machine_info, make_tasks, proc_status, table  # noqa: E402  (bench imports JAX only inside its functions)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FEDJAX = [sys.executable, "-m", "fedjax_core"]
MiB = 1 << 20
SAMPLE_SHAPE, TARGET_SHAPE = ("32", "32", "3"), ("1",)  # the tutorial director's shapes
N_TRAIN = N_VALID = 32  # what each simulated shard claims to hold
NUDGE = 1e-6  # what "training" adds to every float tensor
TRAIN_TASK, VALIDATE_TASK = "train", "validate"  # the notebook's task names (bench.make_tasks)
LATE_BY_S = 1.0  # a heartbeat gap longer than the period plus this is late
# One TCP connection per client, as separate envoy processes have: otherwise gRPC lets the
# channels of one process with the same target and arguments share a connection.
OWN_CONNECTION = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
PHASES = ("connect", "idle", "experiment", "after")


def envoy_name(i: int) -> str:
    return f"sim{i:04d}"


# ============================================================================ simulated envoys (child mode)
class Counts:
    """A thread-safe counter of what went wrong, by 'call: code'."""

    def __init__(self):
        self._lock = threading.Lock()
        self.items: collections.Counter = collections.Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.items[key] += n


_OWN_CHANNELS: set[int] = set()


def open_own_connection(target: str, tls) -> grpc.Channel:
    """``transport.open_channel`` for the simulated envoys (plaintext): a channel with a TCP connection
    of its own. Child processes put it in place of the one EnvoyClient uses."""
    if tls is not None:
        raise ValueError("the simulated envoys speak plaintext")
    channel = grpc.insecure_channel(target, options=OWN_CONNECTION)
    _OWN_CHANNELS.add(id(channel))
    return channel


class SimClient(EnvoyClient):
    """The real EnvoyClient (on a TCP connection of its own in a child process, see open_own_connection),
    counting the RPC errors that its retries hide."""

    def __init__(self, name: str, target: str, stop: threading.Event, errors: Counts):
        super().__init__(name, target, None, stop=stop)
        self.own_connection = id(self.channel) in _OWN_CHANNELS
        self._errors = errors

    def _retry(self, fn, what: str):
        def counted():
            try:
                return fn()
            except grpc.RpcError as exc:
                self._errors.add(f"{what}: {exc.code().name}")
                raise
        return super()._retry(counted, what)


class Board:
    """One child's notice board: prints ALL FINISHED once every envoy's worker saw an experiment end."""

    def __init__(self, n_envoys: int):
        self.n_envoys = n_envoys
        self._lock = threading.Lock()
        self._finished: dict[str, set[str]] = {}

    def finished(self, experiment: str, envoy: str) -> None:
        with self._lock:
            done = self._finished.setdefault(experiment, set())
            done.add(envoy)
            if len(done) == self.n_envoys:
                print(f"ALL FINISHED {experiment} {len(done)}", flush=True)


class SimEnvoy:
    """What an envoy daemon does (daemon.EnvoyDaemon's loop, less the subprocess): register, beat,
    hold the experiment stream, and start a SimWorker for each experiment pushed."""

    def __init__(self, name: str, target: str, stop: threading.Event, board: Board, bundle_dir: Path | None):
        self.name, self.target, self.stop, self.board, self.bundle_dir = name, target, stop, board, bundle_dir
        self.errors = Counts()
        self.client = SimClient(name, target, stop, self.errors)
        self.info = r.ShardInfo(description=f"simulated envoy {name}: no data, no JAX", sample_shape=SAMPLE_SHAPE,
                                target_shape=TARGET_SHAPE, train_size=N_TRAIN, valid_size=N_VALID,
                                hostname=socket.gethostname(), devices=("cpu",))
        self.period = 5.0
        self.registered = threading.Event()
        self.connected = threading.Event()  # registered and the experiment stream opened, once
        self.registrations = self.stream_opens = 0
        # (wall-clock start, latency s, "ok"/"unknown"/code, how late this process started it: GIL, CPU)
        self.heartbeats: list[tuple[float, float, str, float]] = []
        self.workers: dict[str, SimWorker] = {}
        self._stream = None
        self._threads = [threading.Thread(target=self._serve, daemon=True, name=f"{name}-serve"),
                         threading.Thread(target=self._heartbeats, daemon=True, name=f"{name}-heartbeat")]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                self.period = self.client.register(self.info, retry_s=0)
            except grpc.RpcError as exc:
                if self.stop.is_set():
                    return
                self.errors.add(f"register: {exc.code().name}")
                if not is_retryable(exc) and exc.code() != grpc.StatusCode.CANCELLED:
                    self.errors.add("register: gave up")  # the daemon exits here: a refusal it cannot fix
                    return
                self.stop.wait(backoff.next_delay())
                continue
            self.registrations += 1
            self.registered.set()
            backoff.reset()  # as the daemon does after each registration
            try:
                self._stream = self.client.experiments()
                self.stream_opens += 1
                if self.stop.is_set():
                    self._stream.cancel()
                self.connected.set()
                for experiment, _submitter, sha256, _running in self._stream:
                    self._receive(experiment, sha256)
            except grpc.RpcError as exc:
                self.registered.clear()
                if self.stop.is_set():
                    return
                self.errors.add(f"experiment stream: {exc.code().name}")
                if not is_retryable(exc) and exc.code() != grpc.StatusCode.CANCELLED:
                    self.errors.add("experiment stream: gave up")
                    return
                self.stop.wait(backoff.next_delay())

    def _receive(self, experiment: str, sha256: str) -> None:
        worker = self.workers.get(experiment)
        if worker is not None and worker.thread.is_alive():
            return  # pushed again after a reconnect; the worker carries on
        if self.bundle_dir is not None:
            path = self.bundle_dir / f"{self.name}.bin"
            try:
                digest = self.client.download_bundle(experiment, path)
            except (FedError, ConnectionError) as exc:
                self.errors.add(f"download the experiment bundle: {type(exc).__name__}")
                return
            finally:
                path.unlink(missing_ok=True)
            if sha256 and digest != sha256:
                self.errors.add("download the experiment bundle: sha256 mismatch")
                return
        worker = SimWorker(self, experiment)
        self.workers[experiment] = worker
        worker.thread.start()

    def _heartbeats(self) -> None:
        while not self.stop.is_set():
            if not self.registered.wait(timeout=self.period):
                continue
            due = time.time() + self.period
            if self.stop.wait(self.period):
                continue
            started, t0 = time.time(), time.perf_counter()
            try:
                status = "ok" if self.client.heartbeat() else "unknown"
            except grpc.RpcError as exc:
                status = exc.code().name
            self.heartbeats.append((started, time.perf_counter() - t0, status, max(0.0, started - due)))
            if status == "unknown":  # as the daemon does: register again
                try:
                    self.client.register(self.info, retry_s=0)
                    self.registrations += 1
                except grpc.RpcError as exc:
                    self.errors.add(f"register after known=False: {exc.code().name}")

    def shutdown(self) -> None:
        """After ``stop`` is set: end the stream, let an in-flight heartbeat finish, then close."""
        if self._stream is not None:
            self._stream.cancel()
        self._threads[1].join(timeout=15)  # the heartbeat thread: at most one call in flight
        for worker in self.workers.values():
            worker.client.close()  # a worker still long-polling (the experiment did not end) gives up
            worker.thread.join(timeout=5)
        self.client.close()
        self._threads[0].join(timeout=5)

    def stats(self) -> dict:
        return {"name": self.name, "period_s": self.period, "registrations": self.registrations,
                "own_connection": self.client.own_connection,
                "stream_opens": self.stream_opens, "heartbeats": self.heartbeats, "errors": dict(self.errors.items),
                "workers": {name: w.stats() for name, w in self.workers.items()}}


class SimWorker:
    """What the worker process does (worker._Rounds), on its own connection, with numpy for training."""

    def __init__(self, envoy: SimEnvoy, experiment: str):
        self.envoy, self.experiment = envoy, experiment
        self.client = SimClient(envoy.name, envoy.target, envoy.stop, envoy.errors)
        self.global_tensors: dict[str, np.ndarray] | None = None
        self.local: dict[str, np.ndarray] | None = None
        self.trained: list[int] = []
        self.validated: list[int] = []
        self.uploads = 0
        self.went_on_without: list[int] = []
        self.failures: list[str] = []
        self.finished = False
        self.doing, self.since = "starting", time.time()  # the call in progress: shows where a hung run hangs
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"{envoy.name}-worker")

    def _call(self, doing: str, fn, *args):
        self.doing, self.since = doing, time.time()
        result = fn(*args)
        self.doing, self.since = "", time.time()
        return result

    def _run(self) -> None:
        in_a_row = 0
        try:
            while not self.envoy.stop.is_set():
                task = self._call("WaitTask", self.client.wait_task, self.experiment)
                if task.kind == r.TaskKind.FINISHED:
                    self.finished = True
                    self.envoy.board.finished(self.experiment, self.envoy.name)
                    return
                if task.kind == r.TaskKind.NONE:
                    continue
                try:
                    self._round(task)
                    in_a_row = 0
                except PreconditionError:  # the round closed at its deadline without us, or moved on
                    self.went_on_without.append(task.round)
                except Exception as exc:  # never reported (ReportFailure): counted, and the benchmark fails
                    if self.envoy.stop.is_set():
                        return  # this child is stopping: its channels are closing
                    self.failures.append(f"round {task.round}: {type(exc).__name__}: {exc}")
                    in_a_row += 1
                    if in_a_row >= 3:
                        return
        except Exception as exc:  # wait_task gave up: the director is gone, or this child is stopping
            if not self.envoy.stop.is_set():
                self.failures.append(f"wait for a task: {type(exc).__name__}: {exc}")

    def _round(self, task: r.Task) -> None:
        exp, rnd, client = self.experiment, task.round, self.client
        if task.kind == r.TaskKind.SYNC:  # dynamic averaging was triggered after this envoy checked in
            self._upload(task, self.local)
            return
        if task.from_global or self.global_tensors is None:
            self.global_tensors = self._call(f"GetRoundModel {rnd}", client.round_model, exp, rnd)
            state = self.global_tensors
            self._call(f"ReportMetrics {rnd} {r.Stage.AGGREGATED}", client.report_metrics, exp, rnd, r.Stage.AGGREGATED,
                       {VALIDATE_TASK: {"accuracy": 0.1 + 0.01 * rnd}}, N_VALID)
        else:  # periodic or dynamic averaging: keep training this envoy's own model
            state = self.local
        if task.kind == r.TaskKind.VALIDATE:
            self.validated.append(rnd)
            return
        state = {name: nudge(array) for name, array in state.items()}
        self._call(f"ReportMetrics {rnd} {r.Stage.TRAIN}", client.report_metrics, exp, rnd, r.Stage.TRAIN,
                   {TRAIN_TASK: {"loss": 2.3 - 0.01 * rnd}}, N_TRAIN)
        self._call(f"ReportMetrics {rnd} {r.Stage.LOCAL}", client.report_metrics, exp, rnd, r.Stage.LOCAL,
                   {VALIDATE_TASK: {"accuracy": 0.1 + 0.01 * rnd}}, N_VALID)
        self.local = state
        self.trained.append(rnd)
        if task.check_in and not self._call(f"CheckIn {rnd}", client.check_in, exp, rnd, self._divergence(task, state)):
            return
        self._upload(task, state)

    def _upload(self, task: r.Task, tensors: dict[str, np.ndarray]) -> None:
        """Exactly the tensors the task asks for, as worker._upload sends them."""
        missing = [n for n in task.upload_tensors if n not in tensors]
        if missing:
            raise RuntimeError(f"the task asks for tensors the downloaded model lacks: {missing[:3]}")
        wire, encodings = codecs.encode_update(tensors, task.upload_tensors, task.compression or None,
                                               self.global_tensors if task.send_deltas else None)
        self._call(f"UploadUpdate {task.round}", self.client.upload, self.experiment, task.round, N_TRAIN, wire,
                   encodings)
        self.uploads += 1

    def _divergence(self, task: r.Task, tensors: dict[str, np.ndarray]) -> float:
        return codecs.divergence(tensors, self.global_tensors, task.upload_tensors)

    def stats(self) -> dict:
        return {"finished": self.finished, "trained": self.trained, "validated": self.validated,
                "uploads": self.uploads, "went_on_without": self.went_on_without, "failures": self.failures,
                "own_connection": self.client.own_connection,
                "doing": self.doing, "doing_for_s": time.time() - self.since if self.doing else 0.0}


def nudge(array: np.ndarray) -> np.ndarray:
    """'Training': float tensors move by NUDGE, in their own dtype and shape; integer ones stay."""
    if not is_float_dtype(array.dtype):
        return array
    return (array + np.asarray(NUDGE, dtype=array.dtype)).astype(array.dtype, copy=False)


def child_main(args: argparse.Namespace) -> int:
    """One child process: ``--count`` simulated envoys as threads, until SIGTERM; then its figures as JSON."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    client_module.open_channel = open_own_connection  # this process only runs simulated envoys
    names = [envoy_name(i) for i in range(args.first, args.first + args.count)]
    board = Board(len(names))
    bundle_dir = Path(tempfile.mkdtemp(prefix="fedjax-scale-bundles-")) if args.download_bundle else None
    envoys = [SimEnvoy(name, args.target, stop, board, bundle_dir) for name in names]
    for envoy in envoys:
        envoy.start()
    deadline = time.monotonic() + args.ready_timeout
    while not stop.is_set():
        ready = sum(e.connected.is_set() for e in envoys)
        if ready == len(envoys):
            print(f"CHILD READY {ready}", flush=True)
            break
        if time.monotonic() > deadline:
            errors = collections.Counter()
            for e in envoys:
                errors.update(e.errors.items)
            print(f"CHILD NOT READY {ready}/{len(envoys)} connected after {args.ready_timeout:g} s; errors: "
                  f"{dict(errors) or 'none'}", flush=True)
            break
        stop.wait(0.1)
    while not stop.wait(0.5):
        if os.getppid() != parent:  # the benchmark died without stopping us
            stop.set()
    for envoy in envoys:
        envoy.shutdown()
    stats = {"pid": os.getpid(), "jax_imported": "jax" in sys.modules, "envoys": [e.stats() for e in envoys]}
    Path(args.stats).write_text(json.dumps(stats))
    if bundle_dir is not None:
        shutil.rmtree(bundle_dir, ignore_errors=True)
    print("CHILD STOPPED", flush=True)
    return 0


# ============================================================================ the notebook's experiment
def make_state():
    """A CustomTrainState of a tiny MLP (8 -> 32 -> 10, about 2.4 KiB of float32) with plain SGD."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen as nn

    from fedjax_core import CustomTrainState

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))

    model = Tiny()
    params = model.init(jax.random.PRNGKey(0), jnp.ones([1, 8]))["params"]
    state = CustomTrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.01), opt_vars=[])
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state.params))
    return state, int(nbytes)


def run_experiment(fed, name: str, state, rounds: int, envoys: list[str], out: dict) -> None:
    """Submit and follow the experiment to its end (in a thread: the caller gives up at --timeout)."""
    from fedjax_core import DataInterface, FLExperiment, ModelInterface

    try:
        exp = FLExperiment(federation=fed, experiment_name=name)
        out["experiment"] = exp
        t0 = time.perf_counter()
        exp.start(model_provider=ModelInterface(model=state), task_keeper=make_tasks(), data_loader=DataInterface(),
                  rounds_to_train=rounds, opt_treatment="RESET", device_assignment_policy="CPU_ONLY", envoys=envoys)
        out["submit_s"] = time.perf_counter() - t0
        exp.stream_metrics(progress=False, tensorboard_logs=False, live_table=False)
        out["wall_s"] = time.perf_counter() - t0
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"


# ============================================================================ the director process
def cpu_seconds(pid: int) -> float:
    """utime + stime of /proc/<pid>/stat, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15 of stat(5)


def cpu_snapshot(director_pid: int, children: list[Process]) -> dict[str, float]:
    """CPU seconds so far of the director, the simulating children, this process (the notebook), and the
    whole machine (busy and total, all CPUs, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    envoys = 0.0
    for child in children:
        try:
            envoys += cpu_seconds(child.proc.pid)
        except OSError:  # it died: the run fails elsewhere
            pass
    return {"director": cpu_seconds(director_pid), "envoys": envoys, "benchmark": cpu_seconds(os.getpid()),
            "machine_busy": (sum(fields) - fields[3] - fields[4]) / tick, "machine_total": sum(fields) / tick}


def cpu_shares(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Who used the machine's CPUs between two snapshots: seconds of CPU, and the machine's busy share."""
    spent = {k: after[k] - before[k] for k in before}
    total = spent.pop("machine_total")
    out = {f"{k}_cpu_s": v for k, v in spent.items()}
    out["other_cpu_s"] = max(0.0, spent["machine_busy"] - spent["director"] - spent["envoys"] - spent["benchmark"])
    out["machine_busy_pct"] = 100.0 * spent["machine_busy"] / total if total > 0 else float("nan")
    return out


# ============================================================================ figures
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 100)) - 1))]


def heartbeat_figures(envoys: list[dict], marks: dict[str, float], period: float) -> dict:
    """Per phase and in all: count, failures, known=False, latency percentiles, gaps and late gaps.

    A gap runs from one successful heartbeat's answer to the next one's, and belongs to the phase
    in which the later heartbeat was sent."""
    bounds = [("connect", marks["children_started"], marks["connected"]),
              ("idle", marks["connected"], marks["experiment_start"]),
              ("experiment", marks["experiment_start"], marks["experiment_end"]),
              ("after", marks["experiment_end"], float("inf"))]

    def phase_of(t: float) -> str:
        return next((name for name, t0, t1 in bounds if t0 <= t < t1), "connect")

    rows: dict[str, dict] = {name: {"latencies": [], "gaps": [], "delays": [], "failed": 0, "unknown": 0,
                                    "failures": {}, "envoys": set()} for name in PHASES}
    for envoy in envoys:
        last_ok = None
        for started, latency, status, delay in envoy["heartbeats"]:
            row = rows[phase_of(started)]
            row["latencies"].append(latency)
            row["delays"].append(delay)
            row["envoys"].add(envoy["name"])
            if status == "ok":
                answered = started + latency
                if last_ok is not None:
                    row["gaps"].append(answered - last_ok)
                last_ok = answered
            elif status == "unknown":
                row["unknown"] += 1
            else:
                row["failed"] += 1
                row["failures"][status] = row["failures"].get(status, 0) + 1

    def summary(latencies, gaps, delays, failed, unknown, failures, n_envoys) -> dict:
        return {"count": len(latencies), "failed": failed, "known_false": unknown, "failures_by_code": failures,
                "envoys_beating": n_envoys,
                "latency_s": ({"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                               "max": max(latencies)} if latencies else {}),
                # how late the simulating process itself sent them (its threads waiting for the GIL or a CPU)
                "send_delay_s": ({"p99": percentile(delays, 99), "max": max(delays)} if delays else {}),
                "gaps": len(gaps), "max_gap_s": max(gaps) if gaps else None,
                "late": sum(g > period + LATE_BY_S for g in gaps)}

    out = {"period_s": period, "late_if_gap_over_s": period + LATE_BY_S, "phases": {}}
    for name in PHASES:
        row = rows[name]
        out["phases"][name] = summary(row["latencies"], row["gaps"], row["delays"], row["failed"], row["unknown"],
                                      row["failures"], len(row["envoys"]))
    everything = {k: [x for name in PHASES for x in rows[name][k]] for k in ("latencies", "gaps", "delays")}
    failures: dict[str, int] = {}
    for name in PHASES:
        for code, n in rows[name]["failures"].items():
            failures[code] = failures.get(code, 0) + n
    out["all"] = summary(everything["latencies"], everything["gaps"], everything["delays"],
                         sum(rows[n]["failed"] for n in PHASES),
                         sum(rows[n]["unknown"] for n in PHASES), failures,
                         len(set().union(*(rows[n]["envoys"] for n in PHASES))))
    return out


def round_figures(history, rounds: int) -> dict:
    per_round = []
    for e in history:
        if e.stage == r.Stage.ROUND and not e.envoy:
            metrics = {m.name: m.value for m in e.metrics}
            per_round.append({"round": e.round, "round_time_s": e.round_time_s,
                              "envoys_reported": int(metrics.get("envoys_reported", 0)),
                              "bytes_moved": int(metrics.get("bytes_sent", 0) + metrics.get("bytes_received", 0))})
    per_round.sort(key=lambda row: row["round"])
    measured = [row["round_time_s"] for row in per_round if row["round"] >= 1]
    return {"asked": rounds, "completed": len({row["round"] for row in per_round}),
            "round0_s": next((row["round_time_s"] for row in per_round if row["round"] == 0), None),
            "round_time_s": {"median": statistics.median(measured), "max": max(measured)} if measured else {},
            "per_round": per_round}


def envoy_figures(children: list[dict], experiment: str) -> dict:
    envoys = [e for child in children for e in child["envoys"]]
    errors: collections.Counter = collections.Counter()
    for e in envoys:
        errors.update(e["errors"])
    workers = [e["workers"].get(experiment) for e in envoys]
    failures = [f"{e['name']}: {f}" for e, w in zip(envoys, workers) if w for f in w["failures"]]
    return {"count": len(envoys), "registrations": sum(e["registrations"] for e in envoys),
            "stream_opens": sum(e["stream_opens"] for e in envoys), "rpc_errors": dict(errors),
            "workers_started": sum(w is not None for w in workers),
            "workers_finished": sum(bool(w and w["finished"]) for w in workers),
            "rounds_trained": sum(len(w["trained"]) for w in workers if w),
            "uploads": sum(w["uploads"] for w in workers if w),
            "final_validations": sum(len(w["validated"]) for w in workers if w),
            "rounds_gone_on_without": sum(len(w["went_on_without"]) for w in workers if w),
            "worker_failures": len(failures), "worker_failure_examples": failures[:10],
            # what the workers that had not finished were doing when they were stopped (a hang shows here)
            "unfinished_workers_in_call": dict(collections.Counter(
                " ".join(word for word in w["doing"].split() if not word.isdigit()) or "between calls"
                for w in workers if w and not w["finished"])),
            "longest_call_at_stop_s": max((w["doing_for_s"] for w in workers if w and not w["finished"]), default=0.0),
            "own_connection_per_client": all(e["own_connection"] for e in envoys)
            and all(w["own_connection"] for w in workers if w),
            "jax_imported_in_children": any(child["jax_imported"] for child in children)}


def _ms(summary: dict, key: str) -> str:
    value = summary["latency_s"].get(key)
    return "-" if value is None else f"{value * 1000:.1f}"


def report(res: dict) -> str:
    cfg, m = res["config"], res["machine"]
    out = [f"{cfg['envoys']} simulated envoys in {cfg['procs']} processes, health-check period {cfg['period_s']:g} s, "
           f"{cfg['rounds']} rounds of a {cfg.get('model_bytes', 0) / 1024:.1f} KiB model",
           f"Machine: {m['nproc']} CPUs ({m.get('cpu_model', '?')}), Python {m['python']}, grpcio {m['grpcio']}; "
           f"load average {m['loadavg_at_start'][0]:.2f} at start, {m.get('loadavg_at_end', [float('nan')])[0]:.2f} "
           f"at end; wall time {res.get('wall_s', float('nan')):.1f} s"]
    rounds = res.get("rounds")
    if rounds:
        out.append(f"\nRounds: {rounds['completed']} of {rounds['asked']} completed; experiment "
                   f"{res.get('experiment_state', '?')}" + (f" ({res['experiment_error']})"
                                                             if res.get("experiment_error") else ""))
        out.append(table(["round", "envoys reported", "round_time_s", "KiB moved"],
                         [[row["round"], row["envoys_reported"], row["round_time_s"], f"{row['bytes_moved'] / 1024:.0f}"]
                          for row in rounds["per_round"]]))
        if rounds["round_time_s"]:
            out.append(f"round_time_s over rounds >= 1: median {rounds['round_time_s']['median']:.3f} s, "
                       f"max {rounds['round_time_s']['max']:.3f} s; experiment wall time (submit to end) "
                       f"{res.get('experiment_wall_s', float('nan')):.1f} s")
    hb = res.get("heartbeats")
    if hb:
        out.append(f"\nHeartbeats (every envoy, every heartbeat; late = gap between answers > {hb['late_if_gap_over_s']:g} s)")
        rows = []
        for name in (*PHASES, "all"):
            s = hb["all"] if name == "all" else hb["phases"][name]
            secs = res["phase_seconds"].get(name, res.get("wall_s", 0.0)) if name != "all" else None
            delay = s["send_delay_s"]
            rows.append([name, "-" if secs is None else f"{secs:.1f}", s["envoys_beating"], s["count"], s["failed"],
                         s["known_false"], _ms(s, "p50"), _ms(s, "p99"), _ms(s, "max"),
                         "-" if s["max_gap_s"] is None else f"{s['max_gap_s']:.3f}", s["late"],
                         "-" if not delay else f"{delay['p99'] * 1000:.0f}/{delay['max'] * 1000:.0f}"])
        out.append(table(["phase", "seconds", "envoys", "heartbeats", "failed", "known=False", "p50 ms", "p99 ms",
                          "max ms", "max gap s", "late", "send delay p99/max ms"], rows))
        out.append("latency = the Heartbeat call as the envoy saw it; send delay = how late the simulating process "
                   "itself sent it (its threads waiting for a CPU or the GIL)")
        if hb["all"]["failures_by_code"]:
            out.append(f"failed heartbeats by code: {hb['all']['failures_by_code']}")
    d = res.get("director")
    if d:
        n = cfg["envoys"]
        out.append(f"\nDirector (pid {d['pid']}; CPU % = CPU seconds / wall seconds x 100; per envoy: / {n})")
        rows = []
        for name in ("idle", "experiment"):
            c = d["cpu"].get(name)
            if c:
                rows.append([name, f"{c['seconds']:.1f}", f"{c['cpu_s']:.2f}", f"{c['cpu_pct']:.1f}",
                             f"{c['cpu_pct_per_envoy']:.4f}", d["threads"].get(f"{name}_max", "-")])
        out.append(table(["phase", "seconds", "CPU s", "CPU %", "CPU % per envoy", "threads max"], rows))
        shares = res.get("cpu_shares", {})
        if shares:
            out.append(f"who used the {m['nproc']} CPUs (CPU seconds; other = processes outside this benchmark):")
            out.append(table(["phase", "director", "simulated envoys", "notebook", "other", "machine busy %"],
                             [[name, f"{c['director_cpu_s']:.2f}", f"{c['envoys_cpu_s']:.2f}",
                               f"{c['benchmark_cpu_s']:.2f}", f"{c['other_cpu_s']:.2f}", f"{c['machine_busy_pct']:.0f}"]
                              for name, c in shares.items()]))
        mem = [f"RSS after DIRECTOR READY {d['baseline_rss_bytes'] / MiB:.1f} MiB ({d['threads']['baseline']} threads)"]
        if "idle_rss_bytes" in d:
            mem.append(f"all envoys connected, idle {d['idle_rss_bytes'] / MiB:.1f} MiB "
                       f"({d['threads']['idle']} threads): {d['rss_per_envoy_kib_idle']:.1f} KiB per envoy over the baseline")
        if "peak_rss_bytes" in d:
            mem.append(f"peak (VmHWM after the experiment) {d['peak_rss_bytes'] / MiB:.1f} MiB: "
                       f"{d['rss_per_envoy_kib_peak']:.1f} KiB per envoy over the baseline; threads at peak "
                       f"{d['threads']['peak']}")
        out.append(";\n".join(mem))
    e = res.get("envoys")
    if e:
        out.append(f"\nSimulated envoys: {e['count']} (children imported JAX: {e['jax_imported_in_children']}); "
                   f"{e['registrations']} registrations, {e['stream_opens']} experiment streams opened; workers "
                   f"{e['workers_finished']}/{e['workers_started']} finished, {e['rounds_trained']} rounds trained, "
                   f"{e['uploads']} uploads, {e['final_validations']} final validations, "
                   f"{e['rounds_gone_on_without']} rounds gone on without them, {e['worker_failures']} worker failures; "
                   f"every client on a TCP connection of its own: {e['own_connection_per_client']}")
        if e["unfinished_workers_in_call"]:
            out.append(f"workers not finished when stopped, by the call they were in: {e['unfinished_workers_in_call']} "
                       f"(the longest for {e['longest_call_at_stop_s']:.0f} s)")
        out.append("RPC errors the simulated envoys saw (retried ones included): "
                   + (", ".join(f"{k} x{v}" for k, v in sorted(e["rpc_errors"].items())) or "none"))
    return "\n".join(out)


# ============================================================================ the run
def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``(first, count)`` of ``n`` envoys numbered from 1 over ``parts`` processes, as even as can be."""
    out, first = [], 1
    for k in range(parts):
        count = n // parts + (k < n % parts)
        if count:
            out.append((first, count))
            first += count
    return out


def run(args: argparse.Namespace, results: dict, problems: list[str]) -> None:
    import yaml

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    state, nbytes = make_state()  # JAX starts here, before anything is measured
    results["config"]["model_bytes"] = nbytes
    names = [envoy_name(i) for i in range(1, args.envoys + 1)]
    workdir = Path(tempfile.mkdtemp(prefix="fedjax-scale-"))
    processes: list[Process] = []
    director: Process | None = None
    sampler: StatusSampler | None = None
    fed = None
    children: list[Process] = []
    print(f"  work dir {workdir}", flush=True)
    try:
        port = free_port()
        settings = {"listen_host": "127.0.0.1", "listen_port": port, "sample_shape": list(SAMPLE_SHAPE),
                    "target_shape": list(TARGET_SHAPE), "envoy_health_check_period": args.period,
                    "state_dir": str(workdir / "director_state"), "log_dir": str(workdir / "logs")}
        for item in args.director_setting:
            key, _, value = item.partition("=")
            settings[key] = yaml.safe_load(value)
        results["config"]["director_settings"] = {k: v for k, v in settings.items() if k not in ("state_dir", "log_dir")}
        config = workdir / "director_config.yaml"
        config.write_text(yaml.safe_dump({"settings": settings}))
        director = Process([*FEDJAX, "director", "start", "-c", str(config), "--disable-tls"], cwd=workdir,
                           name="director")
        processes.append(director)
        director.wait_for(r"DIRECTOR READY", timeout=60)
        pid = director.proc.pid
        base = proc_status(pid)
        sampler = StatusSampler(pid, period=0.1).start()
        d = results["director"] = {"pid": pid, "baseline_rss_bytes": base["VmRSS"], "cpu": {},
                                   "threads": {"baseline": base["Threads"]}}
        print(f"  director ready (pid {pid}, RSS {base['VmRSS'] / MiB:.1f} MiB); starting {args.envoys} simulated "
              f"envoys in {args.procs} processes ...", flush=True)

        marks = results["marks"] = {"children_started": time.time()}
        for k, (first, count) in enumerate(split(args.envoys, args.procs)):
            child = Process([sys.executable, "-u", str(Path(__file__).resolve()), "--child", "--target",
                             f"127.0.0.1:{port}", "--first", str(first), "--count", str(count), "--stats",
                             str(workdir / f"envoys{k}.json"), "--ready-timeout", str(args.connect_timeout)]
                            + (["--download-bundle"] if args.download_bundle else []), cwd=workdir, name=f"envoys{k}")
            processes.append(child)
            children.append(child)
        try:
            for child in children:
                match = child.wait_for(r"CHILD (NOT )?READY.*", timeout=args.connect_timeout + 30)
                if match.group(1):
                    raise RuntimeError(f"{child.name}: {match.group(0)}")
            from fedjax_core import Federation

            fed = Federation(client_id="scale", director_node_fqdn="127.0.0.1", director_port=port, tls=False)
            deadline = time.monotonic() + args.connect_timeout
            while True:  # the director's own view: every envoy registered and online
                registry = fed.get_shard_registry()
                online = sum(bool(registry.get(n, {}).get("is_online")) for n in names)
                if online == len(names):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {online} of {len(names)} envoys online at the director after "
                                       f"{args.connect_timeout:g} s")
                time.sleep(0.2)
        finally:
            marks["connected"] = time.time()
        print(f"  {args.envoys} envoys connected in {marks['connected'] - marks['children_started']:.1f} s; "
              f"idle for {args.idle_periods} periods ...", flush=True)

        snap0 = cpu_snapshot(pid, children)
        time.sleep(args.idle_periods * args.period)  # a measurement window, not a wait for a condition
        marks["experiment_start"] = t_idle_end = time.time()
        snap1 = cpu_snapshot(pid, children)
        idle = proc_status(pid)
        idle_s = t_idle_end - marks["connected"]
        d["cpu"]["idle"] = _cpu(snap1["director"] - snap0["director"], idle_s, args.envoys)
        results["cpu_shares"] = {"idle": cpu_shares(snap0, snap1)}
        d["idle_rss_bytes"] = idle["VmRSS"]
        d["rss_per_envoy_kib_idle"] = (idle["VmRSS"] - base["VmRSS"]) / args.envoys / 1024
        d["threads"]["idle"] = idle["Threads"]
        d["threads"]["idle_max"] = sampler.peak("Threads", marks["connected"], t_idle_end)

        print(f"  experiment: {args.rounds} rounds, all {args.envoys} envoys ...", flush=True)
        name = f"scale-{args.envoys}"
        out: dict = {}
        thread = threading.Thread(target=run_experiment, args=(fed, name, state, args.rounds, names, out), daemon=True)
        thread.start()
        thread.join(timeout=args.timeout)
        marks["experiment_end"] = time.time()
        snap2 = cpu_snapshot(pid, children)
        d["cpu"]["experiment"] = _cpu(snap2["director"] - snap1["director"],
                                      marks["experiment_end"] - marks["experiment_start"], args.envoys)
        results["cpu_shares"]["experiment"] = cpu_shares(snap1, snap2)
        d["threads"]["experiment_max"] = sampler.peak("Threads", marks["experiment_start"], marks["experiment_end"])
        if thread.is_alive():
            problems.append(f"the experiment did not end within --timeout {args.timeout:g} s")
        elif "error" in out:
            problems.append(f"the experiment failed: {out['error']}")
        exp = out.get("experiment")
        history = list(exp.history) if exp is not None and exp.history is not None else []
        results["rounds"] = round_figures(history, args.rounds)
        results["experiment_submit_s"] = out.get("submit_s")
        results["experiment_wall_s"] = out.get("wall_s", marks["experiment_end"] - marks["experiment_start"])
        if exp is not None:
            try:
                status = exp.get_experiment_status()
                results["experiment_state"], results["experiment_error"] = str(status.state), status.error
            except Exception as exc:
                results["experiment_state"] = f"unknown ({type(exc).__name__}: {exc})"
        if results.get("experiment_state") == "finished":
            for child in children:  # every simulated worker has seen the experiment end
                child.wait_for(rf"ALL FINISHED {name} ", timeout=60)
        final = proc_status(pid)
        d["peak_rss_bytes"], d["final_rss_bytes"] = final["VmHWM"], final["VmRSS"]
        d["rss_per_envoy_kib_peak"] = (final["VmHWM"] - base["VmRSS"]) / args.envoys / 1024
        d["threads"]["final"] = final["Threads"]
        # one more period and a bit with every envoy connected, so that a heartbeat missed during the
        # experiment shows as a late gap, however short the experiment was
        time.sleep(args.period + LATE_BY_S)
        try:
            registry = fed.get_shard_registry()
            results["online_after_experiment"] = sum(bool(registry.get(n, {}).get("is_online")) for n in names)
        except Exception as exc:
            problems.append(f"the shard registry could not be read after the experiment: {exc}")
    except BaseException:
        for p in processes[1:]:
            print(f"----- {p.name} (last 15 lines) -----\n" + "\n".join(p.lines[-15:]), file=sys.stderr)
        raise
    finally:
        if children:  # SIGTERM: each child stops its envoys and writes their figures, also after a failure
            _collect(args, results, problems, children, workdir, f"scale-{args.envoys}")
        if sampler is not None:
            sampler.stop()
            if "director" in results:
                results["director"]["threads"]["peak"] = sampler.peak("Threads")
        if fed is not None:
            try:
                fed.close()
            except Exception:
                pass
        for p in reversed(processes):
            try:
                p.stop(timeout=40)
            except Exception as exc:  # keep stopping the others
                print(f"  could not stop {p.name}: {exc}", file=sys.stderr)
        if director is not None:
            results["director_log_tail"] = director.lines[-60:]
            results["director_log_warnings"] = [line for line in director.lines
                                                if " WARNING " in line or " ERROR " in line][-50:]
        if args.keep_workdir:
            print(f"  work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _collect(args: argparse.Namespace, results: dict, problems: list[str], children: list[Process], workdir: Path,
             experiment: str) -> None:
    """Stop the children and read their figures; phases that never began are empty."""
    for child in children:
        child.stop(timeout=40)
    marks = results["marks"]
    marks["stopped"] = now = time.time()
    for key in ("connected", "experiment_start", "experiment_end"):
        marks.setdefault(key, now)
    stats = []
    for k, child in enumerate(children):
        path = workdir / f"envoys{k}.json"
        if path.exists():
            stats.append(json.loads(path.read_text()))
        else:
            problems.append(f"{child.name} wrote no figures (exit code {child.proc.returncode}); its output ends:\n"
                            + "\n".join(child.lines[-20:]))
    if not stats:
        return
    results["envoys"] = envoy_figures(stats, experiment)
    results["heartbeats"] = heartbeat_figures([e for s in stats for e in s["envoys"]], marks, args.period)
    results["phase_seconds"] = {"connect": marks["connected"] - marks["children_started"],
                                "idle": marks["experiment_start"] - marks["connected"],
                                "experiment": marks["experiment_end"] - marks["experiment_start"],
                                "after": marks["stopped"] - marks["experiment_end"]}


def _cpu(cpu_s: float, seconds: float, envoys: int) -> dict:
    pct = 100.0 * cpu_s / seconds if seconds > 0 else float("nan")
    return {"seconds": seconds, "cpu_s": cpu_s, "cpu_pct": pct, "cpu_pct_per_envoy": pct / envoys}


def check(results: dict, problems: list[str]) -> list[str]:
    """What makes the run fail: rounds not completed, heartbeats failed, known=False or late."""
    rounds = results.get("rounds")
    if rounds is None or rounds["completed"] < rounds["asked"]:
        problems.append(f"rounds completed: {rounds['completed'] if rounds else 0} of {results['config']['rounds']}")
    hb = results.get("heartbeats")
    if hb is None:
        problems.append("no heartbeat figures")
    else:
        a = hb["all"]
        if a["failed"]:
            problems.append(f"{a['failed']} heartbeats failed ({a['failures_by_code']})")
        if a["known_false"]:
            problems.append(f"{a['known_false']} heartbeats were answered known=False")
        if a["late"]:
            late = {name: s["late"] for name, s in hb["phases"].items() if s["late"]}
            problems.append(f"{a['late']} heartbeat gaps over {hb['late_if_gap_over_s']:g} s (by phase: {late}); "
                            f"longest {a['max_gap_s']:.2f} s")
        silent = [name for name in ("idle", "after") if hb["phases"][name]["envoys_beating"] < results["config"]["envoys"]]
        if silent:
            problems.append(f"not every envoy sent a heartbeat in phase(s) {silent}")
    e = results.get("envoys")
    if e is not None:
        if e["jax_imported_in_children"]:
            problems.append("a child process imported JAX")
        if e["worker_failures"]:
            problems.append(f"{e['worker_failures']} simulated worker failures, e.g. {e['worker_failure_examples'][:3]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envoys", type=int, help="simulated envoys (default 256; --quick 16)")
    parser.add_argument("--procs", type=int, help="processes to spread them over (default 8; --quick 2)")
    parser.add_argument("--rounds", type=int, help="rounds of the experiment (default 5; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 envoys, 2 processes, 2 rounds")
    parser.add_argument("--out", default=str(REPO / "bench-results" / "scale.json"), help="JSON results path")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the experiment may take (default 600)")
    parser.add_argument("--period", type=float, default=2.0, help="the director's envoy_health_check_period (s)")
    parser.add_argument("--idle-periods", type=float, default=3.0, help="health-check periods of the idle phase")
    parser.add_argument("--connect-timeout", type=float, help="seconds for every envoy to connect (default 60 + N/4)")
    parser.add_argument("--director-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="another director setting (YAML value), e.g. max_workers=1024 (repeatable)")
    parser.add_argument("--download-bundle", action="store_true",
                        help="each simulated envoy downloads the code bundle (and discards it), as a daemon does")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (configs, director state)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    parser.add_argument("--ready-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    args.envoys = args.envoys or (16 if args.quick else 256)
    args.procs = min(args.procs or (2 if args.quick else 8), args.envoys)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.connect_timeout = args.connect_timeout or 60.0 + args.envoys / 4
    if args.envoys < 1 or args.procs < 1 or args.rounds < 1:
        parser.error("--envoys, --procs and --rounds must be >= 1")
    # SIGTERM (e.g. a test's timeout) unwinds through the finally blocks that stop every process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.perf_counter()
    print(f"fedjax_core scale benchmark: {args.envoys} envoys in {args.procs} processes, {args.rounds} rounds"
          f"{' (quick)' if args.quick else ''}", flush=True)
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(f"  note: load average {load:.1f} on {cpus} CPUs: other work is running, figures will be noisy",
              flush=True)
    results: dict = {"quick": args.quick, "machine": machine_info(), "config": {
        "envoys": args.envoys, "procs": args.procs, "rounds": args.rounds, "period_s": args.period,
        "idle_periods": args.idle_periods, "timeout_s": args.timeout, "download_bundle": args.download_bundle,
        "opt_treatment": "RESET", "optimizer": "optax.sgd(0.01)", "channels_per_envoy": "daemon 1 + worker 1"}}
    problems: list[str] = []
    try:
        run(args, results, problems)
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    results["wall_s"] = time.perf_counter() - started
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results.setdefault("phase_seconds", {})
    problems = check(results, problems)
    results["ok"], results["problems"] = not problems, problems
    print()
    try:
        print(report(results))
    except Exception as exc:  # a partial run: the JSON still says what there is
        print(f"(no full table: {type(exc).__name__}: {exc})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults written to {out} ({results['wall_s']:.0f} s in all)")
    if problems:
        print("\n----- director log (last 60 lines) -----\n" + "\n".join(results.get("director_log_tail", [])))
        print("\nSCALE CHECK FAILED:\n" + "\n".join(f"  - {p}" for p in problems), flush=True)
        return 1
    print(f"\nSCALE CHECK PASSED: {results['rounds']['completed']} of {args.rounds} rounds with {args.envoys} envoys; "
          f"{results['heartbeats']['all']['count']} heartbeats, none failed, none late", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
