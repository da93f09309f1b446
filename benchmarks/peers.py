#!/usr/bin/env python
"""``make bench-peers``: this project and Flower side by side, with the same model code, shards and seeds.

Three cases, each run on both systems, one after the other, on loopback:

1. the seed tutorial's CNN on the shared CIFAR-10 subset, 2 envoys / clients (shards 1..2 of 2,
   contiguous), ``--rounds`` rounds (default 5), one epoch per round, FedAvg, optimizer
   state reset every round (Flower's NumPyClient moves only params). Steady round time
   (median of rounds 1..R-1), experiment overhead (end to end minus R x floor) and accuracy
   per round. The floor: 2 plain processes doing a round's compute on their shard (validate the
   incoming model, train one epoch, validate the trained one) with the same jitted steps and
   batches, in parallel, no federation.
2. a 256 MiB MLP, 4 envoys: a task that returns the model slightly changed (a jitted
   ``params + 1e-6``, the same on both). Settled round time; the director's (Flower: the
   server's) peak RSS (VmHWM) as a multiple of the model size.
3. the same with a 4 MiB model and 32 envoys (``--case3-envoys``).

This project: ``python -m fedjax_core director/envoy start`` daemons (``bench.BenchStack``)
and ``FLExperiment``. Flower 1.38.0: the legacy ``flwr.server.start_server`` and one
``flwr.client.start_client`` (NumPyClient) process per shard (``peers_flower.py``), run from
its own virtual environment ``.venv-flower`` (created on first use, pinned to this venv's
jax, jaxlib, flax, optax and numpy). Both train with ``peers_model`` (the seed's
``train_step``/``eval_step`` with a trace counter), so a JAX recompilation after round 0
shows as a count.

    python benchmarks/peers.py [--cases 1 2 3] [--rounds 5] [--out bench-results/peers.json]

Prints a table of ratios (this project / Flower, this project / floor), writes JSON and a PNG
(round time and accuracy per round of case 1, both systems). MB = MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
from fedjax_core.local import Process, free_port  # noqa: E402

MiB = 1 << 20
FLWR_VERSION = "1.38.0"
PINNED = ("jax", "jaxlib", "flax", "optax", "numpy")  # as in this project's venv: the model code runs the same
DATA = REPO.parent / "shared" / "data" / "cifar10-subset"
FLOWER_VENV = REPO / ".venv-flower"
CASES = {1: {"envoys": 2, "model": "cnn"}, 2: {"envoys": 4, "model_mb": 256.0}, 3: {"envoys": 32, "model_mb": 4.0}}
STAGE_AGG = "aggregated_model_validation"


# ----------------------------------------------------------------------------- Flower's venv
def flower_pins() -> list[str]:
    from importlib.metadata import version

    # the simulation extra (Ray) serves make bench-simulation; bench-peers does not use it
    return [f"flwr[simulation]=={FLWR_VERSION}"] + [f"{name}=={version(name)}" for name in PINNED]


def ensure_flower_venv(venv: Path = FLOWER_VENV) -> Path:
    """``venv``'s python with the pinned Flower installed; reused while its stamp names the same pins."""
    pins = flower_pins()
    python, stamp = venv / "bin" / "python", venv / ".installed"
    if python.exists() and stamp.exists() and stamp.read_text().split() == pins:
        return python
    print(f"  creating {venv} with {' '.join(pins)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True)
    stamp.write_text("\n".join(pins) + "\n")
    return python


# ----------------------------------------------------------------------------- figures from runs
def recompiles(reports: list[tuple[str, int, int]]) -> int:
    """Traces after each participant's first round: (participant, round, cumulative traces) reports."""
    total = 0
    for who in {w for w, _, _ in reports}:
        mine = [(rnd, n) for w, rnd, n in reports if w == who]
        first = min(rnd for rnd, _ in mine)
        total += max(n for _, n in mine) - max(n for rnd, n in mine if rnd == first)
    return total


def steady(round_times: list[float]) -> float | None:
    """Median of rounds 1.. (round 0 holds start-up and compilation); None with one round."""
    return statistics.median(round_times[1:]) if len(round_times) > 1 else None


def task_seconds(reports: list[tuple], rounds: int) -> list[float]:
    """Per round, the slowest participant's summed task time: (participant, round, traces, task_s) reports."""
    out = []
    for rnd in range(rounds):
        per = {}
        for who, r, _, seconds in reports:
            if r == rnd:
                per[who] = per.get(who, 0.0) + seconds
        out.append(max(per.values(), default=0.0))
    return out


def summarize(round_times: list[float], wall_s: float, accuracy: list, reports: list, memory: dict,
              model_bytes: int, cpu: dict[str, float] | None = None) -> dict:
    """One system's figures for one case. ``reports``: (participant, round, traces, task_s) per task; ``cpu``: the
    CPU seconds each kind of process used from round 0's end to the last round's (:func:`settled_cpu`). The
    overhead needs the floor, measured after both systems ran (:func:`with_overhead`)."""
    rounds = len(round_times)
    tasks = task_seconds(reports, rounds)
    per_round = {k: v / (rounds - 1) for k, v in cpu.items()} if cpu and rounds > 1 else None
    return {"rounds": rounds, "round_times_s": round_times, "steady_round_s": steady(round_times), "wall_s": wall_s,
            "settled_cpu_s_per_round": per_round,
            "overhead_s": None, "accuracy": accuracy,
            "recompiles": recompiles([(w, r, n) for w, r, n, _ in reports]), "task_s": tasks,
            "steady_outside_tasks_s": steady([t - c for t, c in zip(round_times, tasks)]),
            "model_bytes": model_bytes, **memory, "peak_rss_per_model": memory["peak_rss_bytes"] / model_bytes}


# ----------------------------------------------------------------------------- this project
def project_stack(workdir: Path, case: int, data_dir: Path, sandbox: bool = True) -> bench.BenchStack:
    """``sandbox=False``: the envoys run workers unsandboxed (settings.sandbox), to measure what it costs."""
    import yaml

    stack = bench.BenchStack(workdir, CASES[case]["envoys"], samples=32)
    if case == 1:  # the CIFAR-10 shards instead of the synthetic ones
        shutil.copyfile(REPO / "envoy" / "cifar10_shard_descriptor.py", workdir / "cifar10_shard_descriptor.py")
        for rank, path in enumerate(stack.envoy_configs, 1):
            path.write_text(yaml.safe_dump({
                "params": {"cuda_devices": [], "work_dir": str(workdir / "envoy_workspace")},
                "optional_plugin_components": {},
                "shard_descriptor": {"template": "cifar10_shard_descriptor.CIFAR10ShardDescriptor",
                                     "params": {"rank_worldsize": f"{rank}, {len(stack.names)}",
                                                "data_dir": str(data_dir)}}}))
    if not sandbox:
        for path in stack.envoy_configs:
            config = yaml.safe_load(path.read_text())
            config["settings"] = {"sandbox": {"experiment_code_may_read_envoy_secrets": True}}
            path.write_text(yaml.safe_dump(config))
    return stack


def run_project(case: int, workdir: Path, rounds: int, data_dir: Path, timeout_s: float, sandbox: bool = True) -> dict:
    """One experiment on a fresh director and envoys; its figures."""
    import peers_model
    import seed_cnn
    from fedjax_core import DataInterface

    if case == 1:
        state, tasks, data = seed_cnn.create_train_state(), peers_model.project_tasks("cnn"), seed_cnn.ShardSplits()
    else:
        state, tasks, data = peers_model.mlp_state(CASES[case]["model_mb"]), peers_model.project_tasks("nudge"), \
            DataInterface()
    import jax

    model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state.params))
    stack = project_stack(workdir, case, data_dir, sandbox)
    sampler = None
    try:
        stack.start()
        roots = {p.proc.pid: ("director", "director") if p is stack.director else ("envoy daemons", "workers")
                 for p in stack.processes}
        sampler = bench.TreeCpuSampler(lambda: roots).start()
        exp, _, wall_s = bench.follow_experiment(stack, f"peers-case{case}", state, tasks, data, rounds, timeout_s,
                                                 client_id="peers")
        memory = bench.proc_status(stack.director.proc.pid)  # finished, not yet stopped
        sampler.sample()
    except BaseException:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        stack.stop()
    events = exp.history
    ends = {e.round: e.timestamp for e in events if e.stage == "round" and not e.envoy and e.round < rounds}
    times = {e.round: e.round_time_s for e in events if e.stage == "round" and not e.envoy and e.round < rounds}
    accuracy = {e.round: {m.name: m.value for m in e.metrics}.get("validation_accuracy")
                for e in events if e.stage == STAGE_AGG and not e.envoy}
    reports = [(e.envoy, e.round, int(metrics["traces"]), metrics.get("task_s", 0.0)) for e in events if e.envoy
               for metrics in [{m.name: m.value for m in e.metrics}] if "traces" in metrics]
    return summarize([times[r] for r in sorted(times)], wall_s,
                     [accuracy.get(r) for r in range(1, rounds + 1)] if case == 1 else [], reports,
                     {"peak_rss_bytes": memory["VmHWM"], "baseline_rss_bytes": stack.baseline["VmRSS"]},
                     model_bytes, settled_cpu(sampler, [ends[r] for r in sorted(ends)]))


