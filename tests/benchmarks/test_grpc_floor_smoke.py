"""``benchmarks/grpc_floor.py --quick`` runs end to end: a bare gRPC server and its clients in their own
processes, every case measured, the figures in its JSON."""
from __future__ import annotations

import json

from processes import run_benchmark


def test_quick_floor_run_measures_every_case(tmp_path):
    out = tmp_path / "floor.json"
    output = run_benchmark("grpc_floor.py", "--quick", "--seconds", "1", "--out", str(out), timeout_s=120)
    assert "server CPU per round trip" in output
    results = json.loads(out.read_text())
    assert results["config"]["connections"] == 16 and results["config"]["repeats"] == 1
    assert len(results["cases"]) == 4
    for label, case in results["cases"].items():
        (run,) = case["runs"]
        assert run["round_trips"] > 0, label
        assert run["server_cpu_s"] >= 0 and case["us_per_round_trip_median"] == run["us_per_round_trip"], label
