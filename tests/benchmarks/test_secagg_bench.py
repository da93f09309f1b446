"""``benchmarks/secagg.py --quick`` (the second half of ``make bench``) runs end to end and writes the figures it
promises: positive times per phase for each envoy count, with and without dropouts, and byte counts that follow
from the protocol (8 bytes per masked entry, 2 x 32 bytes of keys, a share phase linear in the neighbours).

No timing thresholds: machines are noisy.
"""
from __future__ import annotations

import json

from processes import assert_positive, run_benchmark

from fedjax_core.secagg import protocol

TIMEOUT_S = 60


def test_quick_secagg_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "secagg.json"
    output = run_benchmark("secagg.py", "--quick", "--out", str(out), timeout_s=TIMEOUT_S)
    assert "| envoys | neighbours |" in output and "all within" in output
    results = json.loads(out.read_text())
    assert results["quick"] is True
    params = results["config"]["params"]
    assert results["config"]["envoys"] == [4, 8] and params == 1000
    machine = results["machine"]
    assert machine["nproc"] >= 1 and machine["python"] and machine["cryptography"]

    cases = results["cases"]
    assert [(c["n"], c["dropped_count"]) for c in cases] == [(4, 0), (4, 1), (8, 0), (8, 1)]
    per_neighbour = set()
    for c in cases:
        n = c["n"]
        assert c["ok"] is True and c["max_error"] < c["error_bound"]
        assert c["degree"] == protocol.degree(n) and c["n_minus_1"] == n - 1 and c["size"] == params + 1
        assert_positive(c, "client_ms_per_party.advertise", "client_ms_per_party.share", "client_ms_per_party.mask",
                        "client_ms_per_party.total", "server_ms.advertise", "server_ms.share", "server_ms.mask",
                        "server_ms.unmask", "server_ms.total", "plain_fold_ms", "wall_clock.server_ms.total")
        sent, received = c["bytes_per_envoy"]["sent"], c["bytes_per_envoy"]["received"]
        assert sent["masked"] == 8 * (params + 1)  # uint64 per entry: the params and the weight entry
        assert sent["keys"] == 2 * 32
        assert c["bytes_per_envoy"]["plain_upload"] == 4 * params
        assert_positive(sent, "shares", "reveal", "total")
        assert_positive(received, "setup", "keys", "shares", "unmask", "total")
        assert sent["total"] == sum(sent[k] for k in ("keys", "shares", "masked", "reveal"))
        per_neighbour.add(c["bytes_per_envoy"]["share_phase_per_neighbour"])
        if c["dropped_count"]:
            assert c["bytes_of_dropped_envoy"]["sent"].get("masked", 0) == 0  # it left after sharing
    assert len(per_neighbour) == 1  # the share phase costs the same per neighbour whatever n
