"""``make bench-peers`` end to end, case 1 with one round on both systems (installs Flower into .venv-flower)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "cifar10-subset"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="no shared CIFAR-10 subset")
def test_case1_one_round_on_both_systems(tmp_path):
    out, png = tmp_path / "peers.json", tmp_path / "peers.png"
    proc = subprocess.run([sys.executable, "-u", str(REPO / "benchmarks" / "peers.py"), "--cases", "1", "--rounds", "1",
                           "--floor-epochs", "1", "--out", str(out), "--png", str(png)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    case = json.loads(out.read_text())["cases"]["1"]
    assert case["floor"]["floor_s"] > 0 and png.stat().st_size > 0
    for name in ("project", "flower"):
        s = case[name]
        assert len(s["round_times_s"]) == 1 and s["wall_s"] > 0 and s["peak_rss_bytes"] > 0
        assert len(s["accuracy"]) == 1 and 0 <= s["accuracy"][0] <= 1
    # same model code, shards, seeds and FedAvg weights: the same accuracy to a few test images
    assert abs(case["project"]["accuracy"][0] - case["flower"]["accuracy"][0]) < 0.01
    assert "recompilations after round 0" in proc.stdout
