"""Experiment code attacks the envoy it runs on, from inside a real worker, over mTLS: the sandbox
(fedjax_core/envoy/sandbox.py) keeps the envoy's key and config, the daemon's environment and memory,
other experiments' files and everything outside the worker's own folder out of its reach, with the
standby worker and with a cold one; experiment names never name the daemon's folders; nothing of an
experiment's bundle or spec is left once it ended."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

import pytest

from fedjax_core import FLExperiment, ModelInterface
from fedjax_core import records as r
from fedjax_core.envoy import landlock
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import Stack, alive, wait_until
from sandbox_attacks import SECRET, attack_tasks

ATTACKS = ("daemon_environ", "daemon_memory", "daemon_ptrace", "config_from_cmdline", "envoy_key",
           "key_beside_descriptor", "work_dir_listing", "earlier_bundle", "director_state", "review_decision",
           "sitecustomize", "write_config_dir", "write_tmp", "service_socket", "daemons_session",
           "daemons_folder")
STILL_ALLOWED = ("own_tmp_write", "own_home_write", "multiprocessing_lock", "dev_shm_write")


@contextlib.contextmanager
def root_service(path: Path):
    """A Unix socket that answers every connection, as docker.sock or a root tmux would."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen()
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"root shell\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        server.close()


def run(federation, name: str, tasks) -> FLExperiment:
    exp = FLExperiment(federation=federation, experiment_name=name)
    exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=tasks,
              data_loader=SubsetDataset(limit=64), rounds_to_train=1, device_assignment_policy="CPU_ONLY")
    exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    return exp


@pytest.mark.parametrize("standby", [True, False], ids=["standby", "cold"])
def test_experiment_code_cannot_reach_the_envoys_secrets_or_other_experiments(tmp_path, standby):
    with root_service(tmp_path / "service.sock"):
        attack(tmp_path, standby)


def attack(tmp_path: Path, standby: bool) -> None:
    stack = Stack(tmp_path, n_envoys=1, tls=True, envoy_params={"standby_worker": standby})
    key_beside = tmp_path / "other_envoy.key"  # the config folder holds the descriptor, the config and this
    key_beside.write_text("-----BEGIN PRIVATE KEY-----\nnot for experiments\n-----END PRIVATE KEY-----\n")
    work_dir = tmp_path / "envoy_workspace"
    shm_name = f"fedjax-attack-{os.getpid()}-{standby}"
    targets = {"work_dir": str(work_dir), "config_dir": str(tmp_path), "envoy_key": str(stack.pki / "env1.key"),
               "key_beside": str(key_beside), "director_db": str(tmp_path / "director_state" / "director.sqlite"),
               "service_socket": str(tmp_path / "service.sock"), "shm_name": shm_name, "daemon_cwd": str(tmp_path)}
    try:
        stack.start(envoy_env={0: {"MY_SECRET_TOKEN": SECRET}})
        envoy = stack.processes[1]
        fed = stack.federation()
        named_review = run(fed, "review", make_tasks())  # named after the daemon's review desk
        assert named_review.get_experiment_status().state == "finished", stack.logs()
        assert not (work_dir / "env1" / "review").exists()  # review: auto has no desk, and the name made none

        exp = run(fed, "attack", attack_tasks(targets))
        assert exp.get_experiment_status().state == "finished", stack.logs()
        [train] = [e for e in exp.history if e.envoy == "env1" and e.stage == r.Stage.TRAIN]
        results = {m.name: m.value for m in train.metrics}
        attacks = ATTACKS + (("daemon_signal",) if landlock.abi_version() >= 6 else ())
        assert [name for name in attacks if results[name] != 0.0] == [], results
        assert [name for name in STILL_ALLOWED if results[name] != 1.0] == [], results
        assert not (tmp_path / "sitecustomize.py").exists() and not (tmp_path / "planted.txt").exists()
        assert not (work_dir / "env1" / "review").exists()
        assert alive(envoy.proc.pid)  # the ptrace attempt did not take the daemon
        assert not os.path.exists(f"/dev/shm/{shm_name}")  # its /dev/shm was its own
        wait_until(lambda: not alive(int(results["leftover_pid"])), 30, "what the worker started to go with it")

        envoy.wait_for("worker for 'attack' exited with code 0")
        wait_until(lambda: not [p for pattern in ("bundle.bin", "worker.json", "bundles/*")
                                for p in work_dir.rglob(pattern)], 30, "every bundle and spec to go with its experiment")
    finally:
        stack.stop()
        print(stack.logs())
