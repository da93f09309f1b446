"""Flower's side of ``make bench-peers``: a legacy ``start_server`` and ``start_client`` processes.

Run with ``.venv-flower``'s python and ``PYTHONPATH`` holding the repository, ``benchmarks/``
and ``envoy/`` (for ``peers_model``, ``seed_cnn`` and the CIFAR-10 shard descriptor; no
part of fedjax_core's director or envoy is imported)::

    python peers_flower.py server --port P --clients N --rounds R [--evaluate]
    python peers_flower.py client --port P --rank K --clients N --case cnn|nudge [--model-mb M]

The server prints one ``FLOWER RESULT {json}`` line: per round its start and end
(``configure_fit`` to the end of ``aggregate_evaluate``, or of ``aggregate_fit`` without
evaluation), the clients' metrics, and its own baseline and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MiB = 1 << 20


def proc_memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


# ----------------------------------------------------------------------------- server
def run_server(args) -> None:
    import flwr as fl
    from flwr.server.strategy import FedAvg

    baseline = proc_memory()
    rounds: dict[int, dict] = {}

    def row(server_round: int) -> dict:
        return rounds.setdefault(server_round - 1, {"round": server_round - 1, "fit": [], "evaluate": []})

    def weighted(results, key: str) -> float | None:
        pairs = [(res.num_examples, res.metrics[key]) for _, res in results if key in res.metrics]
        total = sum(n for n, _ in pairs)
        return sum(n * v for n, v in pairs) / total if total else None

    class TimedFedAvg(FedAvg):
        """FedAvg that notes when each round starts and ends, and what the clients reported."""

        def configure_fit(self, server_round, parameters, client_manager):
            row(server_round)["start"] = time.time()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            r = row(server_round)
            r["fit"] = [dict(res.metrics, num_examples=res.num_examples) for _, res in results]
            r["fit_failures"] = len(failures)
            r["end"] = time.time()
            return out

        def aggregate_evaluate(self, server_round, results, failures):
            out = super().aggregate_evaluate(server_round, results, failures)
            r = row(server_round)
            r["evaluate"] = [dict(res.metrics, num_examples=res.num_examples) for _, res in results]
            r["evaluate_failures"] = len(failures)
            r["accuracy"] = weighted(results, "validation_accuracy")
            r["end"] = time.time()
            return out

    n = args.clients
    strategy = TimedFedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n,
                           fraction_evaluate=1.0 if args.evaluate else 0.0, min_evaluate_clients=n if args.evaluate else 0,
                           accept_failures=False, on_fit_config_fn=lambda server_round: {"round": server_round - 1})
    print(f"FLOWER SERVER READY {args.port}", flush=True)
    fl.server.start_server(server_address=f"127.0.0.1:{args.port}", config=fl.server.ServerConfig(num_rounds=args.rounds),
                           strategy=strategy)
    peak = proc_memory()
    result = {"rounds": [rounds[k] for k in sorted(rounds)], "baseline_rss_bytes": baseline["VmRSS"],
              "peak_rss_bytes": peak["VmHWM"], "final_rss_bytes": peak["VmRSS"]}
    print("FLOWER RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- client
def make_client(args):
    """A NumPyClient holding one train state (one optax object, one jitted step) for every round."""
    import flwr as fl
    import jax
    import numpy as np

    import peers_model

    class CNNClient(fl.client.NumPyClient):
        def __init__(self):
            import seed_cnn
            from cifar10_shard_descriptor import CIFAR10ShardDescriptor

            shard = CIFAR10ShardDescriptor(rank_worldsize=f"{args.rank}, {args.clients}", data_dir=args.data_dir)
            self.train, self.valid = shard.get_split("train"), shard.get_split("valid")
            self.state = seed_cnn.create_train_state()  # its tx is the one optax object of every round
            self.treedef = jax.tree_util.tree_structure(self.state.params)

        def _state(self, parameters):
            params = jax.tree_util.tree_unflatten(self.treedef, parameters)
            # RESET, as in this project's run: a fresh optimizer state from the same optax object
            return self.state.replace(params=params, opt_state=self.state.tx.init(params), step=0)

        def get_parameters(self, config):
            return [np.asarray(x) for x in jax.tree_util.tree_leaves(self.state.params)]

        def fit(self, parameters, config):
            t0 = time.perf_counter()
            state, acc = peers_model.train_epoch(self._state(parameters), self.train, int(config["round"]))
            local = peers_model.evaluate(state, self.valid)  # the project validates the trained model too
            return ([np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)], len(self.train["label"]),
                    {"train_acc": acc, "local_validation_accuracy": local["validation_accuracy"],
                     "traces": peers_model.traces(), "rank": args.rank, "task_s": time.perf_counter() - t0})

        def evaluate(self, parameters, config):
            t0 = time.perf_counter()
            metrics = peers_model.evaluate(self._state(parameters), self.valid)
            return (metrics["validation_loss"], len(self.valid["label"]),
                    {**metrics, "traces": peers_model.traces(), "rank": args.rank, "task_s": time.perf_counter() - t0})

    class NudgeClient(fl.client.NumPyClient):
        def __init__(self):
            self.treedef = jax.tree_util.tree_structure(peers_model.mlp_params(args.model_mb, shapes_only=True))

        def get_parameters(self, config):
            return [np.asarray(x) for x in jax.tree_util.tree_leaves(peers_model.mlp_params(args.model_mb))]

        def fit(self, parameters, config):
            t0 = time.perf_counter()
            params = peers_model.nudge(jax.tree_util.tree_unflatten(self.treedef, parameters))
            return ([np.asarray(x) for x in jax.tree_util.tree_leaves(params)], args.samples,
                    {"traces": peers_model.traces(), "rank": args.rank, "task_s": time.perf_counter() - t0})

        def evaluate(self, parameters, config):
            return 0.0, args.samples, {"accuracy": 0.0, "traces": peers_model.traces(), "rank": args.rank,
                                       "task_s": 0.0}

    return CNNClient() if args.case == "cnn" else NudgeClient()


def run_client(args) -> None:
    import flwr as fl

    client = make_client(args)
    print(f"FLOWER CLIENT READY {args.rank}", flush=True)
    fl.client.start_client(server_address=f"127.0.0.1:{args.port}", client=client.to_client(), insecure=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--evaluate", action="store_true", help="server: evaluate every round on all clients")
    parser.add_argument("--rank", type=int, help="client: shard rank, from 1")
    parser.add_argument("--case", choices=["cnn", "nudge"], default="cnn")
    parser.add_argument("--data-dir", help="client: the CIFAR-10 subset")
    parser.add_argument("--model-mb", type=float, default=4.0)
    parser.add_argument("--samples", type=int, default=32, help="nudge client: examples it reports")
    args = parser.parse_args(argv)
    run_server(args) if args.role == "server" else run_client(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
