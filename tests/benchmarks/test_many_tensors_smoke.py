"""A short run of ``benchmarks/many_tensors.py``: a model of many tiny tensors is submitted and runs its
rounds through a real director, and the figures it reports are there."""
from __future__ import annotations

import json

from processes import run_benchmark


def test_a_model_of_many_tiny_tensors_runs_its_rounds(tmp_path):
    out = tmp_path / "many.json"
    output = run_benchmark("many_tensors.py", "--tensors", "2000", "--rounds", "2", "--json", str(out), timeout_s=180)
    [result] = json.loads(out.read_text())
    assert result["tensors"] == 2000 and result["state"] in ("running", "finished"), output
    assert len(result["round_s"]) == 2 and all(s > 0 for s in result["round_s"])
    assert result["submit_beats"]["count"] >= 0 and result["round_beats"]["count"] > 0
