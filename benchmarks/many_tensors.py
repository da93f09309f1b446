#!/usr/bin/env python
"""A model of many tiny tensors: what it costs to submit, to run a round, and to the heartbeats meanwhile.

Every tensor travels as a message of its own, so a model of 20,000 (the most a submission may
declare) float32[1] leaves makes 20,000 messages each way per envoy per round. A real director
(plaintext, loopback) and two envoys spoken for over raw gRPC (no JAX worker: each round they
download the model and upload it back changed); meanwhile a thread sends a heartbeat every 50 ms and
records how long each took, which is what the event loop's per-message work delays.

    python benchmarks/many_tensors.py --tensors 1000 20000 --rounds 2 --json bench-results/many_tensors.json

``make bench-tensors`` runs that. Figures: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import FEDJAX  # noqa: E402

from fedjax_core import records as r  # noqa: E402
from fedjax_core.api.client import FederationClient  # noqa: E402
from fedjax_core.envoy.client import EnvoyClient  # noqa: E402
from fedjax_core.local import Process, free_port  # noqa: E402
from fedjax_core.spec import from_flat
from fedjax_core.tensors import spec_of  # noqa: E402

def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


INFO = r.ShardInfo("raw", ("32", "32", "3"), ("1",), 64, 64, hostname="localhost")
ENVOYS = ("env1", "env2")


class Beats:
    """Heartbeats every ``period_s`` from their own connection, the latency of each; and the envoys'."""

    def __init__(self, target: str, envoys: list[EnvoyClient], period_s: float = 0.05):
        self.client = EnvoyClient("beater", target, None)
        self.client.register(INFO)
        self.envoys = envoys
        self.period_s, self.latencies, self.stop = period_s, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.period_s):
            t0 = time.perf_counter()
            self.client.heartbeat()
            self.latencies.append(time.perf_counter() - t0)
            if len(self.latencies) % 10 == 0:  # the envoys stay online (every half second)
                for envoy in self.envoys:
                    envoy.heartbeat()

    def take(self) -> dict:
        """Figures of the heartbeats so far (and start afresh)."""
        got, self.latencies = self.latencies, []
        if not got:
            return {"count": 0}
        return {"count": len(got), "median_ms": round(statistics.median(got) * 1e3, 2),
                "max_ms": round(max(got) * 1e3, 1)}

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.client.close()


def run(n_tensors: int, rounds: int) -> dict:
    model = {f"params/t{i:05d}": np.full((1,), i, np.float32) for i in range(n_tensors)}
    port = free_port()
    target = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="fedjax-many-") as tmp:
        config = Path(tmp) / "director.yaml"
        config.write_text(json.dumps({"settings": {"listen_host": "127.0.0.1", "listen_port": port,
                                                   "sample_shape": ["32", "32", "3"], "target_shape": ["1"],
                                                   "envoy_health_check_period": 1, "stream_idle_s": 120}}))
        director = Process([*FEDJAX, "director", "start", "-c", str(config), "--disable-tls"], cwd=tmp,
                           name="director")
        beats = None
        envoys = []
        try:
            director.wait_for("DIRECTOR READY")
            envoys = [EnvoyClient(name, target, None) for name in ENVOYS]
            for e in envoys:
                e.register(INFO)
            beats = Beats(target, envoys)
            client = FederationClient("127.0.0.1", port, None)
            header = from_flat(dict(name="many", rounds=rounds, opt_treatment="RESET", aggregation="fedavg",
                                        bundle_size=3, envoys=ENVOYS, min_envoys=0,
                                        model_spec=tuple(spec_of(k, v) for k, v in model.items())))
            pid = director.proc.pid
            t0, c0 = time.perf_counter(), cpu_s(pid)
            client.submit(header, b"abc", model)
            out = {"tensors": n_tensors, "submit_s": round(time.perf_counter() - t0, 2),
                   "submit_director_cpu_s": round(cpu_s(pid) - c0, 2), "submit_beats": beats.take()}
            round_s, round_cpu = [], []
            for rnd in range(rounds):
                t0, c0 = time.perf_counter(), cpu_s(pid)
                threads = [threading.Thread(target=_round, args=(e, rnd)) for e in envoys]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                round_s.append(round(time.perf_counter() - t0, 2))
                round_cpu.append(round(cpu_s(pid) - c0, 2))
            out.update(round_s=round_s, round_director_cpu_s=round_cpu, round_beats=beats.take())
            status = client.status("many")
            out["state"] = status.state
            client.close()
            return out
        finally:
            if beats is not None:
                beats.close()
            for e in envoys:
                e.close()
            director.stop()


def _round(envoy: EnvoyClient, rnd: int) -> None:
    """One envoy's round: download the round's model, upload it changed."""
    task = envoy.wait_task("many", max_wait_s=30)
    while task.kind == r.TaskKind.NONE:  # the previous round is still closing
        task = envoy.wait_task("many", max_wait_s=30)
    assert task.kind == r.TaskKind.TRAIN and task.round == rnd, task
    model = envoy.round_model("many", rnd)
    envoy.upload("many", rnd, 64, {k: v + 1 for k, v in model.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the finally that stops the director
    results = [run(n, args.rounds) for n in args.tensors]
    rows = [["tensors", "submit s", "director CPU s", "beat max ms", "round s", "director CPU s",
             "beat median / max ms"]]
    for res in results:
        sb, rb = res["submit_beats"], res["round_beats"]
        rows.append([res["tensors"], res["submit_s"], res["submit_director_cpu_s"], sb.get("max_ms", "-"),
                     ", ".join(map(str, res["round_s"])), ", ".join(map(str, res["round_director_cpu_s"])),
                     f"{rb.get('median_ms', '-')} / {rb.get('max_ms', '-')}"])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).rjust(w) for cell, w in zip(row, widths)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(res["state"] in ("running", "finished") for res in results) else 1


if __name__ == "__main__":
    sys.exit(main())
