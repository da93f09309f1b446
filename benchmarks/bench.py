#!/usr/bin/env python
"""``make bench``: the platform's own share of a federated round, and the director's memory.

Real processes on loopback: ``python -m fedjax_core director start --disable-tls`` and
``envoy start`` daemons (each running one JAX worker per experiment), configs in a temp
dir, a synthetic shard (``benchmarks/synthetic_shard.py``). The experiments' model is a
flax ``CustomTrainState`` of a few Dense layers sized to a given number of MiB of float32
params; plain SGD with ``opt_treatment='RESET'``, so no optimizer state travels and the
bytes moved are the params. Tasks return metrics at once, so a round's time is the
platform's share: the long-poll hand-off, model download, metric reports, upload,
spooling, aggregation.

1. Round overhead: the director's ``round_time_s`` (rounds >= 1; round 0 includes the
   workers' start-up) per model size with 2 envoys, bytes moved per round and MB/s, and a
   phase breakdown from the director's own event timestamps.
2. Director memory: VmHWM of a fresh director per envoy count at a fixed model size,
   against its VmRSS right after ``DIRECTOR READY``.

A reference measurement of the bare transport (Python gRPC, 1 MiB bytes messages over
loopback, no protobuf, no disk) says what "the time to move the bytes" is on this machine.

    python benchmarks/bench.py            # full run (< 10 min on 2 cores)
    python benchmarks/bench.py --quick    # smoke run (small models, 1-2 envoys)

Figures go to stdout as tables and to ``bench-results/bench.json`` (``--out``). MB = MiB.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from fedjax_core.local import Process, free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FEDJAX = [sys.executable, "-m", "fedjax_core"]
MiB = 1 << 20
IN_FEATURES = 32 * 32 * 3
N_CLASSES = 10
MALLOC_TUNED = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
STAGE_AGG, STAGE_TRAIN, STAGE_LOCAL, STAGE_ROUND = (
    "aggregated_model_validation", "train", "locally_tuned_model_validation", "round")


# ----------------------------------------------------------------------------- the experiment
def _width_for(model_bytes: int) -> int:
    """Hidden width w of Dense(w)-Dense(w)-Dense(10) over 3072 inputs with ~model_bytes of float32."""
    n = model_bytes / 4  # w^2 + (3072 + 1 + 1 + 10) w + 10 params
    b = IN_FEATURES + N_CLASSES + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * (n - N_CLASSES))) / 2))


def make_state(model_mb: float):
    """A CustomTrainState of an MLP with ~model_mb MiB of float32 params and plain SGD (no optimizer state)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen as nn

    from fedjax_core import CustomTrainState

    class MLP(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x):
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(nn.Dense(self.width)(x))
            x = nn.relu(nn.Dense(self.width)(x))
            return nn.Dense(N_CLASSES)(x)

    model = MLP(width=_width_for(int(model_mb * MiB)))
    params = model.init(jax.random.PRNGKey(0), jnp.ones([1, 32, 32, 3]))["params"]
    state = CustomTrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.01), opt_vars=[])
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state.params))
    return state, nbytes


def make_tasks():
    """Tasks that do no compute: the round's time is the platform's own."""
    from fedjax_core import TaskInterface

    TI = TaskInterface()

    @TI.register_fl_task(model="state", data_loader="dataset", optimizer="optimizer", device="device")
    def train(state, dataset, optimizer, device):
        return {"loss": 0.0}

    @TI.register_fl_task(model="state", data_loader="dataset", device="device")
    def validate(state, dataset, device):
        return {"accuracy": 0.0}

    return TI


