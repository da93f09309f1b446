"""bench.TreeCpuSampler: what each process tree (a root and its descendants apart) used between two moments, and
how peers.py reports it per settled round."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench  # noqa: E402
import peers  # noqa: E402

SPIN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"
PARENT = ("import subprocess, sys, time\n"
          "child = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
          "child.wait()\nsys.stdout.write('done\\n'); sys.stdout.flush(); time.sleep(60)\n")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_child_counts_under_its_parents_descendant_label_and_an_idle_root_under_its_own():
    """The parent idles while its child spins 0.4 s of CPU: the child's CPU goes to "workers", not "daemon"."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(child=SPIN.format(seconds=0.4))],
                              stdout=subprocess.PIPE, text=True)
    try:
        sampler = bench.TreeCpuSampler(lambda: {parent.pid: ("daemon", "workers")}, period=0.02).start()
        t0 = time.time()
        assert parent.stdout.readline() == "done\n"  # the child ran and exited
        sampler.sample()
        sampler.stop()
        spent = sampler.between(t0, time.time())
    finally:
        parent.kill()
        parent.wait()
    assert 0.3 <= spent["workers"] <= 1.5, spent  # its last sample, taken before it exited, counts
    assert spent.get("daemon", 0.0) < spent["workers"] / 2, spent
    assert sampler.between(0.0, 1.0).get("workers", 0.0) == 0.0  # before anything ran: the first sample to itself


def test_settled_cpu_per_round_in_the_summary_and_the_report():
    class Fixed:
        def between(self, t0, t1):
            assert (t0, t1) == (10.0, 16.0)  # from round 0's end to the last round's
            return {"director": 3.0, "workers": 1.5}

    cpu = peers.settled_cpu(Fixed(), [10.0, 12.0, 14.0, 16.0])
    s = peers.summarize([2.0, 2.0, 2.0, 2.0], 9.0, [], [], {"peak_rss_bytes": 1, "baseline_rss_bytes": 1}, 1, cpu)
    assert s["settled_cpu_s_per_round"] == {"director": 1.0, "workers": 0.5}  # three settled rounds
    assert peers._cpu_text(s["settled_cpu_s_per_round"]) == "; CPU s per settled round: director 1.00, workers 0.50"
    assert peers.settled_cpu(Fixed(), [10.0]) is None and peers._cpu_text(None) == ""
