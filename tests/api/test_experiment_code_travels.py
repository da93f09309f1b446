"""Code from the notebook and from the user's own modules, wherever they live, reaches an envoy
that has neither; a module an envoy lacks is named in the error, with the fix."""
import subprocess
import sys
import textwrap

import cloudpickle
import numpy

from fedjax_core.api.experiment import pickle_user_objects, user_modules
from fedjax_core.envoy import worker


def _load_elsewhere(tmp_path, payload: bytes) -> subprocess.CompletedProcess:
    """Unpickle ``payload`` in a fresh process, in a folder without the user's modules, and call its task with 5."""
    (tmp_path / "payload.bin").write_bytes(payload)
    envoy_dir = tmp_path / "envoy"
    envoy_dir.mkdir(exist_ok=True)
    script = ("import sys; from fedjax_core.envoy.worker import unpickle_experiment; "
              "print(unpickle_experiment(open(sys.argv[1], 'rb').read())['task'](5))")
    return subprocess.run([sys.executable, "-c", script, str(tmp_path / "payload.bin")], cwd=envoy_dir,
                          capture_output=True, text=True, timeout=60)


def test_a_module_outside_the_notebooks_folder_travels_by_value(tmp_path, monkeypatch):
    notebook_dir, lib_dir = tmp_path / "notebook", tmp_path / "lib"
    notebook_dir.mkdir()
    lib_dir.mkdir()
    (lib_dir / "my_models.py").write_text(textwrap.dedent("""
        SCALE = 3

        def scaled(x):
            return x * SCALE
    """))
    monkeypatch.chdir(notebook_dir)
    monkeypatch.syspath_prepend(str(lib_dir))  # the notebook does sys.path.append("../lib")
    import my_models

    modules = user_modules()
    assert my_models in modules
    assert cloudpickle not in modules and numpy not in modules  # installed packages travel by reference
    assert worker not in modules  # nor does the platform itself

    def task(x):  # defined "in the notebook", calling into the module in ../lib
        return my_models.scaled(x) + 1

    result = _load_elsewhere(tmp_path, pickle_user_objects({"task": task}))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "16"
    # registration is undone after pickling, so later pickles are unaffected
    assert b"my_models" in cloudpickle.dumps(my_models.scaled)  # by reference again


def test_a_module_the_envoy_cannot_import_is_named_with_the_fix(tmp_path, monkeypatch):
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    (lib_dir / "only_here.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(lib_dir))
    import only_here

    payload = cloudpickle.dumps({"task": only_here.double})  # by reference, as an installed module would be
    result = _load_elsewhere(tmp_path, payload)
    assert result.returncode != 0
    assert "needs module 'only_here', which this envoy cannot import" in result.stderr
    assert "pickle_by_value=[only_here]" in result.stderr


def test_a_module_shadowing_an_installed_name_travels_and_an_editable_install_does_not(tmp_path, monkeypatch):
    import importlib.metadata
    import site

    from fedjax_core.api import experiment

    lib, fake_site = tmp_path / "lib", tmp_path / "site-packages"
    (fake_site / "utils_shadowed").mkdir(parents=True)  # an installed package of the same name
    lib.mkdir()
    (lib / "utils_shadowed.py").write_text("X = 1\n")
    (lib / "editable_pkg.py").write_text("Y = 2\n")
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(fake_site)])
    monkeypatch.setattr(importlib.metadata, "packages_distributions",
                        lambda: {"utils_shadowed": ["utils-dist"], "editable_pkg": ["my-editable-dist"]})
    import editable_pkg
    import utils_shadowed

    modules = experiment.user_modules()
    assert utils_shadowed in modules  # the user's file, not the installed package
    assert editable_pkg not in modules  # pip install -e: the envoys install it too


def test_the_interfaces_unpickle_and_run_in_a_worker_without_the_notebook_api(tmp_path):
    """A pickle names each class's defining module: the interfaces and CustomTrainState are defined in
    fedjax_core.runtime, so a worker loading the bundle never imports fedjax_core.api (nor its tqdm, IPython)."""
    from fedjax_core import ModelInterface
    from fl_experiment import SubsetDataset, create_train_state, make_tasks

    objects = {"model_interface": ModelInterface(model=create_train_state()), "task_interface": make_tasks(),
               "data_interface": SubsetDataset(limit=8)}
    (tmp_path / "payload.bin").write_bytes(pickle_user_objects(objects))
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from fedjax_core.envoy.worker import unpickle_experiment
        from fedjax_core.runtime.tasks import run_task
        objects = unpickle_experiment(open(sys.argv[1], "rb").read())
        data = {"image": np.zeros((64, 32, 32, 3), np.float32), "label": np.zeros(64, np.int32)}
        state = objects["model_interface"].model
        _, metrics = run_task(objects["task_interface"], "train", state, data, "cpu", None, 0)
        print(type(state).__module__, type(objects["data_interface"]).__mro__[1].__module__, sorted(metrics)[-1])
        print(sorted(m for m in sys.modules if m == "fedjax_core.api" or m.startswith("fedjax_core.api.")))
    """)
    envoy_dir = tmp_path / "envoy"
    envoy_dir.mkdir()
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "payload.bin")], cwd=envoy_dir,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    classes, api_modules = result.stdout.strip().splitlines()[-2:]
    assert classes == "fedjax_core.runtime.train_state fedjax_core.runtime.interfaces train_acc"
    assert api_modules == "[]"
