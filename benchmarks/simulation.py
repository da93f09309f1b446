#!/usr/bin/env python
"""``make bench-simulation``: this project's simulation beside Flower's simulation engine and a hand-written floor.

The seed tutorial's CNN on the shared CIFAR-10 subset, split over ``--envoys`` envoys by
``partition.dirichlet(alpha)`` (the test images by the same partitioner), ``--per-round`` envoys sampled per
round (the director's own sampling rule, so every run trains the same clients), one local epoch each (batches of
``sim_model.BATCH``, masked), RESET (each participant starts from the round's model with a fresh optimizer),
FedAvg, ``--rounds`` rounds. Each run is a process of its own, its process tree's resident memory sampled:

- ``floor``: a plain loop of the jitted step over the same clients, FedAvg in numpy, nothing else;
- ``sequential``: ``SimulatedFederation`` with Python-loop tasks (run envoy by envoy);
- ``ray``: the sequential tasks on ``SimulatedFederation(backend="ray")``, one actor per CPU (as Flower's engine);
- ``vectorised``: ``SimulatedFederation`` with ``vectorized=True`` tasks (cohorts under one ``jax.vmap``), for
  ``--vectorised-rounds`` rounds (slow on CPUs: see benchmarks/README.md);
- ``flower``: ``flwr.simulation.start_simulation`` (Ray backend, ``.venv-flower``), NumPyClients over the same
  shards, a FedAvg that picks the same clients (``simulation_flower.py``);
- ``memory N``: a tiny vectorised model with a fixed cohort over N envoys, for how memory grows with N.

Reported: seconds per round (the first, with compiles, and the median of the rest), clients per second, peak
memory of the process tree, XLA compilations after the first round (recompilations: in the process that trains;
Flower's in its actors, summed; with Ray, the driver's only), and each run's ratio to the floor.

    python benchmarks/simulation.py [--envoys 1000 --per-round 100 --rounds 5 --alpha 0.3]
                                    [--runs floor sequential vectorised flower] [--memory-envoys 100 1000 10000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "envoy"))

DATA = REPO.parent / "shared" / "data" / "cifar10-subset"
RUNS = ("floor", "sequential", "ray", "vectorised", "flower")


# ----------------------------------------------------------------------------- shared set-up
def load(data_dir: Path):
    from cifar10_shard_descriptor import CIFAR10ShardDescriptor

    shard = CIFAR10ShardDescriptor(rank_worldsize="1, 1", data_dir=str(data_dir))
    train, test = shard.get_split("train"), shard.get_split("valid")
    return (train["image"], train["label"]), (test["image"], test["label"])


def split(config: dict, labels):
    from fedjax_core import partition

    return partition.dirichlet(n_envoys=config["envoys"], alpha=config["alpha"], seed=0, allow_empty=True)(labels)


def chosen(config: dict) -> list[list[int]]:
    """Per round, the envoys (as indices) the director's sampling rule picks: every run trains these."""
    from fedjax_core.director.rules import select_participants

    names = tuple(sorted(f"env_{i}" for i in range(config["envoys"])))
    return [[int(n.split("_")[1]) for n in select_participants(names, config["per_round"], 0, r)]
            for r in range(config["rounds"])]


def result(round_s: list[float], per_round: int, recompiles: int, accuracy: float | None, **extra) -> dict:
    rest = round_s[1:] or round_s
    return {"round_s": round_s, "first_round_s": round_s[0], "steady_round_s": statistics.median(rest),
            "clients_per_s": per_round / statistics.median(rest), "recompiles": recompiles, "accuracy": accuracy,
            **extra}


# ----------------------------------------------------------------------------- the runs (each its own process)
def run_floor(config: dict) -> dict:
    import numpy as np

    import sim_model as m

    (x, y), (xt, yt) = load(Path(config["data_dir"]))
    parts = split(config, y)
    template = m.initial_state()  # its optimizer state is a fresh one: RESET
    model, round_s, first_end = template, [], None
    for clients in chosen(config):
        t0 = time.perf_counter()
        results = []
        for i in clients:
            if len(parts[i]):
                state, _ = m.train_epoch(template.replace(params=model.params), x[parts[i]], y[parts[i]])
                results.append((m.params_of(state), len(parts[i])))
        model = m.with_params(template, [a.astype(np.float32) for a in m.fedavg(results)])
        round_s.append(time.perf_counter() - t0)
        first_end = first_end or time.time()
    recompiles = m.compiles_between(first_end, time.time())
    return result(round_s, config["per_round"], recompiles, m.accuracy(model, xt, yt))


