"""``benchmarks/bench.py --quick`` runs end to end and writes the figures it promises.

No timing thresholds: machines are noisy. Only the shape of the results and that every
figure is a positive number.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 85


def _run_quick(out: Path) -> str:
    proc = subprocess.Popen([sys.executable, "-u", str(REPO / "benchmarks" / "bench.py"), "--quick", "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the benchmark stop the director and envoys it started (they run in their own sessions)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        raise AssertionError(f"bench.py --quick took over {TIMEOUT_S} s; output:\n{output}")
    assert proc.returncode == 0, f"bench.py --quick exited {proc.returncode}; output:\n{output}"
    return output


def _positive(record: dict, *keys: str) -> None:
    for key in keys:
        value = record
        for part in key.split("."):
            value = value[part]
        assert isinstance(value, (int, float)) and value > 0, f"{key} = {value!r}, expected a positive number"


def test_quick_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    output = _run_quick(out)
    assert "Per-round platform overhead" in output and "Director peak memory" in output
    results = json.loads(out.read_text())

    assert results["quick"] is True
    machine = results["machine"]
    assert machine["nproc"] >= 1 and machine["python"] and machine["jax"]
    _positive(results, "transport_reference.upload_MBps", "transport_reference.download_MBps", "total_wall_s")

    overhead = results["round_overhead"]
    assert [r["model_mb"] for r in overhead] == results["config"]["sizes_mb"]
    for r in overhead:
        assert r["n_envoys"] == 2
        _positive(r, "model_bytes", "round_time_s.median", "round_time_s.max", "cycle_s.median",
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
        _positive(m, "model_bytes", "baseline_rss_bytes", "peak_rss_bytes", "growth_bytes", "growth_per_model",
                  "sampled_peak_rss_anon_bytes", "round_time_s.median")
        assert m["peak_rss_bytes"] >= m["baseline_rss_bytes"]
