"""The notebook side of tests/deploy/test_netns.py, run inside its own network namespace.

    python netns_notebook.py DIRECTOR_ADDRESS PORT PKI_DIR

Connects with the ``api`` certificate, runs a one-round experiment and prints
``REGISTRY [...]`` and ``STATE <state>``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fl_experiment

from fedjax_core import Federation, FLExperiment, ModelInterface  # noqa: E402
from fl_experiment import SubsetDataset, create_train_state, make_tasks  # noqa: E402


def main(address: str, port: str, pki_dir: str) -> int:
    pki = Path(pki_dir)
    fed = Federation(director_node_fqdn=address, director_port=int(port), tls=True, timeout_s=30,
                     cert_chain=str(pki / "root_ca.crt"), api_cert=str(pki / "api.crt"),
                     api_private_key=str(pki / "api.key"))
    print("REGISTRY", sorted(fed.get_shard_registry()), flush=True)
    exp = FLExperiment(federation=fed, experiment_name="netns")
    exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
              data_loader=SubsetDataset(limit=128), rounds_to_train=1, device_assignment_policy="CPU_ONLY")
    status = exp.wait(timeout_s=300)
    print("STATE", status.state, status.error, flush=True)
    return 0 if status.state == "finished" else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
