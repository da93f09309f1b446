#!/usr/bin/env python
"""``make bench-strategies``: every built-in strategy on the shared CIFAR-10 subset, 4 envoys.

One director and four envoys (shards 1..4 of 4, contiguous, of the subset's train and test
batches) on loopback; the seed tutorial's CNN, SGD 0.01 momentum 0.9, batch 128, one epoch
per round, CONTINUE_GLOBAL. Each strategy runs the same number of rounds from the same
initial model; the table gives the final aggregated model's validation accuracy (all four
envoys' test shards, sample-weighted), the best round's, and the experiment's wall time.

    python benchmarks/strategies.py [--rounds 5] [--out bench-results/strategies.json]
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

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from fedjax_core import (Federation, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian,  # noqa: E402
                         FedTrimmedAvg, FedYogi, FLExperiment, Krum, ModelInterface)
from fedjax_core.local import Process, free_port  # noqa: E402

FEDJAX = [sys.executable, "-m", "fedjax_core"]
DATA = REPO.parent / "shared" / "data" / "cifar10-subset"
N_ENVOYS = 4
STRATEGIES = [FedAvg(), FedAvgM(), FedAvgM(server_learning_rate=1.0, server_momentum=0.5), FedAdam(),
              FedAdam(eta=0.01), FedYogi(), FedAdagrad(eta=0.01), FedMedian(), FedTrimmedAvg(beta=0.25),
              Krum(num_malicious_clients=0, num_clients_to_keep=1), Krum(num_malicious_clients=0, num_clients_to_keep=3)]


def start_federation(workdir: Path, data_dir: Path, shard_params: dict | None = None) -> tuple[list[Process], int]:
    """A director and N_ENVOYS envoys on loopback; ``shard_params`` add to the CIFAR-10 descriptor's."""
    port = free_port()
    (workdir / "cifar10_shard_descriptor.py").write_text((REPO / "envoy" / "cifar10_shard_descriptor.py").read_text())
    (workdir / "director.yaml").write_text(yaml.safe_dump({"settings": {
        "listen_host": "127.0.0.1", "listen_port": port, "sample_shape": ["32", "32", "3"], "target_shape": ["1"],
        "envoy_health_check_period": 2, "state_dir": str(workdir / "state"), "log_dir": str(workdir / "logs")}}))
    director = Process([*FEDJAX, "director", "start", "-c", str(workdir / "director.yaml"), "--disable-tls"],
                       cwd=workdir, name="director")
    processes = [director]
    director.wait_for("DIRECTOR READY")
    for rank in range(1, N_ENVOYS + 1):
        config = workdir / f"envoy_{rank}.yaml"
        config.write_text(yaml.safe_dump({
            "params": {"cuda_devices": [], "work_dir": str(workdir / f"envoy_{rank}")},
            "optional_plugin_components": {},
            "shard_descriptor": {"template": "cifar10_shard_descriptor.CIFAR10ShardDescriptor",
                                 "params": {"rank_worldsize": f"{rank}, {N_ENVOYS}", "data_dir": str(data_dir),
                                            **(shard_params or {})}}}))
        processes.append(Process([*FEDJAX, "envoy", "start", "-n", f"env{rank}", "-c", str(config),
                                  "-dh", "127.0.0.1", "-dp", str(port), "--disable-tls"], cwd=workdir, name=f"env{rank}"))
    for p in processes[1:]:
        p.wait_for("ENVOY READY")
    return processes, port


def run(federation: Federation, strategy, rounds: int, index: int) -> dict:
    import seed_cnn

    name = f"{strategy.name}-{index}-{int(time.time())}"
    exp = FLExperiment(federation=federation, experiment_name=name)
    started = time.monotonic()
    exp.start(model_provider=ModelInterface(model=seed_cnn.create_train_state()), task_keeper=seed_cnn.make_tasks(),
              data_loader=seed_cnn.ShardSplits(), rounds_to_train=rounds, opt_treatment="CONTINUE_GLOBAL",
              device_assignment_policy="CPU_ONLY", aggregation=strategy, best_metric="validation_accuracy")
    rows = exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    wall = time.monotonic() - started
    status = exp.get_experiment_status()
    accuracy = [row.get("agg_val/validation_accuracy") for row in rows]
    return {"strategy": repr(strategy), "rounds": rounds, "state": status.state,
            "final_accuracy": accuracy[rounds] if len(accuracy) > rounds else None,
            "best_accuracy": status.best_value, "best_round": status.best_round,
            "accuracy_per_round": accuracy, "wall_s": round(wall, 2),
            "round_s": [row.get("round_time_s") for row in rows[:rounds]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "strategies.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the federation on the way out
    if not (args.data_dir / "cifar-10-batches-bin").is_dir():
        print(f"no CIFAR-10 binary batches under {args.data_dir} (pass --data-dir)", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="fedjax-strategies-") as tmp:
        processes, port = start_federation(Path(tmp), args.data_dir)
        try:
            federation = Federation(director_node_fqdn="127.0.0.1", director_port=port, tls=False)
            print(f"{'strategy':<62} {'rounds':>6} {'final acc':>9} {'best acc':>8} {'wall':>7}")
            for index, strategy in enumerate(STRATEGIES):
                result = run(federation, strategy, args.rounds, index)
                results.append(result)
                final = result["final_accuracy"]
                print(f"{result['strategy']:<62} {result['rounds']:>6} "
                      f"{final if final is None else format(final, '.4f'):>9} {result['best_accuracy']:>8.4f} "
                      f"{result['wall_s']:>6.1f}s", flush=True)
        except BaseException:
            for p in processes:
                print(f"----- {p.name} -----\n{p.output()[-4000:]}", file=sys.stderr)
            raise
        finally:
            for p in reversed(processes):
                p.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                                    "envoys": N_ENVOYS, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(r["state"] == "finished" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