# ----------------------------------------------------------------------------- processes
def proc_status(pid: int) -> dict[str, int]:
    """Memory fields of /proc/<pid>/status, in bytes, and its thread count (``Threads``)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


class StatusSampler:
    """Samples a process's /proc status (:func:`proc_status`) every ``period`` s on a thread of its own, as
    (wall-clock time, status) pairs; ``peak`` answers the maxima (VmHWM has no RssAnon/RssFile split, and
    no per-phase thread count)."""

    def __init__(self, pid: int, period: float = 0.01):
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="status-sampler")

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append((time.time(), proc_status(self.pid)))
            except OSError:  # the process is gone
                return

    def peak(self, key: str, t0: float = float("-inf"), t1: float = float("inf")) -> int:
        """The largest ``key`` sampled in [t0, t1); 0 if none was."""
        return max((status.get(key, 0) for t, status in self.samples if t0 <= t < t1), default=0)

    def start(self) -> StatusSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def __enter__(self) -> StatusSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class BenchStack:
    """A director and ``n_envoys`` envoys on loopback with synthetic shards; ``stop()`` ends them all."""

    def __init__(self, workdir: Path, n_envoys: int, samples: int, director_env: dict[str, str] | None = None):
        self.workdir = workdir
        self.director_env = dict(director_env or {})
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.processes: list[Process] = []
        self.director: Process | None = None
        self.baseline: dict[str, int] = {}
        self.names = [f"env{i + 1}" for i in range(n_envoys)]
        shutil.copyfile(HERE / "synthetic_shard.py", workdir / "synthetic_shard.py")
        self.director_config = workdir / "director_config.yaml"
        self.director_config.write_text(yaml.safe_dump({"settings": {
            "listen_host": "127.0.0.1", "listen_port": self.port, "sample_shape": ["32", "32", "3"],
            "target_shape": ["1"], "envoy_health_check_period": 1,
            "state_dir": str(workdir / "director_state"), "log_dir": str(workdir / "logs")}}))
        self.envoy_configs = []
        for i, name in enumerate(self.names):
            path = workdir / f"envoy_{name}.yaml"
            path.write_text(yaml.safe_dump({
                "params": {"cuda_devices": [], "work_dir": str(workdir / "envoy_workspace")},
                "optional_plugin_components": {},
                "shard_descriptor": {"template": "synthetic_shard.SyntheticShardDescriptor",
                                     "params": {"rank_worldsize": f"{i + 1}, {n_envoys}", "n_samples": samples}}}))
            self.envoy_configs.append(path)

    def start(self) -> BenchStack:
        self.start_director()
        self.start_envoys()
        return self

    def start_director(self) -> Process:
        self.director = Process([*FEDJAX, "director", "start", "-c", str(self.director_config), "--disable-tls"],
                                cwd=self.workdir, env={"JAX_PLATFORMS": "cpu", **self.director_env}, name="director")
        self.processes.append(self.director)
        self.director.wait_for(r"DIRECTOR READY", timeout=60)
        self.baseline = proc_status(self.director.proc.pid)
        return self.director

    def start_envoys(self) -> None:
        envoys = []
        for name, config in zip(self.names, self.envoy_configs):
            p = Process([*FEDJAX, "envoy", "start", "-n", name, "-c", str(config), "-dh", "127.0.0.1",
                         "-dp", str(self.port), "--disable-tls"], cwd=self.workdir, env={"JAX_PLATFORMS": "cpu"},
                        name=name)
            self.processes.append(p)
            envoys.append(p)
        for p in envoys:
            p.wait_for(r"ENVOY READY", timeout=120)

    def stop(self) -> None:
        for p in reversed(self.processes):
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                print(f"  could not stop {p.name}: {exc}", file=sys.stderr)

    def logs(self, tail: int = 40) -> str:
        return "\n".join(f"----- {p.name} -----\n" + "\n".join(p.lines[-tail:]) for p in self.processes)


def _proc_table() -> dict[int, tuple[int, float]]:
    """Every process now: pid -> (parent pid, CPU seconds so far)."""
    tick, table = os.sysconf("SC_CLK_TCK"), {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


class TreeCpuSampler:
    """CPU seconds of process trees, sampled from /proc every ``period`` s on a thread of its own. ``roots()``
    answers ``{pid: (label, label of its descendants)}`` (asked at every sample, so processes started later
    count); ``between(t0, t1)`` says what each label used between two wall-clock moments: the director and an
    envoy's workers apart from its daemon, which is what shows where a round's CPU goes (benchmarks/README.md)."""

    def __init__(self, roots, period: float = 0.25):
        self.roots, self.period = roots, period
        self.samples: list[tuple[float, dict[int, float]]] = []  # (time, pid -> CPU s) of labelled pids
        self.labels: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-cpu-sampler")

    def _label(self, pid: int, table: dict[int, tuple[int, float]], roots: dict) -> str | None:
        if pid in roots:
            return roots[pid][0]
        seen, parent = 0, table.get(pid, (0, 0.0))[0]
        while parent > 1 and seen < 16:
            if parent in roots:
                return roots[parent][1]
            parent, seen = table.get(parent, (0, 0.0))[0], seen + 1
        return None

    def sample(self) -> None:
        roots, table = self.roots(), _proc_table()
        cpu = {}
        for pid, (_, seconds) in table.items():
            if pid not in self.labels:
                label = self._label(pid, table, roots)
                if label is None:
                    continue
                self.labels[pid] = label
            cpu[pid] = seconds
        self.samples.append((time.time(), cpu))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds of each label from the sample nearest ``t0`` to the one nearest ``t1`` (a process that
        ended in between counts up to its last sample)."""
        if not self.samples:
            return {}
        first = min(range(len(self.samples)), key=lambda i: abs(self.samples[i][0] - t0))
        last = min(range(len(self.samples)), key=lambda i: abs(self.samples[i][0] - t1))
        start, latest = self.samples[first][1], {}
        for _, cpu in self.samples[first:last + 1]:
            latest.update(cpu)
        spent: dict[str, float] = {}
        for pid, seconds in latest.items():
            label = self.labels[pid]
            spent[label] = spent.get(label, 0.0) + seconds - start.get(pid, 0.0)
        return spent

    def start(self) -> TreeCpuSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


