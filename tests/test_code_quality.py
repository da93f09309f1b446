"""Static checks that keep main clean: pyflakes, and no unfinished markers in the library."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tracked_python_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split() if "_pb2" not in f]


def test_pyflakes_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "pyflakes", *tracked_python_files()], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_has_no_unfinished_markers():
    markers = ("TO" + "DO", "FIX" + "ME", "NotImplemented" + "Error")
    offenders = [f"{path}:{n}" for path in (REPO / "fedjax_core").rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if any(m in line for m in markers)]
    assert offenders == []
