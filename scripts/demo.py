"""`make demo`: the CIFAR-10 tutorial end to end, as a user runs it.

Starts the director and two envoys through the shipped start scripts and configs,
executes workspace/FLAX_CIFAR10_CNN.ipynb headless (the seed tutorial's model and
settings, 5 rounds), prints the per-round table and the returned model's test accuracy,
and stops every process it started, on success or failure.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import time
from pathlib import Path

import nbclient
import nbformat

from fedjax_core import Federation, FLExperiment
from fedjax_core.local import QUIET_KERNEL_ARGS, Process, free_port

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "workspace" / "FLAX_CIFAR10_CNN.ipynb"
ROUNDS = int(os.environ.get("FEDJAX_ROUNDS", "5"))


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def notebook_text(nb) -> str:
    return "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", [])
                   if out.get("output_type") == "stream" and out.get("name") == "stdout")


def print_table(rows: list[dict]) -> None:
    print(f"\n{'round':>5}  {'agg val acc':>11}  {'agg val loss':>12}  {'train acc':>9}  {'round time':>10}")
    for row in rows:
        def cell(key, width, fmt="{:.4f}"):
            return (fmt.format(row[key]) if key in row else "-").rjust(width)
        print(f"{row['round']:>5}  {cell('agg_val/validation_accuracy', 11)}  {cell('agg_val/validation_loss', 12)}"
              f"  {cell('train/train_acc', 9)}  {cell('round_time_s', 10, '{:.2f}s')}")
    print("(round r validates the model after r aggregations; its round time is that of training round r)")


def main() -> int:
    started = time.monotonic()
    port = 50055 if port_is_free(50055) else free_port()
    experiment = time.strftime("cifar10_demo_%Y%m%d_%H%M%S")
    processes: list[Process] = []
    try:
        print(f"== starting the director on port {port} and two envoys (shards 1/2 and 2/2)")
        logs = {"director": REPO / "director" / "logs" / "director.log",
                "env_one": REPO / "envoy" / "logs" / "env_one.log", "env_two": REPO / "envoy" / "logs" / "env_two.log"}
        for path in logs.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        print("   their logs: " + ", ".join(str(p.relative_to(REPO)) for p in logs.values()))
        director = Process([str(REPO / "director" / "start_director.sh"), "--listen-port", str(port),
                            "--log-file", str(logs["director"])], name="director")
        processes.append(director)
        director.wait_for("DIRECTOR READY", timeout=60)
        for name, config in (("env_one", "envoy_config.yaml"), ("env_two", "envoy_config_2.yaml")):
            processes.append(Process([str(REPO / "envoy" / "start_envoy.sh"), name, config, "-dp", str(port),
                                      "--log-file", str(logs[name])], name=name))
        for envoy in processes[1:]:
            envoy.wait_for("ENVOY READY", timeout=60)

        print(f"== running {NOTEBOOK.relative_to(REPO)} headless: experiment {experiment!r}, {ROUNDS} rounds")
        os.environ.update(FEDJAX_DIRECTOR_HOST="localhost", FEDJAX_DIRECTOR_PORT=str(port),
                          FEDJAX_ROUNDS=str(ROUNDS), FEDJAX_EXPERIMENT=experiment)
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", extra_arguments=QUIET_KERNEL_ARGS,
                                         resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        try:
            client.execute()
        finally:
            executed = REPO / "workspace" / "logs" / f"{experiment}.ipynb"
            executed.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, executed)
        text = notebook_text(nb)

        federation = Federation(director_node_fqdn="localhost", director_port=port, tls=False)
        rows = FLExperiment(federation, experiment).stream_metrics(tensorboard_logs=False, progress=False,
                                                                       live_table=False)
        status = FLExperiment(federation, experiment).get_experiment_status()
        print_table(rows)
        test_acc = re.search(r"^TEST_ACCURACY=(\S+)$", text, re.MULTILINE)
        print(f"\nexperiment {experiment!r}: {status.state}, best round {status.best_round} "
              f"({status.best_metric} {status.best_value:.4f})")
        print(f"best model pulled back into the notebook, accuracy on the envoys' validation shards: "
              f"{float(test_acc.group(1)):.4f}" if test_acc else "the notebook printed no TEST_ACCURACY line")
        print(f"executed notebook: {executed.relative_to(REPO)}")
        print("TensorBoard:  .venv/bin/tensorboard --logdir workspace/logs   (notebook side)")
        print("              .venv/bin/tensorboard --logdir director/logs    (director side)")
        print("daemon logs:  " + "  ".join(str(p.relative_to(REPO)) for p in logs.values()))
        print(f"wall time: {time.monotonic() - started:.1f}s")
        return 0 if status.state == "finished" and test_acc else 1
    except BaseException:
        for p in processes:
            print(f"----- {p.name} output -----\n{p.output()}", file=sys.stderr)
        raise
    finally:
        for p in reversed(processes):
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
