#!/usr/bin/env python
"""``make bench-research``: accuracy against communication on a non-IID split, 4 envoys.

One director and four envoys on loopback over the shared CIFAR-10 subset, split by label
with Dirichlet(0.3) (``partition: dirichlet``, seed 0); the seed tutorial's CNN, SGD 0.01
momentum 0.9, batch 128, one epoch per round, RESET. Every run trains the same number of
rounds from the same initial model:

FedAvg, FedProx (mu 0.01), FedAdam (eta 0.001), FedMedian, FedAvg with int8 (deltas, and
downloads int8 too), FedAvg with bf16 deltas, and dynamic averaging at two thresholds.

Per run: final and best aggregated validation accuracy, bytes moved (uploads plus model
downloads, as the director counts them), model messages (uploads plus downloads; dynamic
averaging's divergence check-ins are 8-byte scalars, counted apart), wall time. Writes JSON
and a PNG of accuracy against bytes moved.

    python benchmarks/research.py [--rounds 20] [--out bench-results/research.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from fedjax_core import Dynamic, Federation, FedAdam, FedAvg, FedMedian, FLExperiment, ModelInterface  # noqa: E402
from fedjax_core import records as r  # noqa: E402
from strategies import DATA, start_federation  # noqa: E402

SPLIT = {"partition": "dirichlet", "alpha": 0.3, "seed": 0}
PROX_MU = 0.01
RUNS = [  # label, FLExperiment.start keyword arguments (and the FedProx flag)
    ("FedAvg", dict(aggregation=FedAvg())),
    (f"FedProx(mu={PROX_MU})", dict(aggregation=FedAvg(), prox=True)),
    ("FedAdam(eta=0.001)", dict(aggregation=FedAdam(eta=0.001))),
    ("FedMedian", dict(aggregation=FedMedian())),
    ("FedAvg int8", dict(aggregation=FedAvg(), compression="int8", send_deltas=True, compress_downloads=True)),
    ("FedAvg bf16 deltas", dict(aggregation=FedAvg(), compression="bf16", send_deltas=True)),
    ("Dynamic(delta=0.8)", dict(aggregation=FedAvg(), sync=Dynamic(delta_threshold=0.8))),
    ("Dynamic(delta=2.0)", dict(aggregation=FedAvg(), sync=Dynamic(delta_threshold=2.0))),
]


def run(federation: Federation, label: str, settings: dict, rounds: int, index: int) -> dict:
    import seed_cnn

    settings = dict(settings)
    tasks = seed_cnn.make_tasks(prox_mu=PROX_MU if settings.pop("prox", False) else 0.0)
    name = f"research-{index}-{int(time.time())}"
    exp = FLExperiment(federation=federation, experiment_name=name)
    started = time.monotonic()
    exp.start(model_provider=ModelInterface(model=seed_cnn.create_train_state()), task_keeper=tasks,
              data_loader=seed_cnn.ShardSplits(), rounds_to_train=rounds, opt_treatment="RESET",
              device_assignment_policy="CPU_ONLY", best_metric="validation_accuracy", **settings)
    rows = exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    wall = time.monotonic() - started
    status = exp.get_experiment_status()
    summaries = [{m.name: m.value for m in e.metrics} for e in exp.history if e.stage == r.Stage.ROUND]
    accuracy = [row.get("agg_val/validation_accuracy") for row in rows]
    return {"run": label, "rounds": rounds, "state": status.state,
            "final_accuracy": accuracy[rounds] if len(accuracy) > rounds else None,
            "best_accuracy": status.best_value, "best_round": status.best_round,
            "bytes_moved": int(sum(s["bytes_received"] + s["bytes_sent"] for s in summaries)),
            "model_messages": int(sum(s["model_messages"] for s in summaries)),
            "check_ins": int(sum(s["check_ins"] for s in summaries)),
            "averagings": int(sum(s["averaged"] for s in summaries)),
            "wall_s": round(wall, 2), "accuracy_per_round": accuracy}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    markers = "osD^v<>px*"
    for i, res in enumerate(results):
        if res["final_accuracy"] is None:
            continue
        ax.scatter(res["bytes_moved"] / 2**20, res["final_accuracy"], s=50, marker=markers[i % len(markers)],
                   label=f"{res['run']} ({res['model_messages']} messages)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xscale("log")
    ax.set_xlabel("bytes moved over the experiment (MiB, log scale)")
    ax.set_ylabel("final aggregated validation accuracy")
    ax.set_title(f"CIFAR-10 subset, 4 envoys, Dirichlet(0.3), {results[0]['rounds']} rounds")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: list[dict]) -> None:
    base = next(res for res in results if res["run"] == "FedAvg")
    print(f"\n{'run':<22} {'final acc':>9} {'best acc':>8} {'MiB moved':>9} {'x FedAvg':>8} {'messages':>8} "
          f"{'x FedAvg':>8} {'check-ins':>9} {'wall':>7}")
    for res in results:
        final = res["final_accuracy"]
        print(f"{res['run']:<22} {final if final is None else format(final, '.4f'):>9} {res['best_accuracy']:>8.4f} "
              f"{res['bytes_moved'] / 2**20:>9.1f} {res['bytes_moved'] / base['bytes_moved']:>8.2f} "
              f"{res['model_messages']:>8} {res['model_messages'] / base['model_messages']:>8.2f} "
              f"{res['check_ins']:>9} {res['wall_s']:>6.1f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--only", nargs="*", help="run only these labels (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "research.json")
    parser.add_argument("--png", type=Path, default=REPO / "bench-results" / "research_accuracy_vs_bytes.png")
    parser.add_argument("--replot", action="store_true", help="redraw the table and PNG from --out, run nothing")
    args = parser.parse_args()
    if args.replot:
        results = json.loads(args.out.read_text())["results"]
        print_table(results)
        plot(results, args.png)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the federation on the way out
    if not (args.data_dir / "cifar-10-batches-bin").is_dir():
        print(f"no CIFAR-10 binary batches under {args.data_dir} (pass --data-dir)", file=sys.stderr)
        return 2
    runs = [(label, settings) for label, settings in RUNS if not args.only or label in args.only or label == "FedAvg"]
    results = []
    with tempfile.TemporaryDirectory(prefix="fedjax-research-") as tmp:
        processes, port = start_federation(Path(tmp), args.data_dir, SPLIT)
        try:
            federation = Federation(director_node_fqdn="127.0.0.1", director_port=port, tls=False)
            for index, (label, settings) in enumerate(runs):
                result = run(federation, label, settings, args.rounds, index)
                results.append(result)
                print(f"{label:<22} final {result['final_accuracy']}  best {result['best_accuracy']:.4f}  "
                      f"{result['bytes_moved'] / 2**20:.1f} MiB  {result['model_messages']} messages  "
                      f"{result['wall_s']:.1f}s", flush=True)
        except BaseException:
            for p in processes:
                print(f"----- {p.name} -----\n{p.output()[-4000:]}", file=sys.stderr)
            raise
        finally:
            for p in reversed(processes):
                p.stop()
    print_table(results)
    plot(results, args.png)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                                    "envoys": 4, "split": SPLIT, "results": results}, indent=2))
    print(f"wrote {args.out} and {args.png}")
    return 0 if all(res["state"] == "finished" for res in results) else 1


if __name__ == "__main__":
    sys.exit(main())
