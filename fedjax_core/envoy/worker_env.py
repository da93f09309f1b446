"""The worker's environment: an allow-list of the daemon's, then the device and memory settings.

Built before JAX starts in the worker (XLA reads these once): which devices it sees, whether it
preallocates and what share of the GPU it may take, whether malloc keeps freed memory for reuse,
and nothing that opens a compilation cache other experiments share.
"""
from __future__ import annotations

import os
from pathlib import Path

from fedjax_core.config import EnvoyParams

# The worker's environment is built from an allow-list, never copied whole from the daemon's.
WORKER_ENV_NAMES = ("PATH", "HOME", "LANG", "TMPDIR", "TZ", "PYTHONPATH", "PYTHONUNBUFFERED", "LD_LIBRARY_PATH")
WORKER_ENV_PREFIXES = ("LC_", "JAX_", "XLA_", "CUDA_", "NVIDIA_", "TF_", "TFDS_", "GRPC_", "FEDJAX_")


_HOST_DEVICE_COUNT = "--xla_force_host_platform_device_count"
# caches of compiled programs that one experiment's code could fill for another's to load
_CACHE_PREFIXES = ("JAX_COMPILATION_CACHE_", "JAX_PERSISTENT_CACHE_", "JAX_ENABLE_COMPILATION_CACHE")
_SHARED_CACHE_FLAGS = ("--xla_gpu_kernel_cache_file", "--xla_gpu_per_fusion_autotune_cache_dir",
                       "--xla_gpu_load_autotune_results_from")
# glibc malloc: no fresh mapping for a large block and no trimming of the heap, so what a round frees serves
# the next round's buffers without new pages (each fresh page costs a fault and the kernel's zeroing).
MALLOC_REUSE_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 62)}


def worker_environment(params: EnvoyParams, base: dict[str, str], extra_path: Path,
                       home: str | None = None) -> dict[str, str]:
    """The worker's environment: the allow-listed variables of ``base`` (WORKER_ENV_NAMES, and names
    starting with WORKER_ENV_PREFIXES: locale, JAX/XLA/CUDA/TF settings, FEDJAX_* test hooks), then
    the device choice, JAX/TF memory settings and malloc's reuse of freed memory (params.worker_reuses_memory),
    before JAX starts. ``home``: the worker account's.
    Nothing opens a compilation cache that experiments share: params.jax_compilation_cache gives each
    worker its submitter's folder in the spec instead."""
    env = {k: v for k, v in base.items()
           if (k in WORKER_ENV_NAMES or k.startswith(WORKER_ENV_PREFIXES)) and not k.startswith(_CACHE_PREFIXES)}
    if home is not None:
        env["HOME"] = home
    if params.cuda_devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in params.cuda_devices)
        env.pop("JAX_PLATFORMS", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_SHARED_CACHE_FLAGS)]
    if params.cpu_devices:  # XLA reads the host device count once, when JAX starts in the worker
        flags = [f for f in flags if not f.startswith(_HOST_DEVICE_COUNT)]
        flags.append(f"{_HOST_DEVICE_COUNT}={params.cpu_devices}")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true" if params.jax_preallocate else "false"
    if params.jax_memory_fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{params.jax_memory_fraction:.3f}"
    else:
        env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    if params.worker_reuses_memory:
        env.update(MALLOC_REUSE_ENV)
    env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"  # tensorflow-datasets must not grab the GPU beside JAX
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH", "")) if p)
    return env
