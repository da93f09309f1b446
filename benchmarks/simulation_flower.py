"""Flower's side of ``make bench-simulation``: ``flwr.simulation.start_simulation`` (Ray backend).

Run by ``simulation.py`` with ``.venv-flower``'s python and ``PYTHONPATH`` holding the repository,
``benchmarks/`` and ``envoy/``::

    python simulation_flower.py --one flower --config JSON

NumPyClients (one ephemeral instance per call, as Flower's engine makes them) train the same masked
step (``sim_model``) on the same Dirichlet shards; a FedAvg whose ``configure_fit`` picks the clients the
director's sampling rule picks, so both systems train the same clients each round. Each Ray actor loads
the data set once and keeps it (a module-level cache), Flower's usual practice. Prints one
``RESULT {json}`` line as ``simulation.py``'s other runs do.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path



def shards(config: dict) -> dict:
    """The data set and its split, loaded once per process (kept in an imported module, so Ray's pickling of
    the client function does not copy it)."""
    import sim_model

    if not sim_model.CACHE:
        from simulation import load, split

        (x, y), (xt, yt) = load(Path(config["data_dir"]))
        sim_model.CACHE.update(x=x, y=y, xt=xt, yt=yt, parts=split(config, y))
    return sim_model.CACHE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", default="flower")
    parser.add_argument("--config", required=True)
    config = json.loads(parser.parse_args(argv).config)

    import flwr as fl
    from flwr.client import NumPyClient
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    import sim_model as m
    from simulation import chosen, result

    picks = chosen(config)
    starts, ends, final, compiled = {}, {}, {}, {}

    class Client(NumPyClient):
        def __init__(self, partition_id: int):
            self.partition_id = partition_id

        def fit(self, parameters, fit_config):
            data = shards(config)
            idx = data["parts"][self.partition_id]
            if not len(idx):
                return parameters, 0, {}
            template = data.setdefault("template", m.initial_state())
            if not data.get("counting"):
                m.count_compiles()  # from the actor's first client on (its first step compiles after this)
                data["counting"] = True
            state, loss = m.train_epoch(m.with_params(template, parameters), data["x"][idx], data["y"][idx])
            return m.params_of(state), len(idx), {"loss": loss, "compiled_at": json.dumps(m.COMPILED_AT),
                                                  "pid": os.getpid()}

    def client_fn(context):
        return Client(int(context.node_config["partition-id"])).to_client()

    class SameClients(FedAvg):
        """FedAvg over the clients the director's rule picks for each round, timed from configure to aggregate."""

        def configure_fit(self, server_round, parameters, client_manager):
            starts[server_round - 1] = time.time()
            want = set(picks[server_round - 1])
            proxies = [p for p in client_manager.all().values() if p.partition_id in want]
            return [(p, FitIns(parameters, {})) for p in proxies]

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} clients failed: {failures[:1]}")
            out = super().aggregate_fit(server_round, [(c, r) for c, r in results if r.num_examples], failures)
            for _, res in results:
                if "pid" in res.metrics:
                    compiled[res.metrics["pid"]] = json.loads(res.metrics["compiled_at"])
            final["params"] = parameters_to_ndarrays(out[0])
            ends[server_round - 1] = time.time()
            return out

    initial = m.initial_state()
    strategy = SameClients(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1, min_evaluate_clients=0,
                           min_available_clients=config["envoys"],
                           initial_parameters=ndarrays_to_parameters(m.params_of(initial)))
    fl.simulation.start_simulation(
        client_fn=client_fn, num_clients=config["envoys"], config=fl.server.ServerConfig(num_rounds=config["rounds"]),
        strategy=strategy, client_resources={"num_cpus": 1, "num_gpus": 0.0},
        ray_init_args={"num_cpus": os.cpu_count(), "include_dashboard": False, "log_to_driver": False})
    round_s = [ends[r] - starts[r] for r in range(config["rounds"])]
    model = m.with_params(initial, final["params"])
    xt, yt = shards(config)["xt"], shards(config)["yt"]
    recompiles = sum(ends[0] < t <= ends[config["rounds"] - 1] for times in compiled.values() for t in times)
    print("RESULT " + json.dumps(result(round_s, config["per_round"], recompiles, m.accuracy(model, xt, yt))),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
