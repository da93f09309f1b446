#!/usr/bin/env python
"""``make bench-privacy``: accuracy against epsilon for central and local differential privacy.

The seed tutorial's CNN (``seed_cnn.CNN``, SGD 0.01 momentum 0.9, one local epoch in masked batches of
``sim_model.BATCH``, the tasks of ``make bench-simulation``) on the shared CIFAR-10 subset, split over
``--envoys`` simulated envoys (``SimulatedFederation.from_arrays``, ``partition.iid`` or
``partition.dirichlet``; the test images by the same partitioner), ``--per-round`` envoys sampled per round
(``sampling_seed=0``: every run trains the same envoys), RESET, FedAvg, ``--rounds`` rounds. Runs:

- ``none``: no differential privacy (FedAvg weights by sample counts);
- ``central z``: ``CentralDP(noise_multiplier=z, clipping_norm=C, delta)`` for each ``--noise-multipliers`` z,
  clipped on the director (unweighted mean of the clipped updates, noise std z * C / participants);
- ``local eps``: ``LocalDP(clipping_norm=C, epsilon=eps, delta)`` for each ``--local-epsilons`` eps.

First, before any run, it measures the L2 norms of updates (one participant's change of the params over one
local epoch, RESET) from the initial model over ``--norm-envoys`` envoys, and again from the no-DP run's final
model: ``--clipping-norm`` is meant to be chosen from these (the JSON keeps them). The table gives, per run,
the final aggregated validation accuracy (the ``aggregated_model_validation`` stage of the last round, every
envoy's test split, sample-weighted), the best round's, the epsilon at ``delta`` from the experiment's status,
the epsilon the same rounds would cost without amplification by sampling (q = 1), the noise std on the round's
mean and the wall time. A run whose training diverges (noise large enough that an envoy's loss becomes NaN, which
the director refuses, so the experiment fails) is a result too: its row says in which round. Everything runs in
this one process, one run after another; the norm measurement compiles the step first, so no run pays for it.

    python benchmarks/privacy_accuracy.py [--envoys 20 --per-round 10 --rounds 10 --partition iid]
        [--clipping-norm 0.7 --noise-multipliers 0.3 0.7 1.5 --local-epsilons 10 100]
        [--runs none central local] [--json bench-results/privacy_accuracy.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "envoy"))

DATA = REPO.parent / "shared" / "data" / "cifar10-subset"


def partitioner(args):
    from fedjax_core import partition

    if args.partition == "iid":
        return partition.iid(n_envoys=args.envoys, seed=0)
    return partition.dirichlet(n_envoys=args.envoys, alpha=args.alpha, seed=0, allow_empty=True)


def update_norms(state, x, y, parts, envoys: int) -> list[float]:
    """L2 norm of the change of the params after one local epoch from ``state`` with a fresh optimizer (RESET),
    for the first ``envoys`` envoys that have samples."""
    import numpy as np

    import sim_model as m

    template = m.initial_state()
    start = template.replace(params=state.params)
    before = m.params_of(start)
    norms = []
    for part in [p for p in parts if len(p)][:envoys]:
        trained, _ = m.train_epoch(start, x[part], y[part])
        norms.append(math.sqrt(sum(float(np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2))
                                   for a, b in zip(m.params_of(trained), before))))
    return norms


def norm_summary(norms: list[float]) -> dict:
    ordered = sorted(norms)
    q = lambda f: ordered[min(len(ordered) - 1, int(f * len(ordered)))]  # noqa: E731
    return {"n": len(norms), "min": ordered[0], "p25": q(0.25), "median": statistics.median(ordered),
            "p75": q(0.75), "max": ordered[-1], "norms": norms}


def metric(event, name: str):
    return next((m.value for m in event.metrics if name in (m.name, f"{m.task}/{m.name}")), None)


def run_one(args, label: str, privacy, data) -> dict:
    import simulation
    import sim_model as m
    from fedjax_core import DataInterface, ExperimentFailed, FLExperiment, ModelInterface
    from fedjax_core.records import Stage
    from fedjax_core.simulation import SimulatedFederation

    (x, y), (xt, yt) = data
    fed = SimulatedFederation.from_arrays(train=(x, y), valid=(xt, yt), vectorize=False, partition=partitioner(args))
    try:
        name = "".join(c if c.isalnum() else "_" for c in label)  # "central z=0.3" -> "central_z_0_3"
        exp = FLExperiment(federation=fed, experiment_name=name)
        started = time.perf_counter()
        exp.start(model_provider=ModelInterface(model=m.initial_state()), task_keeper=simulation.project_tasks(False),
                  data_loader=DataInterface(), rounds_to_train=args.rounds, envoys_per_round=args.per_round,
                  sampling_seed=0, opt_treatment="RESET", best_metric="accuracy", privacy=privacy)
        failure = None
        try:
            exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        except ExperimentFailed as exc:  # e.g. noise that made training diverge: a result, kept with its rounds
            failure = str(exc)
        wall = time.perf_counter() - started
        status = exp.get_experiment_status()
        aggregated = {e.round: metric(e, "accuracy") for e in exp.history
                      if e.stage == Stage.AGGREGATED and not e.envoy}
        rounds = {e.round: e for e in exp.history if e.stage == Stage.ROUND and not e.envoy}
        last = rounds[max(rounds)] if rounds else None
        final_model = None if failure else exp.get_last_model()
        return {
            "run": label, "privacy": None if privacy is None else {"type": type(privacy).__name__,
                                                                    **dataclasses.asdict(privacy)},
            "state": status.state, "rounds": args.rounds, "rounds_trained": len(rounds),
            "failure": failure, "failure_short": None if failure is None else short_failure(failure),
            "final_accuracy": aggregated.get(args.rounds),  # the last round: every envoy validates the last model
            "best_accuracy": status.best_value, "best_round": status.best_round,
            "accuracy_per_round": [aggregated.get(r) for r in range(args.rounds + 1)],
            "epsilon": status.epsilon, "delta": status.delta,
            "epsilon_without_sampling": epsilon_without_sampling(privacy, len(rounds)),
            "epsilon_per_round": [metric(rounds[r], "privacy/epsilon") for r in sorted(rounds)],
            # central: the noise std on the mean, z * C / uploads; the first round's (later rounds where envoys
            # dropped out, as when training diverges, have fewer uploads and more noise on the mean)
            "noise_std": metric(rounds[0], "privacy/noise_std") if 0 in rounds else None,
            "noise_std_per_round": [metric(rounds[r], "privacy/noise_std") for r in sorted(rounds)],
            "upload_noise_std": upload_noise_std(privacy),  # local: what each envoy adds to its own update
            "clipping_norm": None if last is None else metric(last, "privacy/clipping_norm"),
            "round_s": [rounds[r].round_time_s for r in sorted(rounds)],
            "wall_s": wall,
            "_model": final_model,
        }
    finally:
        fed.close()


def short_failure(message: str) -> str:
    """The gist of an experiment's failure for the table: what the envoy reported, or the first words."""
    import re

    found = re.search(r"failed in round (\d+).*?reported (\S+ = \S+?):", message, re.S)
    return f"failed in round {found.group(1)}: {found.group(2)}" if found else message.splitlines()[0][:80]


