"""``benchmarks/strategies.py`` (``make bench-strategies``) runs every strategy to the end: a slow test."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_strategy_finishes_on_four_envoys(tmp_path):
    out = tmp_path / "strategies.json"
    proc = subprocess.run([sys.executable, "-u", str(REPO / "benchmarks" / "strategies.py"), "--rounds", "1",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    assert len(results) >= 8 and all(r["state"] == "finished" for r in results)
    assert all(0 <= r["final_accuracy"] <= 1 and r["wall_s"] > 0 for r in results)
