"""A short run of ``benchmarks/fuzz_rpcs.py`` (``make fuzz`` sends 10,000 calls), and proof that
its checker fails on the outcomes it exists to catch."""
from __future__ import annotations

import json
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import fuzz_rpcs  # noqa: E402
from processes import run_benchmark  # noqa: E402

TIMEOUT_S = 150  # a guard; the run takes about 20 s on two cores


def test_a_short_fuzz_passes_and_the_director_still_runs_an_experiment(tmp_path):
    out = tmp_path / "fuzz.json"
    output = run_benchmark("fuzz_rpcs.py", "--messages", "300", "--seed", "7", "--json", str(out), timeout_s=TIMEOUT_S)
    assert "FUZZ PASSED" in output
    result = json.loads(out.read_text())
    assert result["passed"] and result["unacceptable"] == 0 and not result["problems"]
    assert result["calls"] == 300 and result["messages"] >= 300
    assert result["origins"]["generated"] > 0 and result["origins"]["mutated"] > 0
    rpcs = fuzz_rpcs.discover_rpcs()
    assert {"fedjax.EnvoyService/UploadUpdate", "fedjax.FederationService/SubmitExperiment"} <= {r.key for r in rpcs}
    assert set(result["per_rpc"]) == {r.key for r in rpcs}
    assert all(entry["calls"] > 0 for entry in result["per_rpc"].values()), result["per_rpc"]
    assert result["experiment_after_fuzz"]["state"] == "finished"
    assert result["heartbeat_worst_s"] < 1.0


def _rpc(key: str) -> fuzz_rpcs.Rpc:
    return next(r for r in fuzz_rpcs.discover_rpcs() if r.key == key)


def test_the_checker_fails_on_unmapped_exceptions_hangs_and_internal_errors():
    dataset_info, wait_task = _rpc("fedjax.FederationService/GetDatasetInfo"), _rpc("fedjax.EnvoyService/WaitTask")
    valid, garbage = [b""], [b"\xff\xff\xff"]
    assert fuzz_rpcs.classify(dataset_info, "UNKNOWN", "Exception calling application: boom", valid)[1]
    assert fuzz_rpcs.classify(dataset_info, "INTERNAL", "Failed to serialize response!", valid)[1]
    # gRPC's INTERNAL for unparseable bytes is accepted only if the bytes indeed do not parse
    assert fuzz_rpcs.classify(dataset_info, "INTERNAL", fuzz_rpcs.GRPC_UNPARSEABLE, garbage) == (
        fuzz_rpcs.UNPARSEABLE, None)
    assert fuzz_rpcs.classify(dataset_info, "INTERNAL", fuzz_rpcs.GRPC_UNPARSEABLE, valid)[1]
    assert fuzz_rpcs.classify(dataset_info, "DEADLINE_EXCEEDED", "Deadline Exceeded", valid)[1]
    assert fuzz_rpcs.classify(wait_task, "DEADLINE_EXCEEDED", "Deadline Exceeded", valid) == ("DEADLINE_EXCEEDED", None)
    assert fuzz_rpcs.classify(dataset_info, "INVALID_ARGUMENT", "bad name", valid) == ("INVALID_ARGUMENT", None)


def test_the_checker_catches_a_real_server_that_raises_or_hangs():
    """A stand-in director whose GetDatasetInfo raises and whose GetShardRegistry never answers."""
    release = threading.Event()

    def raises(request, context):
        raise RuntimeError("an exception nobody mapped")

    def hangs(request, context):
        release.wait(timeout=30)
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("fedjax.FederationService", {
        "GetDatasetInfo": grpc.unary_unary_rpc_method_handler(raises),
        "GetShardRegistry": grpc.unary_unary_rpc_method_handler(hangs)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        tally = fuzz_rpcs.Tally()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name, timeout in (("GetDatasetInfo", 5.0), ("GetShardRegistry", 0.3)):
                rpc = _rpc(f"fedjax.FederationService/{name}")
                code, details, _ = fuzz_rpcs.call(channel, rpc, [b""], timeout)
                tally.record(rpc, "generated", [b""], code, details, timeout)
        assert tally.failure_count == 2
        unknown, hung = tally.failures
        assert unknown["status"] == "UNKNOWN" and "did not map" in unknown["problem"]
        assert hung["status"] == "DEADLINE_EXCEEDED" and "not a long-poll" in hung["problem"]
        assert tally.codes["fedjax.FederationService/GetDatasetInfo"]["UNKNOWN"] == 1
    finally:
        release.set()
        server.stop(grace=None)


def test_the_memory_check_fails_on_a_director_that_grows_past_its_first_pass():
    assert fuzz_rpcs.memory_growth_problems(80.0, [120.0, 121.5, 119.0], 10_000) == []  # flat after pass 1
    [problem] = fuzz_rpcs.memory_growth_problems(80.0, [120.0, 150.0], 10_000)
    assert "grew by 30.0 MiB over pass 2" in problem and "something holds memory per call" in problem