def project_tasks(vectorised: bool):
    import jax.numpy as jnp

    import sim_model as m
    from fedjax_core import TaskInterface

    ti = TaskInterface()
    if vectorised:
        @ti.register_fl_task(model="state", data_loader="data", device="device", optimizer="optimizer",
                             vectorized=True)
        def train(state, data, device, optimizer):
            state, loss = m.epoch(state, data["image"], data["label"], data["mask"])
            return state, {"loss": loss / jnp.maximum(jnp.sum(data["mask"]), 1.0)}

        @ti.register_fl_task(model="state", data_loader="data", device="device", vectorized=True)
        def validate(state, data, device):
            correct, n = m._evaluate(state, data["image"], data["label"], data["mask"])
            return {"accuracy": correct / jnp.maximum(n, 1.0)}
    else:
        @ti.register_fl_task(model="state", data_loader="data", device="device", optimizer="optimizer")
        def train(state, data, device, optimizer):
            state, loss = m.train_epoch(state, data["image"], data["label"])
            return state, {"loss": loss}

        @ti.register_fl_task(model="state", data_loader="data", device="device")
        def validate(state, data, device):
            if not len(data["label"]):
                return {"accuracy": 0.0}
            x, y, mask = m.pad_to(data["image"], data["label"], m.padded(len(data["label"])))
            correct, n = m.evaluate_batch(state, x, y, mask)
            return {"accuracy": float(correct) / float(n)}
    return ti


def run_project(config: dict, vectorised: bool, ray: bool = False) -> dict:
    import sim_model as m
    from fedjax_core import DataInterface, FLExperiment, ModelInterface, partition
    from fedjax_core.records import Stage
    from fedjax_core.simulation import SimulatedFederation

    (x, y), (xt, yt) = load(Path(config["data_dir"]))
    options = {"backend": "ray", "ray_options": {"actors": os.cpu_count()}} if ray else {}
    fed = SimulatedFederation.from_arrays(
        train=(x, y), valid=(xt, yt), vectorize=vectorised, max_cohort=config["per_round"],
        partition=partition.dirichlet(n_envoys=config["envoys"], alpha=config["alpha"], seed=0, allow_empty=True),
        **options)
    try:
        exp = FLExperiment(federation=fed, experiment_name="bench")
        t0 = time.time()
        exp.start(model_provider=ModelInterface(model=m.initial_state()), task_keeper=project_tasks(vectorised),
                  data_loader=DataInterface(), rounds_to_train=config["rounds"],
                  envoys_per_round=config["per_round"], sampling_seed=0, opt_treatment="RESET")
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        status = exp.get_experiment_status()
        if status.state != "finished":
            raise RuntimeError(f"the simulated experiment ended {status.state}: {status.error}")
        ends = sorted(e.timestamp for e in exp.history if e.stage == Stage.ROUND and not e.envoy)
        round_s = [b - a for a, b in zip([t0, *ends], ends)][:config["rounds"]]
        want = chosen(config)
        same = all(sorted(int(n.split("_")[1]) for n in status.participants[r]) == sorted(want[r])
                   for r in range(config["rounds"]))
        model = exp.get_last_model()
        recompiles = m.compiles_between(ends[0], ends[-1])  # in this process (with Ray: the driver's only)
        return result(round_s, config["per_round"], recompiles, m.accuracy(model, xt, yt), same_clients=same)
    finally:
        fed.close()