# ----------------------------------------------------------------------------- one experiment
def follow_experiment(stack: BenchStack, name: str, state, tasks, data, rounds: int, timeout_s: float,
                      client_id: str = "bench"):
    """Submit one experiment to ``stack`` (RESET, CPU only, every envoy) and stream its metrics to the end;
    ``(experiment, submit_s, wall_s)``. Raises unless it finished."""
    from fedjax_core import Federation, FLExperiment, ModelInterface

    fed = Federation(client_id=client_id, director_node_fqdn="127.0.0.1", director_port=stack.port, tls=False)
    # a hung run must not hang the benchmark: past the deadline the director is stopped, the stream breaks
    watchdog = threading.Timer(timeout_s, lambda: stack.director and stack.director.stop())
    watchdog.daemon = True
    watchdog.start()
    try:
        exp = FLExperiment(federation=fed, experiment_name=name)
        t0 = time.perf_counter()
        exp.start(model_provider=ModelInterface(model=state), task_keeper=tasks, data_loader=data,
                  rounds_to_train=rounds, opt_treatment="RESET", device_assignment_policy="CPU_ONLY",
                  envoys=stack.names)
        submit_s = time.perf_counter() - t0
        exp.stream_metrics(progress=False, tensorboard_logs=False, live_table=False)
        wall_s = time.perf_counter() - t0
        status = exp.get_experiment_status()
    finally:
        watchdog.cancel()
        fed.close()
    if status.state != "finished":
        raise RuntimeError(f"experiment {name!r} ended {status.state}: {status.error}")
    return exp, submit_s, wall_s