def settled_cpu(sampler: bench.TreeCpuSampler, round_ends: list[float]) -> dict[str, float] | None:
    """CPU seconds of each kind of process from the end of round 0 to the end of the last round (wall-clock
    times); None with fewer than two rounds."""
    return sampler.between(round_ends[0], round_ends[-1]) if len(round_ends) > 1 else None


# ----------------------------------------------------------------------------- Flower
def wait_listening(port: int, process: Process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.output()[-4000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{process.name} does not listen on {port} after {timeout} s")


def run_flower(case: int, python: Path, rounds: int, data_dir: Path, timeout_s: float) -> dict:
    """Flower's server and one client process per shard; the same figures."""
    n, port = CASES[case]["envoys"], free_port()
    env = {"PYTHONPATH": os.pathsep.join(map(str, (REPO, HERE, REPO / "envoy"))), "JAX_PLATFORMS": "cpu"}
    script = [str(python), "-u", str(HERE / "peers_flower.py")]
    model = ["--case", "cnn", "--data-dir", str(data_dir)] if case == 1 else \
        ["--case", "nudge", "--model-mb", str(CASES[case]["model_mb"])]
    processes: list[Process] = []
    sampler = bench.TreeCpuSampler(lambda: {p.proc.pid: ("server", "server") if p.name == "flower-server"
                                            else ("clients", "clients") for p in processes}).start()
    try:
        t0 = time.perf_counter()
        server = Process([*script, "server", "--port", str(port), "--clients", str(n), "--rounds", str(rounds),
                          *(["--evaluate"] if case == 1 else [])], env=env, name="flower-server")
        processes.append(server)
        wait_listening(port, server)
        for rank in range(1, n + 1):
            processes.append(Process([*script, "client", "--port", str(port), "--clients", str(n), "--rank", str(rank),
                                      *model], env=env, name=f"flower-client{rank}"))
        result = json.loads(server.wait_for(r"^FLOWER RESULT (.*)$", timeout=timeout_s).group(1))
        wall_s = time.perf_counter() - t0
        sampler.sample()
    except BaseException:
        for p in processes:
            print(f"----- {p.name} -----\n{p.output()[-3000:]}", file=sys.stderr)
        raise
    finally:
        sampler.stop()
        for p in reversed(processes):
            p.stop()
    rows = result["rounds"]
    failed = [r["round"] for r in rows if r.get("fit_failures") or r.get("evaluate_failures")]
    if failed or len(rows) != rounds:
        raise RuntimeError(f"case {case}: Flower ran {len(rows)} of {rounds} rounds; failures in rounds {failed}")
    reports = [(m["rank"], r["round"], int(m["traces"]), m["task_s"]) for r in rows for m in r["fit"] + r["evaluate"]]
    model_bytes = _model_bytes(case)
    return summarize([r["end"] - r["start"] for r in rows], wall_s,
                     [r.get("accuracy") for r in rows] if case == 1 else [], reports,
                     {"peak_rss_bytes": result["peak_rss_bytes"], "baseline_rss_bytes": result["baseline_rss_bytes"]},
                     model_bytes, settled_cpu(sampler, [r["end"] for r in rows]))


def _model_bytes(case: int) -> int:
    import jax

    import peers_model
    import seed_cnn

    params = (seed_cnn.create_train_state().params if case == 1
              else peers_model.mlp_params(CASES[case]["model_mb"], shapes_only=True))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------- the compute floor
def floor_worker(rank: int, world: int, data_dir: Path, epochs: int) -> None:
    """One plain process doing a seed round's compute: validate the incoming model, train one epoch, validate
    the trained one. A warm-up round (compiles), then ``epochs`` timed rounds."""
    sys.path.insert(0, str(REPO / "envoy"))
    import peers_model
    import seed_cnn
    from cifar10_shard_descriptor import CIFAR10ShardDescriptor

    shard = CIFAR10ShardDescriptor(rank_worldsize=f"{rank}, {world}", data_dir=data_dir)
    train, valid = shard.get_split("train"), shard.get_split("valid")
    initial = seed_cnn.create_train_state()
    round_s, epoch_s, val_s = [], [], []
    for epoch in range(epochs + 1):
        t0 = time.perf_counter()
        peers_model.evaluate(initial, valid)
        t1 = time.perf_counter()
        state, _ = peers_model.train_epoch(initial, train, epoch)
        t2 = time.perf_counter()
        peers_model.evaluate(state, valid)
        t3 = time.perf_counter()
        if epoch:
            round_s.append(t3 - t0)
            epoch_s.append(t2 - t1)
            val_s.append(t3 - t2)
    print("FLOOR RESULT " + json.dumps({"rank": rank, "round_s": round_s, "epoch_s": epoch_s, "validation_s": val_s,
                                         "traces": peers_model.traces()}), flush=True)


def run_floor(data_dir: Path, world: int, epochs: int, timeout_s: float) -> list[dict]:
    """``world`` floor workers in parallel; each one's timed rounds (see :func:`combine_floors`)."""
    processes = []
    try:
        for rank in range(1, world + 1):
            processes.append(Process([sys.executable, "-u", str(Path(__file__).resolve()), "--floor-worker", str(rank),
                                      str(world), "--data-dir", str(data_dir), "--floor-epochs", str(epochs)],
                                     env={"JAX_PLATFORMS": "cpu"}, name=f"floor{rank}"))
        return [json.loads(p.wait_for(r"^FLOOR RESULT (.*)$", timeout=timeout_s).group(1)) for p in processes]
    finally:
        for p in processes:
            p.stop()


def measure_floor(when: str, args: argparse.Namespace) -> list[dict]:
    """Case 1's floor, measured ``when`` ("before" or "after") both systems' runs."""
    print(f"case 1: compute floor {when} (2 processes, {args.floor_epochs} timed rounds each) ...", flush=True)
    return run_floor(args.data_dir, CASES[1]["envoys"], args.floor_epochs, args.experiment_timeout)


def combine_floors(before: list[dict], after: list[dict]) -> dict:
    """The floor from two measurements bracketing both systems' runs, so that the machine drifting during
    the case (it did, by 5%) moves the floor as it moves the runs: per rank, the median of every timed round
    of both; the floor is the slower rank's. The epoch and validation pass alone likewise, and each
    measurement's own floor beside them."""
    def slowest(key: str, *measurements: list[dict]) -> float:
        ranks = {w["rank"] for m in measurements for w in m}
        return max(statistics.median([x for m in measurements for w in m if w["rank"] == rank for x in w[key]])
                   for rank in ranks)

    return {"floor_s": slowest("round_s", before, after), "epoch_s": slowest("epoch_s", before, after),
            "validation_s": slowest("validation_s", before, after), "before_s": slowest("round_s", before),
            "after_s": slowest("round_s", after), "workers": before + after}


def with_overhead(s: dict, floor_s: float) -> dict:
    """``s`` (one system's figures) with its overhead against ``floor_s``: end to end minus rounds x floor."""
    return {**s, "overhead_s": s["wall_s"] - s["rounds"] * floor_s}


# ----------------------------------------------------------------------------- table
GOALS = {  # the default per kind of metric: lead Flower, no recompilation, no accuracy given up
    "time": ("< 1.00x Flower", lambda row: row["ratio"] is not None and row["ratio"] < 1.0),
    "memory": ("< 1.00x Flower", lambda row: row["ratio"] is not None and row["ratio"] < 1.0),
    "accuracy": (">= Flower - 0.02", lambda row: None not in (row["project"], row["flower"])
                 and row["project"] >= row["flower"] - 0.02),
    "recompiles": ("0", lambda row: row["project"] == 0),
    "rate": ("> 1.00x Flower", lambda row: row["ratio"] is not None and row["ratio"] > 1.0),
}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive."""
    return a / b if a is not None and b is not None and b > 0 else None


def round_rate(s: dict, envoys: int) -> float | None:
    """MiB a settled round moves (every envoy downloads and uploads the model once) per second."""
    return 2 * s["model_bytes"] * envoys / MiB / s["steady_round_s"] if s.get("steady_round_s") else None


def build_rows(cases: dict, reference: dict | None = None) -> list[dict]:
    """Table rows (case, metric, project, Flower, ratio, project / floor, goal, met) from the per-case results;
    with ``reference`` (bench.transport_reference), the large-model cases also get their transfer rate."""
    rows = []

    def add(case, metric, kind, project, flower, floor=None, goal=None):
        """``goal``: (text, test) from issue 9's table where it sets one; else the kind's default."""
        text, test = goal or GOALS[kind]
        row = {"case": case, "metric": metric, "kind": kind, "project": project, "flower": flower,
               "ratio": ratio(project, flower) if kind != "recompiles" else None,
               "vs_floor": ratio(project, floor), "goal": text}
        row["met"] = bool(None not in (project, flower) and test(row))
        rows.append(row)

    def at_most(limit: float, text: str, key: str = "project"):
        return text, lambda row: row[key] is not None and row[key] <= limit

    for key in sorted(cases, key=int):
        c, label = cases[key], case_label(int(key), cases[key])
        p, f = c["project"], c["flower"]
        floor = c.get("floor", {}).get("floor_s")
        if int(key) == 1:
            add(label, f"steady round s (median rounds 1..{p['rounds'] - 1})", "time", p["steady_round_s"],
                f["steady_round_s"], floor, at_most(1.05, "<= 1.05x floor", "vs_floor"))
            add(label, f"overhead s (end to end - {p['rounds']} x floor)", "time", p["overhead_s"], f["overhead_s"],
                floor, at_most(2.0, "<= 2 s"))
            add(label, f"accuracy after round {p['rounds']}", "accuracy", _last(p["accuracy"]), _last(f["accuracy"]))
        else:
            round_goal = {2: at_most(2.5, "<= 2.5 s"), 3: at_most(0.25, "<= 0.25 s")}.get(int(key))
            add(label, "settled round s", "time", p["steady_round_s"], f["steady_round_s"], goal=round_goal)
            memory_goal = None
            if int(key) == 2:
                memory_goal = at_most(2.0, "<= 2x model")
            elif int(key) == 3:
                limit = (250 << 20) / p["model_bytes"]
                memory_goal = at_most(limit, f"<= 250 MiB ({limit:.1f}x)")
            add(label, "server peak RSS / model", "memory", p["peak_rss_per_model"], f["peak_rss_per_model"],
                goal=memory_goal)
            add(label, "server (peak - baseline) / model", "memory", _growth(p), _growth(f))
            if reference:
                bare = (reference["upload_MBps"] + reference["download_MBps"]) / 2
                envoys = c.get("envoys", CASES[int(key)]["envoys"])
                rates = [ratio(round_rate(s, envoys), bare) for s in (p, f)]
                add(label, f"round MiB/s / bare gRPC ({bare:.0f} MiB/s)", "rate", *rates,
                    goal=(">= 0.8x bare gRPC", lambda row: row["project"] is not None and row["project"] >= 0.8))
        add(label, "recompilations after round 0", "recompiles", p["recompiles"], f["recompiles"])
    return rows


def _growth(s: dict) -> float:
    return (s["peak_rss_bytes"] - s["baseline_rss_bytes"]) / s["model_bytes"]


def _last(values: list):
    return values[-1] if values else None


def case_label(case: int, c: dict) -> str:
    envoys = c.get("envoys", CASES[case]["envoys"])
    model = "seed CNN" if case == 1 else f"{c['project']['model_bytes'] / MiB:.0f} MiB"
    return f"{case}: {model}, {envoys} envoys"


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    headers = ["case", "metric", "this project", "Flower", "project/Flower", "project/floor", "goal", "met"]
    fmt = {"time": ".3f", "memory": ".2f", "accuracy": ".4f", "recompiles": "d", "rate": ".2f"}
    cells = [[r["case"], r["metric"], _cell(r["project"], fmt[r["kind"]]), _cell(r["flower"], fmt[r["kind"]]),
              _cell(r["ratio"], ".2f") + ("x" if r["ratio"] is not None else ""),
              _cell(r["vs_floor"], ".2f") + ("x" if r["vs_floor"] is not None else ""),
              r["goal"], "yes" if r["met"] else "NO"] for r in rows]
    widths = [max(len(line[i]) for line in [headers, *cells]) for i in range(len(headers))]
    line = lambda cs: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))  # noqa: E731
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, cells)])


def report(results: dict) -> str:
    m = results["machine"]
    out = [f"Machine: {m['nproc']} CPUs ({m.get('cpu_model', '?')}), {m['platform']}, Python {m['python']}, "
           f"jax {m['jax']}, flwr {FLWR_VERSION}; load average {m['loadavg_at_start'][0]:.1f} at start, "
           f"{m.get('loadavg_at_end', [float('nan')])[0]:.1f} at end; {results['date']}", "",
           format_table(build_rows(results["cases"], results.get("transport_reference")))]
    for key, c in sorted(results["cases"].items(), key=lambda kv: int(kv[0])):
        for name in ("project", "flower"):
            s = c[name]
            out.append(f"case {key} {name:<7}: round times " + " ".join(f"{t:.2f}" for t in s["round_times_s"])
                       + " s; tasks (slowest) " + " ".join(f"{t:.2f}" for t in s["task_s"])
                       + f" s; outside tasks {_cell(s['steady_outside_tasks_s'], '.3f')} s"
                       + f"; end to end {s['wall_s']:.1f} s; server peak {s['peak_rss_bytes'] / MiB:.0f} MiB "
                       f"(baseline {s['baseline_rss_bytes'] / MiB:.0f}); recompilations {s['recompiles']}"
                       + (" (zero)" if s["recompiles"] == 0 else " (NOT zero)")
                       + ("; accuracy " + " ".join(_cell(a, ".4f") for a in s["accuracy"]) if s["accuracy"] else "")
                       + _cpu_text(s.get("settled_cpu_s_per_round")))
        if "floor" in c:
            floor = c["floor"]
            out.append(f"case {key} floor  : {floor['floor_s']:.3f} s per round (2 plain processes: validate, train "
                       f"one epoch, validate; median, slower one; {_cell(floor.get('before_s'), '.3f')} before the "
                       f"runs, {_cell(floor.get('after_s'), '.3f')} after): an epoch "
                       f"{_cell(floor.get('epoch_s'), '.3f')} s, a validation pass {floor['validation_s']:.3f} s")
    return "\n".join(out)


def _cpu_text(cpu: dict[str, float] | None) -> str:
    if not cpu:
        return ""
    return "; CPU s per settled round: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))


def plot(results: dict, path: Path) -> bool:
    """Round time and accuracy per round of case 1, both systems; False when there is no case 1."""
    c = results["cases"].get("1")
    if not c:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label, style in (("project", "fedjax-core", "o-"), ("flower", f"Flower {FLWR_VERSION}", "s--")):
        s = c[name]
        ax_t.plot(range(len(s["round_times_s"])), s["round_times_s"], style, label=label)
        if s["accuracy"]:
            ax_a.plot(range(1, len(s["accuracy"]) + 1), s["accuracy"], style, label=label)
    if c.get("floor"):
        ax_t.axhline(c["floor"]["floor_s"], color="gray", linestyle=":", label="floor (a round's compute, no federation)")
    ax_t.set(xlabel="round (0 includes start-up and compilation)", ylabel="round time (s)",
             title="Seed CNN, CIFAR-10 subset, 2 envoys")
    ax_a.set(xlabel="after round", ylabel="validation accuracy (aggregated model)", title="Accuracy per round")
    for ax in (ax_t, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every case (>= 2 for a steady figure)")
    parser.add_argument("--case3-envoys", type=int, default=CASES[3]["envoys"], help="envoys/clients of case 3")
    parser.add_argument("--floor-epochs", type=int, default=3, help="timed epochs of each floor process")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--flower-venv", type=Path, default=FLOWER_VENV)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "peers.json")
    parser.add_argument("--png", type=Path, default=REPO / "bench-results" / "peers.png")
    parser.add_argument("--experiment-timeout", type=float, default=900.0, help="seconds before a run is killed")
    parser.add_argument("--unsandboxed", action="store_true",
                        help="this project's workers without their sandbox (what the sandbox costs, side by side)")
    parser.add_argument("--floor-worker", type=int, nargs=2, metavar=("RANK", "WORLD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_worker:
        floor_worker(*args.floor_worker, args.data_dir, args.floor_epochs)
        return 0
    if 1 in args.cases and not (args.data_dir / "cifar-10-batches-bin").is_dir() \
            and not (args.data_dir / "data_batch_1.bin").is_file():
        print(f"no CIFAR-10 binary batches under {args.data_dir} (pass --data-dir)", file=sys.stderr)
        return 2
    CASES[3]["envoys"] = args.case3_envoys
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the finally blocks that stop processes

    started = time.perf_counter()
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(f"  note: load average {load:.1f} on {cpus} CPUs: other work is running, timings will be noisy",
              flush=True)
    python = ensure_flower_venv(args.flower_venv)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": bench.machine_info(),
               "config": {"rounds": args.rounds, "cases": {k: dict(CASES[k]) for k in args.cases},
                          "flower": flower_pins(), "opt_treatment": "RESET", "aggregation": "FedAvg",
                          "data_dir": str(args.data_dir), "sandbox": not args.unsandboxed}, "cases": {}}
    if {2, 3} & set(args.cases):
        print("bare gRPC on loopback (the transfer rate's reference) ...", flush=True)
        results["transport_reference"] = bench.transport_reference(256)
    with tempfile.TemporaryDirectory(prefix="fedjax-peers-") as tmp:
        for case in args.cases:
            entry = {"envoys": CASES[case]["envoys"]}
            before = measure_floor("before", args) if case == 1 else None
            print(f"case {case}: this project, {CASES[case]['envoys']} envoys, {args.rounds} rounds ...", flush=True)
            entry["project"] = run_project(case, Path(tmp) / f"case{case}", args.rounds, args.data_dir,
                                           args.experiment_timeout, sandbox=not args.unsandboxed)
            print(f"case {case}: Flower, {CASES[case]['envoys']} clients, {args.rounds} rounds ...", flush=True)
            entry["flower"] = run_flower(case, python, args.rounds, args.data_dir, args.experiment_timeout)
            if case == 1:
                entry["floor"] = combine_floors(before, measure_floor("after", args))
                entry["project"], entry["flower"] = (with_overhead(entry[k], entry["floor"]["floor_s"])
                                                     for k in ("project", "flower"))
            results["cases"][str(case)] = entry
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["total_wall_s"] = time.perf_counter() - started
    results["rows"] = build_rows(results["cases"], results.get("transport_reference"))
    text = report(results)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    drawn = plot(results, args.png)
    print(f"\nresults written to {args.out}" + (f" and {args.png}" if drawn else "")
          + f" ({results['total_wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