def epsilon_without_sampling(privacy, rounds: int) -> float | None:
    """The epsilon of the same rounds with no amplification by sampling (q = 1), which is what holds against
    whoever knows each round's participants (docs/privacy.md); LocalDP's status already counts it so."""
    from fedjax_core.privacy import CentralDP, LocalDP, accounting

    if isinstance(privacy, CentralDP):
        return accounting.epsilon_of(privacy.noise_multiplier, 1.0, rounds, privacy.delta)
    if isinstance(privacy, LocalDP):
        return accounting.epsilon_of(accounting.local_noise_multiplier(privacy.epsilon, privacy.delta), 1.0, rounds,
                                     privacy.delta)
    return None


def upload_noise_std(privacy) -> float | None:
    """LocalDP: the std of the Gaussian noise each envoy adds per coordinate (noise multiplier x clipping norm)."""
    from fedjax_core.privacy import LocalDP, accounting

    if not isinstance(privacy, LocalDP):
        return None
    return accounting.local_noise_multiplier(privacy.epsilon, privacy.delta) * privacy.clipping_norm


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def table(results: list[dict], per_round: int, delta: float) -> str:
    """Epsilon: the status's (central: Poisson-sampled at q = per round / envoys); ``q = 1``: the same rounds
    without amplification by sampling. Noise std: per coordinate, on the round's mean update (local: each upload's,
    divided by sqrt(participants), as their mean gets it), in the first round."""
    lines = [f"| run | final accuracy | best accuracy (round) | epsilon at delta={delta:g} | epsilon, q = 1 "
             "| noise std on the mean | wall s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['run']} | error: {r['error'][:100]} | | | | | |")
            continue
        noise = r["noise_std"] if r.get("upload_noise_std") is None else r["upload_noise_std"] / math.sqrt(per_round)
        final = fmt(r["final_accuracy"], ".3f") if not r.get("failure") else r["failure_short"]
        lines.append(f"| {r['run']} | {final} | {fmt(r['best_accuracy'], '.3f')} ({r['best_round']}) "
                     f"| {fmt(r['epsilon'], '.3g')} | {fmt(r.get('epsilon_without_sampling'), '.3g')} "
                     f"| {fmt(noise, '.2g')} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envoys", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--partition", choices=("iid", "dirichlet"), default="iid")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (--partition dirichlet)")
    parser.add_argument("--clipping-norm", type=float, default=0.7,
                        help="about the median update norm measured first (0.73 for the defaults)")
    parser.add_argument("--noise-multipliers", type=float, nargs="*", default=[0.3, 0.7, 1.5])
    parser.add_argument("--local-epsilons", type=float, nargs="*", default=[10.0, 100.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--runs", nargs="*", choices=("none", "central", "local"), default=["none", "central", "local"])
    parser.add_argument("--norm-envoys", type=int, default=10, help="envoys whose update norms are measured")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, default=REPO / "bench-results" / "privacy_accuracy.json")
    args = parser.parse_args(argv)
    if not (args.data_dir / "cifar-10-batches-bin").is_dir():
        print(f"no CIFAR-10 binary batches under {args.data_dir} (pass --data-dir)", file=sys.stderr)
        return 2
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load_at_start = os.getloadavg()
    import jax

    import simulation
    import sim_model as m
    from fedjax_core.privacy import CentralDP, LocalDP

    data = simulation.load(args.data_dir)
    (x, y), _ = data
    parts = partitioner(args)(y)
    sizes = [len(p) for p in parts]
    print(f"{args.envoys} envoys ({args.partition}), {min(sizes)} to {max(sizes)} training images each; "
          f"{args.per_round} a round, {args.rounds} rounds", flush=True)
    t0 = time.perf_counter()
    norms = {"initial_model": norm_summary(update_norms(m.initial_state(), x, y, parts, args.norm_envoys))}
    print(f"update norms from the initial model: median {norms['initial_model']['median']:.3g} "
          f"(min {norms['initial_model']['min']:.3g}, max {norms['initial_model']['max']:.3g}; "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)

    plan = []
    if "none" in args.runs:
        plan.append(("none", None))
    if "central" in args.runs:
        plan += [(f"central z={z:g}", CentralDP(noise_multiplier=z, clipping_norm=args.clipping_norm, delta=args.delta))
                 for z in args.noise_multipliers]
    if "local" in args.runs:
        plan += [(f"local eps={e:g}", LocalDP(clipping_norm=args.clipping_norm, epsilon=e, delta=args.delta))
                 for e in args.local_epsilons]
    results = []
    for label, privacy in plan:
        print(f"{label} ...", flush=True)
        try:
            result = run_one(args, label, privacy, data)
        except Exception as exc:  # one failed run is reported, the others still run
            result = {"run": label, "error": f"{type(exc).__name__}: {exc}"[-2000:]}
        model = result.pop("_model", None)
        if label == "none" and model is not None:
            norms["final_model_no_dp"] = norm_summary(update_norms(model, x, y, parts, args.norm_envoys))
            print(f"  update norms from its final model: median {norms['final_model_no_dp']['median']:.3g}",
                  flush=True)
        results.append(result)
        print("  " + json.dumps({k: v for k, v in result.items() if not k.endswith("per_round")
                                  and k not in ("round_s", "privacy", "failure")}), flush=True)

    text = table(results, args.per_round, args.delta)
    print()
    print(text)
    out = {"config": {"envoys": args.envoys, "per_round": args.per_round, "rounds": args.rounds,
                      "partition": args.partition, "alpha": args.alpha if args.partition == "dirichlet" else None,
                      "clipping_norm": args.clipping_norm, "delta": args.delta, "batch": m.BATCH,
                      "opt_treatment": "RESET", "aggregation": "fedavg", "data_dir": str(args.data_dir)},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
                       "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()},
           "update_norms": norms, "results": results, "table": text}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {args.json}")
    return 0 if not any("error" in r for r in results) else 1  # a run whose training diverged is a result


if __name__ == "__main__":
    sys.exit(main())