def run_experiment(stack: BenchStack, name: str, model_mb: float, rounds: int, timeout_s: float) -> dict:
    """Run one experiment to its end; its per-round figures from the streamed events."""
    from fedjax_core import DataInterface

    state, nbytes = make_state(model_mb)
    exp, submit_s, wall_s = follow_experiment(stack, name, state, make_tasks(), DataInterface(), rounds, timeout_s)
    return {"name": name, "model_mb": model_mb, "model_bytes": int(nbytes), "n_envoys": len(stack.names),
            "rounds": rounds, "submit_s": submit_s, "wall_s": wall_s, **round_figures(exp.history)}


def round_figures(history) -> dict:
    """Round times, bytes and phases of rounds >= 1, from the director's event timestamps.

    For round r (director clock): ``open`` = close(r) - round_time_s(r) is when round r
    became available; the last envoy's ``aggregated_model_validation`` report marks its
    download done (hand-off + GetRoundModel + restore + no-op validate + report);
    the last ``locally_tuned_model_validation`` report marks the no-op tasks done; the
    'round' event (``close``) is when the last update was spooled and folded. What
    happens after ``close`` (finalize, write the next model, best-model copy) is not in
    ``round_time_s``; ``cycle_s`` = close(r) - close(r-1) includes it.
    """
    rounds = {e.round: e for e in history if e.stage == STAGE_ROUND and not e.envoy}
    reports: dict[tuple[int, str], list[float]] = {}
    for e in history:
        if e.envoy:
            reports.setdefault((e.round, e.stage), []).append(e.timestamp)
    per_round = []
    for rnd in sorted(rounds):
        e = rounds[rnd]
        metrics = {m.name: m.value for m in e.metrics}
        row = {"round": rnd, "round_time_s": e.round_time_s, "bytes_sent": int(metrics.get("bytes_sent", 0)),
               "bytes_received": int(metrics.get("bytes_received", 0)),
               "envoys_reported": int(metrics.get("envoys_reported", 0))}
        row["bytes_moved"] = row["bytes_sent"] + row["bytes_received"]
        opened = e.timestamp - e.round_time_s
        if rnd - 1 in rounds:
            row["cycle_s"] = e.timestamp - rounds[rnd - 1].timestamp
            row["prev_close_s"] = opened - rounds[rnd - 1].timestamp
        agg, local = reports.get((rnd, STAGE_AGG)), reports.get((rnd, STAGE_LOCAL))
        if agg and local:
            row["phase_download_s"] = max(agg) - opened
            row["phase_tasks_s"] = max(local) - max(agg)
            row["phase_upload_fold_s"] = e.timestamp - max(local)
        per_round.append(row)
    measured = [row for row in per_round if row["round"] >= 1]
    if not measured:
        raise RuntimeError("no round >= 1 was reported; run with rounds >= 2")

    def summary(key: str) -> dict:
        values = [row[key] for row in measured if key in row]
        return {"median": statistics.median(values), "max": max(values), "min": min(values)} if values else {}

    bytes_moved = statistics.median(row["bytes_moved"] for row in measured)
    rt = summary("round_time_s")
    return {
        "round0_s": per_round[0]["round_time_s"] if per_round[0]["round"] == 0 else None,
        "round_time_s": rt, "cycle_s": summary("cycle_s"), "prev_close_s": summary("prev_close_s"),
        "phase_download_s": summary("phase_download_s"), "phase_tasks_s": summary("phase_tasks_s"),
        "phase_upload_fold_s": summary("phase_upload_fold_s"),
        "bytes_per_round": int(bytes_moved),
        "MBps_per_round": bytes_moved / MiB / rt["median"] if rt["median"] > 0 else None,
        "per_round": per_round,
    }


