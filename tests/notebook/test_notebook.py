"""The tutorial notebook, executed end to end against the tutorial's own start scripts.

A director and two envoys are started through ``director/start_director.sh`` and
``envoy/start_envoy.sh`` (copies in tmp_path, so ports and state never clash with anything
running from the repository), then ``workspace/FLAX_CIFAR10_CNN.ipynb`` runs headless with
nbclient in a copy of ``workspace/``, so its TensorBoard logs land in tmp_path too.

Environment knobs:
- ``FEDJAX_TEST_ROUNDS`` (default 3): federated rounds the notebook trains;
- ``FEDJAX_WRITE_DOCS=1``: save the notebook's figure as ``docs/cifar10_curves.png`` in the
  repository (otherwise it goes to tmp_path).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from fedjax_core.local import QUIET_KERNEL_ARGS
from processes import Process, REPO, SHARED_DATA, copy_tutorial, free_port, notebook_text

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = REPO / "workspace" / "FLAX_CIFAR10_CNN.ipynb"
ROUNDS = int(os.environ.get("FEDJAX_TEST_ROUNDS", "3"))
EXPERIMENT = "notebook_cifar10"


def _value(text: str, key: str) -> float:
    match = re.search(rf"^{key}=(\S+)$", text, re.MULTILINE)
    assert match, f"the notebook printed no {key}=... line; its output:\n{text}"
    return float(match.group(1))


@pytest.mark.timeout(900)
def test_tutorial_notebook_runs_against_the_shipped_scripts(tmp_path, monkeypatch):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"CIFAR-10 subset not found at {SHARED_DATA}")
    port = free_port()
    director_dir, envoy_dir = copy_tutorial(tmp_path, port)
    # The copies live outside the repository, so the scripts cannot find ../.venv/bin/fedjax themselves.
    env = {"FEDJAX_BIN": str(Path(sys.executable).parent / "fedjax")}

    workdir = tmp_path / "workspace"
    workdir.mkdir()
    shutil.copy(NOTEBOOK, workdir / NOTEBOOK.name)
    write_docs = os.environ.get("FEDJAX_WRITE_DOCS") == "1"
    plot_path = REPO / "docs" / "cifar10_curves.png" if write_docs else tmp_path / "cifar10_curves.png"

    processes: list[Process] = []
    started = time.monotonic()
    try:
        director = Process([str(director_dir / "start_director.sh")], env=env, name="director")
        processes.append(director)
        director.wait_for(r"DIRECTOR READY")
        for name, config in (("env_one", "envoy_config.yaml"), ("env_two", "envoy_config_2.yaml")):
            processes.append(Process([str(envoy_dir / "start_envoy.sh"), name, config, "-dh", "127.0.0.1",
                                      "-dp", str(port)], env=env, name=name))
        for envoy in processes[1:]:
            envoy.wait_for(r"ENVOY READY")
        stack_ready = time.monotonic()

        # nbclient starts the kernel with this process's environment.
        monkeypatch.setenv("FEDJAX_DIRECTOR_HOST", "127.0.0.1")
        monkeypatch.setenv("FEDJAX_DIRECTOR_PORT", str(port))
        monkeypatch.setenv("FEDJAX_ROUNDS", str(ROUNDS))
        monkeypatch.setenv("FEDJAX_EXPERIMENT", EXPERIMENT)
        monkeypatch.setenv("FEDJAX_CIFAR10_DIR", str(SHARED_DATA))
        monkeypatch.setenv("FEDJAX_PLOT_PATH", str(plot_path))
        # The envoys' workers run on CPU (cuda_devices: []); so does the notebook's own check.
        monkeypatch.setenv("JAX_PLATFORMS", "cpu")
        monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", extra_arguments=QUIET_KERNEL_ARGS,
                                         resources={"metadata": {"path": str(workdir)}})
        try:
            client.execute()
        finally:
            nbformat.write(nb, tmp_path / "executed.ipynb")
        finished = time.monotonic()
    except BaseException:
        for p in processes:
            print(f"===== {p.name} =====\n{p.output()}")
        raise
    finally:
        for p in reversed(processes):
            p.stop()

    text = notebook_text(nb)
    print(text)
    print(f"stack start {stack_ready - started:.1f}s, notebook {finished - stack_ready:.1f}s")

    # every round completed
    status = re.search(r"state=(\w+), current_round=(\d+), rounds=(\d+)", text)
    assert status, text
    assert status.group(1) == "finished", text
    assert int(status.group(2)) == ROUNDS and int(status.group(3)) == ROUNDS, text

    # the per-round table: round 0 validates the initial model, round ROUNDS the final aggregate
    per_round = {int(m.group(1)): float(m.group(2))
                 for m in re.finditer(r"^round (\d+)\s+agg_val_acc=(\S+)", text, re.MULTILINE)}
    assert sorted(per_round) == list(range(ROUNDS + 1)), text
    assert max(per_round[r] for r in range(1, ROUNDS + 1)) > per_round[0], per_round
    assert per_round[ROUNDS] > per_round[0], per_round

    # the best model, returned into the notebook and evaluated there, scores what the director reported
    best_round = int(_value(text, "BEST_ROUND"))
    director_acc = _value(text, "DIRECTOR_VALIDATION_ACCURACY")
    notebook_acc = _value(text, "NOTEBOOK_VALIDATION_ACCURACY")
    assert 1 <= best_round <= ROUNDS
    assert abs(notebook_acc - director_acc) < 1e-6, (notebook_acc, director_acc)
    assert abs(per_round[best_round] - director_acc) < 1e-4, (per_round, director_acc)
    assert director_acc == pytest.approx(max(per_round[r] for r in range(1, ROUNDS + 1)), abs=1e-4)
    assert _value(text, "TEST_ACCURACY") > 0.1

    # TensorBoard event files beside the notebook (and the director's own)
    assert list((workdir / "logs" / EXPERIMENT).rglob("events.out.tfevents.*")), list(workdir.rglob("*"))
    assert list((director_dir / "logs" / EXPERIMENT).rglob("events.out.tfevents.*"))
    # the figure
    assert plot_path.is_file() and plot_path.stat().st_size > 10_000
    assert any("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_headless_kernels_do_not_warn_about_tcp_transport():
    """make demo and this test start kernels with QUIET_KERNEL_ARGS: no warning the user need not read."""
    import subprocess

    script = ("import nbclient, nbformat; from fedjax_core.local import QUIET_KERNEL_ARGS as q\n"
              "nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('print(6 * 7)')])\n"
              "nbclient.NotebookClient(nb, kernel_name='python3', extra_arguments=q).execute()\n"
              "print(nb.cells[0].outputs[0]['text'].strip())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"
    assert "without encryption" not in result.stderr
