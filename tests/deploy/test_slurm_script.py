"""deploy/slurm/envoys.sbatch run as SLURM would run two array tasks, against a director over mTLS on loopback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from fedjax_core import pki
from processes import REPO, SHARED_DATA, Process, Stack

SBATCH = REPO / "deploy" / "slurm" / "envoys.sbatch"


def _env(tmp_path: Path, task_id: int, task_min: int = 1, count: int = 2, **extra: str) -> dict[str, str]:
    """What SLURM sets for array task ``task_id``, plus the script's variables."""
    return {"SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_MIN": str(task_min),
            "SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_SUBMIT_DIR": str(REPO),
            "FEDJAX_VENV": sys.prefix, "FEDJAX_PKI_DIR": str(tmp_path / "pki"), "FEDJAX_DATA_DIR": str(SHARED_DATA),
            "FEDJAX_WORK_ROOT": str(tmp_path / "work"), "DIRECTOR_HOST": "127.0.0.1", **extra}


def test_array_tasks_start_envoys_with_their_own_shard_and_certificate(tmp_path):
    stack = Stack(tmp_path, n_envoys=0, tls=True)  # PKI in tmp_path/pki, a director named `director`
    for rank in (1, 2):
        pki.certify(stack.pki, f"env{rank}", role="envoy")
    tasks: list[Process] = []
    try:
        stack.start_director()
        for task_id in (1, 2):
            env = _env(tmp_path, task_id, DIRECTOR_PORT=str(stack.port))
            tasks.append(Process(["bash", str(SBATCH)], cwd=tmp_path, env=env, name=f"array task {task_id}"))
            stack.processes.append(tasks[-1])
        for rank, task in enumerate(tasks, 1):
            task.wait_for(rf"envoy env{rank}: shard {rank} of 2 on ")
            task.wait_for(rf"ENVOY READY env{rank}")
            config = yaml.safe_load((tmp_path / "work" / f"env{rank}" / "envoy_config.yaml").read_text())
            assert config["shard_descriptor"]["params"]["rank_worldsize"] == f"{rank}, 2"
            assert config["tls"]["certificate"] == str(tmp_path / "pki" / f"env{rank}.crt")
        registry = stack.federation().get_shard_registry()
        assert sorted(registry) == ["env1", "env2"]
    finally:
        stack.stop()
        print(stack.logs())


def _run(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)


def test_ranks_count_from_one_whatever_the_first_array_index(tmp_path):
    """--array=0-3: task 0 is rank 1 (here it stops at the missing certificate, which names the envoy)."""
    result = _run(tmp_path, _env(tmp_path, 0, task_min=0, count=4))
    assert result.returncode == 1
    assert f"{tmp_path / 'pki' / 'root_ca.crt'} is missing" in result.stderr
    pki.init_ca(tmp_path / "pki")
    result = _run(tmp_path, _env(tmp_path, 0, task_min=0, count=4))
    assert "env1.crt is missing: on the CA's machine run fedjax pki certify --dir pki --name env1 --role envoy" \
        in result.stderr


def test_missing_director_host_and_rank_outside_the_world_are_refused(tmp_path):
    result = _run(tmp_path, _env(tmp_path, 1, DIRECTOR_HOST=""))
    assert result.returncode != 0 and "set DIRECTOR_HOST" in result.stderr
    result = _run(tmp_path, _env(tmp_path, 3, FEDJAX_WORLD_SIZE="2"))
    assert result.returncode == 2 and "rank 3 is outside 1..2" in result.stderr
