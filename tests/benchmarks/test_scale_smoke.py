"""``benchmarks/scale.py --quick`` runs end to end: a real director, 16 simulated envoys in 2
processes, a 2-round experiment; every round completes, no heartbeat fails or is late, and the
per-envoy figures are there.

No timing thresholds beyond the benchmark's own heartbeat check (a gap more than 1 s over the
health-check period): machines are noisy.
"""
from __future__ import annotations

import json

import pytest

from processes import assert_positive, run_benchmark

TIMEOUT_S = 180


@pytest.mark.slow  # 22 s: `make test-slow` runs it, `make bench-scale` is the real run
def test_quick_scale_run_completes_with_every_heartbeat_on_time(tmp_path):
    out = tmp_path / "scale.json"
    output = run_benchmark("scale.py", "--quick", "--out", str(out), timeout_s=TIMEOUT_S)
    assert "SCALE CHECK PASSED" in output
    results = json.loads(out.read_text())
    assert results["ok"] is True and results["problems"] == []
    config = results["config"]
    assert results["quick"] is True and config["envoys"] == 16 and config["procs"] == 2 and config["rounds"] == 2

    rounds = results["rounds"]
    assert rounds["completed"] == rounds["asked"] == 2
    assert [row["round"] for row in rounds["per_round"]] == [0, 1]
    assert all(row["envoys_reported"] == 16 for row in rounds["per_round"])
    assert_positive(rounds, "round_time_s.median", "round_time_s.max")
    assert results["experiment_state"] == "finished"

    heartbeats = results["heartbeats"]
    everything = heartbeats["all"]
    assert everything["failed"] == 0 and everything["known_false"] == 0 and everything["late"] == 0
    assert everything["envoys_beating"] == 16
    # idle with every envoy connected for 3 periods, and one more period after the experiment
    assert heartbeats["phases"]["idle"]["envoys_beating"] == 16
    assert heartbeats["phases"]["idle"]["count"] >= 2 * 16
    assert_positive(everything, "count", "latency_s.p50", "latency_s.p99", "latency_s.max", "max_gap_s")
    assert everything["max_gap_s"] <= heartbeats["late_if_gap_over_s"]

    envoys = results["envoys"]
    assert envoys["jax_imported_in_children"] is False
    assert envoys["workers_finished"] == envoys["workers_started"] == 16
    assert envoys["uploads"] == 16 * 2 and envoys["final_validations"] == 16 and envoys["worker_failures"] == 0

    director = results["director"]
    assert_positive(director, "baseline_rss_bytes", "idle_rss_bytes", "peak_rss_bytes", "rss_per_envoy_kib_idle",
              "rss_per_envoy_kib_peak", "threads.baseline", "threads.idle", "threads.peak",
              "cpu.idle.seconds", "cpu.idle.cpu_s", "cpu.idle.cpu_pct_per_envoy",
              "cpu.experiment.seconds", "cpu.experiment.cpu_s", "cpu.experiment.cpu_pct_per_envoy")
    assert director["peak_rss_bytes"] >= director["baseline_rss_bytes"]

    machine = results["machine"]
    assert machine["nproc"] >= 1 and machine["python"] and machine["grpcio"]
    assert len(machine["loadavg_at_start"]) == len(machine["loadavg_at_end"]) == 3
    assert_positive(results, "wall_s")
