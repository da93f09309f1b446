"""The checked-in generated proto code is what ``make proto`` makes from protos/ today."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "protos" / "fedjax_proto"
GENERATED_DIR = REPO / "fedjax_proto"


def _generate(out: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the protos")
    protos = sorted(str(p.relative_to(REPO)) for p in PROTO_DIR.glob("*.proto"))
    assert protos, f"no .proto files in {PROTO_DIR}"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={out}",
           f"--grpc_python_out={out}", f"--pyi_out={out}", *protos]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"protoc failed:\n{proc.stderr}"


def test_generated_code_is_up_to_date(tmp_path):
    _generate(tmp_path)
    fresh_dir = tmp_path / "fedjax_proto"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    checked_in = {p.name: p.read_bytes() for p in GENERATED_DIR.iterdir()
                  if p.is_file() and p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))}
    # Every .proto gives three files.
    assert len(fresh) == 3 * len(list(PROTO_DIR.glob("*.proto")))
    missing = sorted(set(fresh) - set(checked_in))
    stale = sorted(name for name in set(fresh) & set(checked_in) if fresh[name] != checked_in[name])
    orphans = sorted(set(checked_in) - set(fresh))
    assert not (missing or stale or orphans), (
        "fedjax_proto/ is out of date with protos/: "
        f"missing {missing}, differing {stale}, without a .proto {orphans}. Run `make proto` and commit the result."
    )
