"""Code from the notebook and from modules beside it reaches an envoy that has neither."""
import subprocess
import sys
import textwrap

import cloudpickle

from fedjax_core.api.experiment import FLExperiment, local_modules


def test_modules_beside_the_notebook_are_pickled_by_value(tmp_path, monkeypatch):
    notebook_dir = tmp_path / "notebook"
    notebook_dir.mkdir()
    (notebook_dir / "my_helpers.py").write_text(textwrap.dedent("""
        SCALE = 3

        def scaled(x):
            return x * SCALE
    """))
    monkeypatch.chdir(notebook_dir)
    monkeypatch.syspath_prepend(str(notebook_dir))
    import my_helpers

    assert my_helpers in local_modules(notebook_dir)
    assert cloudpickle not in local_modules(notebook_dir)  # installed packages travel by reference

    def task(x):  # defined "in the notebook", calling into the module beside it
        return my_helpers.scaled(x) + 1

    payload = FLExperiment._pickle({"task": task}, ())
    (tmp_path / "payload.bin").write_bytes(payload)
    envoy_dir = tmp_path / "envoy"
    envoy_dir.mkdir()
    script = "import cloudpickle, sys; print(cloudpickle.loads(open(sys.argv[1], 'rb').read())['task'](5))"
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "payload.bin")], cwd=envoy_dir,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "16"
    # registration is undone after pickling, so later pickles are unaffected
    assert b"my_helpers" in cloudpickle.dumps(my_helpers.scaled)  # by reference again