def run_memory(config: dict, n_envoys: int) -> dict:
    """A tiny vectorised linear model, a fixed cohort of ``per_round`` envoys over ``n_envoys`` (20,000 samples)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax.training import train_state

    from fedjax_core import DataInterface, FLExperiment, ModelInterface, TaskInterface, partition
    from fedjax_core.simulation import SimulatedFederation

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 16)).astype(np.float32)
    y = (x @ rng.normal(size=(16, 4))).argmax(1).astype(np.int32)
    state = train_state.TrainState.create(apply_fn=lambda p, x: x @ p["w"], params={"w": jnp.zeros((16, 4))},
                                          tx=optax.sgd(0.1))
    ti = TaskInterface()

    @ti.register_fl_task(model="state", data_loader="data", device="device", optimizer="optimizer", vectorized=True)
    def train(state, data, device, optimizer):
        def loss(p):
            losses = optax.softmax_cross_entropy_with_integer_labels(state.apply_fn(p, data["image"]), data["label"])
            return jnp.sum(losses * data["mask"]) / jnp.maximum(jnp.sum(data["mask"]), 1.0)
        value, grads = jax.value_and_grad(loss)(state.params)
        return state.apply_gradients(grads=grads), {"loss": value}

    @ti.register_fl_task(model="state", data_loader="data", device="device", vectorized=True)
    def validate(state, data, device):
        hits = (state.apply_fn(state.params, data["image"]).argmax(1) == data["label"]) * data["mask"]
        return {"accuracy": jnp.sum(hits) / jnp.maximum(jnp.sum(data["mask"]), 1.0)}

    fed = SimulatedFederation.from_arrays(train=(x, y), valid=(x[:n_envoys * 2], y[:n_envoys * 2]),
                                          partition=partition.iid(n_envoys=n_envoys, seed=0),
                                          max_cohort=config["per_round"])
    try:
        exp = FLExperiment(federation=fed, experiment_name="memory")
        t0 = time.perf_counter()
        exp.start(model_provider=ModelInterface(model=state), task_keeper=ti, data_loader=DataInterface(),
                  rounds_to_train=config["rounds"], envoys_per_round=config["per_round"], sampling_seed=0)
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        return {"envoys": n_envoys, "wall_s": time.perf_counter() - t0, "state": exp.get_experiment_status().state}
    finally:
        fed.close()


# ----------------------------------------------------------------------------- the orchestrator
class TreeMemory:
    """The peak, over time, of the summed resident memory of a process and its descendants (sampled)."""

    def __init__(self, pid: int, every_s: float = 0.2):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)
        self._thread.start()

    def _sample(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def tree_rss(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def spawn(kind: str, config: dict, python: str = sys.executable, script: Path = Path(__file__),
          env: dict | None = None) -> dict:
    """Run one measurement in a process of its own; its RESULT line, with the tree's peak memory."""
    from fedjax_core.local import Process

    p = Process([python, "-u", str(script), "--one", kind, "--config", json.dumps(config)],
                env={"JAX_PLATFORMS": "cpu", **(env or {})}, name=kind)
    memory = TreeMemory(p.proc.pid)
    try:
        line = p.wait_for(r"^RESULT (.*)$", timeout=config["timeout_s"]).group(1)
    finally:
        peak = memory.stop()
        p.stop()
    return {**json.loads(line), "peak_rss_mb": peak / 2**20}


def run_flower(config: dict) -> dict:
    from peers import ensure_flower_venv

    python = ensure_flower_venv()
    env = {"PYTHONPATH": os.pathsep.join(map(str, (REPO, HERE, REPO / "envoy"))), "RAY_USAGE_STATS_ENABLED": "0"}
    return spawn("flower", config, python=str(python), script=HERE / "simulation_flower.py", env=env)


def table(results: dict) -> str:
    floor = results["runs"].get("floor", {}).get("steady_round_s")
    lines = ["| run | first round s | steady round s | clients/s | x floor | peak memory MiB | recompiles | accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["runs"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | | |")
            continue
        ratio = f"{r['steady_round_s'] / floor:.2f}" if floor else "-"
        accuracy = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
        lines.append(f"| {name} | {r['first_round_s']:.2f} | {r['steady_round_s']:.3f} | {r['clients_per_s']:.1f} | "
                     f"{ratio} | {r['peak_rss_mb']:.0f} | {r.get('recompiles', '-')} | {accuracy} |")
    if results.get("memory"):
        lines += ["", "| envoys (tiny model, cohort fixed) | peak memory MiB | wall s |", "| --- | --- | --- |"]
        lines += [f"| {m['envoys']} | {m['peak_rss_mb']:.0f} | {m['wall_s']:.1f} |" for m in results["memory"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envoys", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vectorised-rounds", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=RUNS)
    parser.add_argument("--memory-envoys", nargs="*", type=int, default=[100, 1000, 10_000])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "simulation.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child: one measurement
        import sim_model

        sim_model.count_compiles()
        config = json.loads(args.config)
        if args.one == "floor":
            out = run_floor(config)
        elif args.one in ("sequential", "vectorised", "ray"):
            out = run_project(config, args.one == "vectorised", ray=args.one == "ray")
        else:
            out = run_memory(config, int(args.one.split(":")[1]))
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    import jax

    config = {"envoys": args.envoys, "per_round": args.per_round, "rounds": args.rounds, "alpha": args.alpha,
              "data_dir": str(args.data_dir), "timeout_s": args.timeout_s}
    results = {"config": config, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                             "jax": jax.__version__, "loadavg_at_start": os.getloadavg()},
               "runs": {}, "memory": []}
    for run in args.runs:
        print(f"{run} ...", flush=True)
        try:
            if run == "flower":
                results["runs"][run] = run_flower(config)
            else:
                rounds = args.vectorised_rounds if run == "vectorised" else args.rounds
                results["runs"][run] = spawn(run, {**config, "rounds": rounds})
        except Exception as exc:  # one failed run is reported, the others still run
            results["runs"][run] = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
        print(f"  {json.dumps(results['runs'][run])[:300]}", flush=True)
    for n in args.memory_envoys:
        print(f"memory, {n} envoys ...", flush=True)
        results["memory"].append(spawn(f"memory:{n}", {**config, "rounds": 3}))
    text = table(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