# ----------------------------------------------------------------------------- transport reference
def serve_reference(port: int) -> None:
    """A bare gRPC server (raw bytes, no protobuf, no disk): sink for uploads, source for downloads."""
    from concurrent import futures

    import grpc

    from fedjax_core.transport import SERVER_OPTIONS

    def upload(requests, context):
        return str(sum(len(m) for m in requests)).encode()

    def download(request, context):
        total, block = int(request.decode()), b"\1" * MiB
        for _ in range(0, total, MiB):
            yield bytes(block)  # a fresh buffer per message, as reading a file gives

    handler = grpc.method_handlers_generic_handler("bench.Reference", {
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Download": grpc.unary_stream_rpc_method_handler(download)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("REFERENCE READY", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


def transport_reference(total_mb: int, repeats: int = 3) -> dict:
    """MB/s of one stream of 1 MiB messages each way through Python gRPC on loopback (best of ``repeats``)."""
    import grpc

    from fedjax_core.transport import CHANNEL_OPTIONS

    port = free_port()
    server = Process([sys.executable, "-u", str(Path(__file__).resolve()), "--serve-reference", str(port)],
                     name="reference")
    try:
        server.wait_for("REFERENCE READY", timeout=30)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            up = channel.stream_unary("/bench.Reference/Upload")
            down = channel.unary_stream("/bench.Reference/Download")
            total = total_mb * MiB
            block = b"\2" * MiB
            up_s, down_s = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                assert int(up((bytes(block) for _ in range(total_mb)), timeout=120)) == total
                up_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert sum(len(m) for m in down(str(total).encode(), timeout=120)) == total
                down_s.append(time.perf_counter() - t0)
        return {"bytes": total, "message_bytes": MiB, "upload_MBps": total_mb / min(up_s),
                "download_MBps": total_mb / min(down_s)}
    finally:
        server.stop()


# ----------------------------------------------------------------------------- the two benchmarks
def bench_round_overhead(workdir: Path, sizes: list[float], n_envoys: int, rounds: int, samples: int,
                         timeout_s: float) -> list[dict]:
    stack = BenchStack(workdir / "overhead", n_envoys, samples)
    results = []
    try:
        stack.start()
        for mb in sizes:
            print(f"  round overhead: {mb:g} MiB model, {n_envoys} envoys, {rounds} rounds ...", flush=True)
            results.append(run_experiment(stack, f"overhead-{mb:g}mb", mb, rounds, timeout_s))
    except BaseException:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        stack.stop()
    return results


def bench_memory(workdir: Path, envoy_counts: list[int], model_mb: float, rounds: int, samples: int,
                 timeout_s: float, director_env: dict[str, str] | None = None) -> list[dict]:
    results = []
    label = ("malloc-tuned" if director_env == MALLOC_TUNED
             else " ".join(f"{k}={v}" for k, v in (director_env or {}).items()) or "default")
    for n in envoy_counts:
        print(f"  director memory: {n} envoys, {model_mb:g} MiB model, {rounds} rounds, director env {label} ...",
              flush=True)
        stack = BenchStack(workdir / f"memory-{n}-{re.sub(r'[^A-Za-z0-9]+', '_', label)}", n, samples, director_env)
        try:
            stack.start()
            with StatusSampler(stack.director.proc.pid) as sampler:
                run = run_experiment(stack, f"memory-{n}", model_mb, rounds, timeout_s)
            final = proc_status(stack.director.proc.pid)  # finished, not yet stopped
        except BaseException:
            print(stack.logs(), file=sys.stderr)
            raise
        finally:
            stack.stop()
        baseline, peak = stack.baseline["VmRSS"], final["VmHWM"]
        results.append({
            "n_envoys": n, "director_env": label, "director_env_vars": dict(director_env or {}),
            "model_mb": model_mb, "model_bytes": run["model_bytes"], "rounds": rounds,
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "growth_bytes": peak - baseline,
            "growth_per_model": (peak - baseline) / run["model_bytes"],
            "final_rss_bytes": final["VmRSS"],
            "sampled_peak_rss_anon_bytes": sampler.peak("RssAnon"),
            "sampled_peak_rss_file_bytes": sampler.peak("RssFile"),
            "baseline_rss_anon_bytes": stack.baseline.get("RssAnon", 0),
            "baseline_rss_file_bytes": stack.baseline.get("RssFile", 0),
            "round_time_s": run["round_time_s"], "cycle_s": run["cycle_s"],
            "MBps_per_round": run["MBps_per_round"], "bytes_per_round": run["bytes_per_round"],
        })
    return results


# ----------------------------------------------------------------------------- reporting
def machine_info() -> dict:
    import grpc
    import jax
    import numpy

    info = {"nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "jax": jax.__version__, "numpy": numpy.__version__, "grpcio": grpc.__version__,
            "platform": platform.platform(), "machine": platform.machine(),
            "loadavg_at_start": list(os.getloadavg())}
    try:
        import flax

        info["flax"] = flax.__version__
    except Exception:
        pass
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n")[0]
        info["mem_total_bytes"] = int(meminfo.split()[1]) * 1024
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                                 if line.startswith("model name"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return info


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[h for h in headers]] + [[c if isinstance(c, str) else f"{c:.3f}" if isinstance(c, float) else str(c)
                                       for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def report(results: dict) -> str:
    m = results["machine"]
    out = [f"Machine: {m['nproc']} CPUs ({m.get('cpu_model', '?')}), Python {m['python']}, jax {m['jax']}, "
           f"grpcio {m['grpcio']}; load average {m['loadavg_at_start'][0]:.1f} at start, "
           f"{m.get('loadavg_at_end', [float('nan')])[0]:.1f} at end"]
    ref = results.get("transport_reference")
    if ref:
        out.append(f"Transport reference (bare Python gRPC, 1 MiB messages, loopback, one stream): "
                   f"upload {ref['upload_MBps']:.0f} MB/s, download {ref['download_MBps']:.0f} MB/s")
    rows = []
    for r_ in results["round_overhead"]:
        ideal = r_["bytes_per_round"] / MiB / min(ref["upload_MBps"], ref["download_MBps"]) if ref else float("nan")
        rows.append([f"{r_['model_bytes'] / MiB:.1f}", r_["n_envoys"], len(r_["per_round"]) - 1,
                     r_["round_time_s"]["median"], r_["round_time_s"]["max"], r_["cycle_s"].get("median", float("nan")),
                     f"{r_['bytes_per_round'] / MiB:.1f}", f"{r_['MBps_per_round']:.0f}", ideal,
                     r_["phase_download_s"].get("median", float("nan")), r_["phase_tasks_s"].get("median", float("nan")),
                     r_["phase_upload_fold_s"].get("median", float("nan")),
                     r_["prev_close_s"].get("median", float("nan")), r_["round0_s"] or float("nan")])
    out.append("\n1. Per-round platform overhead (rounds >= 1; seconds; MB = MiB)")
    out.append(table(["model MB", "envoys", "rounds", "round med", "round max", "cycle med", "MB/round", "MB/s",
                      "bytes/ref", "download", "tasks", "upload+fold", "close*", "round 0"], rows))
    out.append("   round = director round_time_s; cycle = close-to-close (includes close*); bytes/ref = MB/round "
               "over the bare-transport rate;\n   download/tasks/upload+fold = phases up to the last envoy's report; "
               "close* = finalize + write next model (not in round_time_s); round 0 includes worker start-up")
    rows = []
    for m in results["director_memory"]:
        rows.append([m["n_envoys"], m["director_env"], f"{m['model_bytes'] / MiB:.1f}", f"{m['baseline_rss_bytes'] / MiB:.1f}",
                     f"{m['peak_rss_bytes'] / MiB:.1f}", f"{m['growth_bytes'] / MiB:.1f}", f"{m['growth_per_model']:.2f}",
                     f"{m['sampled_peak_rss_anon_bytes'] / MiB:.1f}", f"{m['sampled_peak_rss_file_bytes'] / MiB:.1f}",
                     m["round_time_s"]["median"], f"{m['MBps_per_round']:.0f}"])
    out.append("\n2. Director peak memory (fresh director per row; MB = MiB)")
    out.append(table(["envoys", "director env", "model MB", "baseline RSS", "peak (VmHWM)", "peak-base", "(peak-base)/model",
                      "peak anon~", "peak file~", "round med s", "MB/s"], rows))
    out.append("   baseline = VmRSS after DIRECTOR READY; peak anon~/file~ = RssAnon/RssFile maxima sampled every 10 ms;\n"
               "   malloc-tuned = director started with " + " ".join(f"{k}={v}" for k, v in MALLOC_TUNED.items()))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small models, 1 and 2 envoys")
    parser.add_argument("--out", default=str(REPO / "bench-results" / "bench.json"), help="JSON results path")
    parser.add_argument("--sizes-mb", type=float, nargs="+", help="model sizes (MiB) for the round overhead")
    parser.add_argument("--rounds", type=int, help="rounds per round-overhead experiment")
    parser.add_argument("--envoy-counts", type=int, nargs="+", help="envoy counts for the memory benchmark")
    parser.add_argument("--memory-model-mb", type=float, help="model size (MiB) for the memory benchmark")
    parser.add_argument("--memory-rounds", type=int, help="rounds per memory experiment")
    parser.add_argument("--director-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the director process of the memory runs (repeatable)")
    parser.add_argument("--no-malloc-variant", action="store_true",
                        help="skip the memory runs with a director whose glibc allocator is tuned")
    parser.add_argument("--samples", type=int, default=32, help="synthetic samples per split per envoy")
    parser.add_argument("--experiment-timeout", type=float, default=300.0, help="seconds before a run is killed")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (configs, state, logs)")
    parser.add_argument("--serve-reference", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_reference:
        serve_reference(args.serve_reference)
        return 0

    quick = args.quick
    sizes = args.sizes_mb or ([1, 4] if quick else [1, 16, 64])
    rounds = args.rounds or (3 if quick else 15)
    envoy_counts = args.envoy_counts or ([1, 2] if quick else [1, 2, 4, 8])
    memory_mb = args.memory_model_mb or (4 if quick else 32)
    memory_rounds = args.memory_rounds or 3
    # SIGTERM (e.g. a test's timeout) unwinds through the finally blocks that stop every process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="fedjax-bench-"))
    print(f"fedjax_core benchmark ({'quick' if quick else 'full'}); work dir {workdir}", flush=True)
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(f"  note: load average {load:.1f} on {cpus} CPUs: other work is running, timings will be noisy",
              flush=True)
    results: dict = {"quick": quick, "machine": machine_info(), "config": {
        "sizes_mb": sizes, "rounds": rounds, "overhead_envoys": 2, "envoy_counts": envoy_counts,
        "memory_model_mb": memory_mb, "memory_rounds": memory_rounds, "director_env": args.director_env, "samples_per_split": args.samples,
        "opt_treatment": "RESET", "optimizer": "optax.sgd(0.01)", "MB": MiB}}
    try:
        print("  transport reference ...", flush=True)
        results["transport_reference"] = transport_reference(16 if quick else 64)
        results["round_overhead"] = bench_round_overhead(workdir, sizes, 2, rounds, args.samples,
                                                         args.experiment_timeout)
        director_env = dict(item.split("=", 1) for item in args.director_env)
        results["director_memory"] = bench_memory(workdir, envoy_counts, memory_mb, memory_rounds, args.samples,
                                                  args.experiment_timeout, director_env)
        if not (quick or args.no_malloc_variant or director_env):
            # the same runs with one malloc arena and a fixed mmap threshold: how much of the growth is
            # glibc keeping freed memory in per-thread arenas rather than the director holding data
            results["director_memory"] += bench_memory(
                workdir, sorted({min(envoy_counts), max(envoy_counts)}), memory_mb, memory_rounds, args.samples,
                args.experiment_timeout, MALLOC_TUNED)
    finally:
        if args.keep_workdir:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["total_wall_s"] = time.perf_counter() - started
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    print()
    print(report(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {out} ({results['total_wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
