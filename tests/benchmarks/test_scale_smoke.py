"""``benchmarks/scale.py --quick`` runs end to end: a real director, 16 simulated envoys in 2
processes, a 2-round experiment; every round completes, no heartbeat fails or is late, and the
per-envoy figures are there.

No timing thresholds beyond the benchmark's own heartbeat check (a gap more than 1 s over the
health-check period): machines are noisy.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180


def _run_quick(out: Path) -> str:
    proc = subprocess.Popen([sys.executable, "-u", str(REPO / "benchmarks" / "scale.py"), "--quick", "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the benchmark stop the director and the envoy processes it started (own sessions)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        raise AssertionError(f"scale.py --quick took over {TIMEOUT_S} s; output:\n{output}")
    assert proc.returncode == 0, f"scale.py --quick exited {proc.returncode}; output:\n{output}"
    return output


def _positive(record: dict, *keys: str) -> None:
    for key in keys:
        value = record
        for part in key.split("."):
            value = value[part]
        assert isinstance(value, (int, float)) and value > 0, f"{key} = {value!r}, expected a positive number"


def test_quick_scale_run_completes_with_every_heartbeat_on_time(tmp_path):
    out = tmp_path / "scale.json"
    output = _run_quick(out)
    assert "SCALE CHECK PASSED" in output
    results = json.loads(out.read_text())
    assert results["ok"] is True and results["problems"] == []
    config = results["config"]
    assert results["quick"] is True and config["envoys"] == 16 and config["procs"] == 2 and config["rounds"] == 2

    rounds = results["rounds"]
    assert rounds["completed"] == rounds["asked"] == 2
    assert [row["round"] for row in rounds["per_round"]] == [0, 1]
    assert all(row["envoys_reported"] == 16 for row in rounds["per_round"])
    _positive(rounds, "round_time_s.median", "round_time_s.max")
    assert results["experiment_state"] == "finished"

    heartbeats = results["heartbeats"]
    everything = heartbeats["all"]
    assert everything["failed"] == 0 and everything["known_false"] == 0 and everything["late"] == 0
    assert everything["envoys_beating"] == 16
    # idle with every envoy connected for 3 periods, and one more period after the experiment
    assert heartbeats["phases"]["idle"]["envoys_beating"] == 16
    assert heartbeats["phases"]["idle"]["count"] >= 2 * 16
    _positive(everything, "count", "latency_s.p50", "latency_s.p99", "latency_s.max", "max_gap_s")
    assert everything["max_gap_s"] <= heartbeats["late_if_gap_over_s"]

    envoys = results["envoys"]
    assert envoys["jax_imported_in_children"] is False
    assert envoys["workers_finished"] == envoys["workers_started"] == 16
    assert envoys["uploads"] == 16 * 2 and envoys["final_validations"] == 16 and envoys["worker_failures"] == 0

    director = results["director"]
    _positive(director, "baseline_rss_bytes", "idle_rss_bytes", "peak_rss_bytes", "rss_per_envoy_kib_idle",
              "rss_per_envoy_kib_peak", "threads.baseline", "threads.idle", "threads.peak",
              "cpu.idle.seconds", "cpu.idle.cpu_s", "cpu.idle.cpu_pct_per_envoy",
              "cpu.experiment.seconds", "cpu.experiment.cpu_s", "cpu.experiment.cpu_pct_per_envoy")
    assert director["peak_rss_bytes"] >= director["baseline_rss_bytes"]

    machine = results["machine"]
    assert machine["nproc"] >= 1 and machine["python"] and machine["grpcio"]
    assert len(machine["loadavg_at_start"]) == len(machine["loadavg_at_end"]) == 3
    _positive(results, "wall_s")
