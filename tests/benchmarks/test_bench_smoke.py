"""``benchmarks/bench.py --quick`` runs end to end and writes the figures it promises.

No timing thresholds: machines are noisy. Only the shape of the results and that every
figure is a positive number.
"""
from __future__ import annotations

import json

import pytest

from processes import assert_positive, run_benchmark

TIMEOUT_S = 85


@pytest.mark.slow  # the quick benchmark takes 40 s: `make test-slow` runs it, `make bench` is the real run
def test_quick_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    output = run_benchmark("bench.py", "--quick", "--out", str(out), timeout_s=TIMEOUT_S)
    assert "Per-round platform overhead" in output and "Director peak memory" in output
    results = json.loads(out.read_text())

    assert results["quick"] is True
    machine = results["machine"]
    assert machine["nproc"] >= 1 and machine["python"] and machine["jax"]
    assert_positive(results, "transport_reference.upload_MBps", "transport_reference.download_MBps", "total_wall_s")

    overhead = results["round_overhead"]
    assert [r["model_mb"] for r in overhead] == results["config"]["sizes_mb"]
    for r in overhead:
        assert r["n_envoys"] == 2
        assert_positive(r, "model_bytes", "round_time_s.median", "round_time_s.max", "cycle_s.median",
                  "bytes_per_round", "MBps_per_round", "phase_download_s.median", "phase_upload_fold_s.median")
        measured = [row for row in r["per_round"] if row["round"] >= 1]
        assert len(measured) == r["rounds"] - 1
        for row in measured:
            assert row["envoys_reported"] == 2
            # RESET with plain SGD: each envoy downloads and uploads the params, nothing else
            assert row["bytes_sent"] == row["bytes_received"] == 2 * r["model_bytes"]

    memory = results["director_memory"]
    assert [m["n_envoys"] for m in memory] == results["config"]["envoy_counts"]
    for m in memory:
        assert_positive(m, "model_bytes", "baseline_rss_bytes", "peak_rss_bytes", "growth_bytes", "growth_per_model",
                  "sampled_peak_rss_anon_bytes", "round_time_s.median")
        assert m["peak_rss_bytes"] >= m["baseline_rss_bytes"]
