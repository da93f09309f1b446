"""The worker's environment: device choice and JAX/TF memory settings from the envoy config."""
import os
import platform
import subprocess
import sys

import pytest

from fedjax_core.config import EnvoyParams
from fedjax_core.envoy.worker_env import worker_environment


def env_for(tmp_path, **params):
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/existing", "JAX_PLATFORMS": "cuda",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
    return worker_environment(EnvoyParams(**params), base, tmp_path)


def test_no_cuda_devices_means_cpu_only_and_no_preallocation(tmp_path):
    env = env_for(tmp_path)
    assert env["JAX_PLATFORMS"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env  # an inherited fraction does not leak in
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert env["PYTHONPATH"] == os.pathsep.join([str(tmp_path), "/existing"])
    assert env["PATH"] == "/usr/bin"


def test_gpus_preallocation_and_fraction(tmp_path):
    env = env_for(tmp_path, cuda_devices=[1, 3], jax_preallocate=True, jax_memory_fraction=0.45)
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert "JAX_PLATFORMS" not in env  # JAX picks the GPU backend itself
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.450"


def test_the_worker_environment_is_an_allow_list_not_a_copy(tmp_path):
    base = {"PATH": "/usr/bin", "MY_SECRET_TOKEN": "hunter2", "AWS_SECRET_ACCESS_KEY": "x", "LC_ALL": "C",
            "FEDJAX_TEST_FAIL_ROUNDS": "1", "XLA_FLAGS": "--xla_dump_to=/tmp/x", "SSH_AUTH_SOCK": "/tmp/agent"}
    env = worker_environment(EnvoyParams(), base, tmp_path, home="/home/worker")
    assert not {"MY_SECRET_TOKEN", "AWS_SECRET_ACCESS_KEY", "SSH_AUTH_SOCK"} & set(env)
    assert env["LC_ALL"] == "C" and env["FEDJAX_TEST_FAIL_ROUNDS"] == "1" and env["XLA_FLAGS"].startswith("--xla")
    assert env["HOME"] == "/home/worker"


def test_no_compilation_cache_reaches_the_worker_from_the_daemons_environment(tmp_path):
    inherited = {"PATH": "/usr/bin", "JAX_COMPILATION_CACHE_DIR": "/shared/cache", "JAX_ENABLE_COMPILATION_CACHE": "0",
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "5", "JAX_PLATFORMS": "cpu",
                 "XLA_FLAGS": "--xla_gpu_kernel_cache_file=/shared/k --xla_dump_to=/tmp/x "
                              "--xla_gpu_per_fusion_autotune_cache_dir=/shared/a"}
    for params in (EnvoyParams(), EnvoyParams(jax_compilation_cache=True)):  # on: the spec names the folder
        env = worker_environment(params, inherited, tmp_path)
        assert not [k for k in env if "CACHE" in k], env
        assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"  # the operator's other flags stay
    assert "XLA_FLAGS" not in worker_environment(EnvoyParams(), {"XLA_FLAGS": "--xla_gpu_kernel_cache_file=/k"},
                                                 tmp_path)


def test_the_worker_reuses_freed_memory_unless_told_not_to(tmp_path):
    assert env_for(tmp_path)["MALLOC_MMAP_MAX_"] == "0" and "MALLOC_TRIM_THRESHOLD_" in env_for(tmp_path)
    off = env_for(tmp_path, worker_reuses_memory=False)
    assert not [k for k in off if k.startswith("MALLOC_")]
    assert not [k for k in worker_environment(EnvoyParams(worker_reuses_memory=False), {"MALLOC_MMAP_MAX_": "0"},
                                              tmp_path) if k.startswith("MALLOC_")]  # nor the daemon's own


# A fresh 64 MiB buffer, filled, freed, then another: the second one's page faults show whether the freed memory
# was reused (a few) or mapped afresh (as many as the first's).
_FAULTS = """
import resource, numpy as np
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(64 << 20, np.uint8); a.fill(1); del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults(), faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc malloc's")
def test_with_those_settings_a_process_reuses_what_it_freed(tmp_path):
    def second_over_first(env):
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        first, second = map(int, out.stdout.split())
        return second / first

    base = {"PATH": os.environ.get("PATH", "/usr/bin")}
    assert second_over_first(base) > 0.5  # glibc's defaults: mapped afresh, faulted in again
    assert second_over_first(worker_environment(EnvoyParams(), base, tmp_path)) < 0.1
