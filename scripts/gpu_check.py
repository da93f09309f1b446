"""Prove the GPU path on a machine with an NVIDIA GPU: two envoys sharing GPU 0.

For each memory setting (preallocation off; a memory fraction per worker) it runs a
federation of a director and two envoys whose configs say `cuda_devices: [0]`, records
what the workers' tasks saw (JAX backend, the `device` argument), samples nvidia-smi
while the experiment runs, and checks that the workers' GPU memory is released when the
experiment ends. Prints a JSON summary.

    python scripts/gpu_check.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
# This driver (the "notebook") needs no GPU: keep its JAX off the card the envoys share.
# (A notebook on the same machine must at least not preallocate; the tutorial's sets that.)
os.environ["JAX_PLATFORMS"] = "cpu"

from fedjax_core import Federation, FLExperiment, ModelInterface  # noqa: E402
from fedjax_core import records as r  # noqa: E402
from fl_experiment import SubsetDataset, create_train_state, make_tasks  # noqa: E402
from processes import Stack  # noqa: E402


def gpu_apps() -> list[dict]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [{"pid": int(p), "used_mib": int(m)} for p, m in (line.split(", ") for line in out.strip().splitlines())]


def gpu_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split(",")[0])


def run_case(name: str, envoy_params: dict, rounds: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"gpu-{name}-"))
    stack = Stack(workdir, envoy_params={"cuda_devices": [0], **envoy_params})
    samples: list[list[dict]] = []
    stop = threading.Event()

    def sample():
        while not stop.wait(0.5):
            samples.append(gpu_apps())

    try:
        stack.start()
        before = gpu_used_mib()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        fed = Federation(director_node_fqdn="127.0.0.1", director_port=stack.port, tls=False)
        exp = FLExperiment(federation=fed, experiment_name=name)
        t0 = time.monotonic()
        exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
                  data_loader=SubsetDataset(), rounds_to_train=rounds, opt_treatment="CONTINUE_GLOBAL",
                  device_assignment_policy="CUDA_PREFERRED")
        rows = exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join()
        # the workers exit when the experiment ends: wait for their GPU memory to be handed back
        deadline = time.monotonic() + 60
        while gpu_apps() and time.monotonic() < deadline:
            time.sleep(0.5)
        train = [e for e in exp.history if e.envoy and e.stage == r.Stage.TRAIN]
        seen = {(e.envoy, m.name): m.value for e in train for m in e.metrics}
        worker_pids = sorted({int(v) for (envoy, metric), v in seen.items() if metric == "pid"})
        peak = {}
        for snapshot in samples:
            for app in snapshot:
                peak[app["pid"]] = max(peak.get(app["pid"], 0), app["used_mib"])
        return {
            "case": name, "envoy_params": envoy_params, "state": exp.get_experiment_status().state,
            "seconds": round(elapsed, 1),
            "agg_val_acc": [round(row.get("agg_val/validation_accuracy", float("nan")), 4) for row in rows],
            "round_time_s": [row.get("round_time_s") for row in rows],
            "workers_on_gpu": {e: seen.get((e, "on_gpu")) for e in ("env1", "env2")},
            "device_arg_is_cuda": {e: seen.get((e, "device_is_cuda")) for e in ("env1", "env2")},
            "worker_pids": worker_pids,
            "peak_gpu_mib_per_worker_pid": {str(p): peak.get(p) for p in worker_pids},
            "gpu_processes_seen_at_once": max((len(s) for s in samples), default=0),
            "gpu_used_mib_before": before, "gpu_apps_after_experiment": gpu_apps(),
            "gpu_used_mib_after": gpu_used_mib(),
        }
    finally:
        stop.set()
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = []
    for name, params in (("prealloc-off", {"jax_preallocate": False}),
                         ("fraction-0.3", {"jax_preallocate": True, "jax_memory_fraction": 0.3})):
        try:
            results.append(run_case(name, params, args.rounds))
        except Exception as exc:  # record it and go on to the next setting
            results.append({"case": name, "state": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                            "workers_on_gpu": {}, "gpu_apps_after_experiment": []})
        print(json.dumps(results[-1], indent=2), flush=True)
    ok = all(r_["state"] == "finished" and all(v == 1.0 for v in r_["workers_on_gpu"].values())
             and not r_["gpu_apps_after_experiment"] for r_ in results)
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
