"""The package installs on a director or envoy host from a built wheel (README, 'Running on your own machines')."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


def test_a_built_wheel_installs_into_a_fresh_venv_and_runs_fedjax(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    for name in ("fedjax_core", "fedjax_proto"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", tmp_path / "dist", source])
    wheel = next((tmp_path / "dist").glob("fedjax_core-*.whl"))
    venv = tmp_path / "host"
    run([sys.executable, "-m", "venv", venv])
    run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel])
    # the dependencies come from this environment's site-packages (a host would pip install them)
    site = run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (Path(site.stdout.strip()) / "deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    help_text = run([venv / "bin" / "fedjax", "--help"], cwd=tmp_path).stdout
    assert "director" in help_text and "envoy" in help_text and "pki" in help_text
    where = run([venv / "bin" / "python", "-c", "import fedjax_core, fedjax_proto; print(fedjax_core.__file__); "
                 "print(fedjax_proto.__file__)"], cwd=tmp_path).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's copy, not the repository's
    run([venv / "bin" / "fedjax", "pki", "init", "--dir", tmp_path / "pki"], cwd=tmp_path)
    assert (tmp_path / "pki" / "root_ca.crt").is_file()
    # the dashboard's page ships inside the package (package data), so `fedjax dashboard` works from the wheel
    static = run([venv / "bin" / "python", "-c", "from fedjax_core.dashboard.app import STATIC; "
                  "print(sorted(p.name for p in STATIC.iterdir()))"], cwd=tmp_path).stdout
    assert all(name in static for name in ("index.html", "dashboard.js", "dashboard.css")), static
