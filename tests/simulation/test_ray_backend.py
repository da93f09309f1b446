"""SimulatedFederation(backend="ray"): the envoys' tasks on the actors of a real Ray cluster started on loopback
(``ray start --head``), the rounds here; the same experiments end with the models a one-process run reaches."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_core import Dynamic, FLExperiment, ModelInterface, partition
from fedjax_core.records import Stage
from fedjax_core.simulation import SimulatedFederation
from linear_federation import FAIL, Arrays, data, linear_state, run, tasks
from test_simulated_federation import shard_sets

# `ray start` turns on token authentication; a driver that connects must say so before Ray is imported (Ray reads
# its mode then). The token is this run's own, in the environment of the head and of this driver: `ray start` does
# not make one (Ray 2.60 refuses to start without ~/.ray/auth_token or RAY_AUTH_TOKEN), and none is left behind.
os.environ.setdefault("RAY_AUTH_MODE", "token")
if not (Path.home() / ".ray" / "auth_token").exists() and "RAY_AUTH_TOKEN_PATH" not in os.environ:
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'fedjax-core[ray]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}: {process.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the Ray head did not listen on 127.0.0.1:{port} within {timeout_s} s")


def kill_session(sid: int) -> None:
    """SIGKILL every process left in session ``sid`` (the head was started in a session of its own)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after the command: state, ppid, pgrp, session
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head on 127.0.0.1 with two CPUs (two actors), in a process group this fixture ends."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        wait_for_port(port, head)
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.terminate()  # --block: the head stops the processes it started, then exits
        try:
            head.wait(timeout=60)
        finally:
            kill_session(head.pid)  # whatever outlived it (Ray's workers lead their own process groups)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def on_ray(ray_cluster):
    """Six envoys on two actors of the cluster, for every test here (the actors start and compile once)."""
    fed = federation(backend="ray", address=ray_cluster, ray_options={"actors": 2, "max_restarts": 1})
    yield fed
    fed.close()


def federation(**options) -> SimulatedFederation:
    return SimulatedFederation.from_arrays(train=data(600, 0), valid=data(120, 1),
                                           partition=partition.dirichlet(n_envoys=6, alpha=1.0, seed=0), **options)


def leaves(exp) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(exp.get_last_model().params)]


def test_experiments_on_ray_actors_end_with_the_one_process_models(on_ray):
    local = federation()
    try:
        assert len(on_ray.client.ray.actors) == 2 and len(set(on_ray.client.ray.where)) == 2  # two processes
        sizes = sorted(len(s["label"]) for s in shard_sets(local, "train").values())
        FAIL["envoy_train_size"] = sizes[0]  # one envoy's task raises, wherever it runs
        try:
            runs = {name: [run(fed, "local-models", rounds=3, envoys_per_round=4, sampling_seed=3, min_envoys=1,
                               round_timeout_s=3600, opt_treatment="CONTINUE_LOCAL"),
                           run(fed, "dynamic", rounds=4, sync=Dynamic(delta_threshold=0.05),
                               opt_treatment="CONTINUE_LOCAL")]
                    for name, fed in (("local", local), ("ray", on_ray))}
        finally:
            FAIL["envoy_train_size"] = -1
        for one, spread in zip(runs["local"], runs["ray"]):
            assert spread.get_experiment_status().state == "finished"
            assert spread.get_experiment_status().participants == one.get_experiment_status().participants
            for got, want in zip(leaves(spread), leaves(one)):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            for stage in (Stage.DROPOUT, Stage.SYNC_CHECK):
                assert ({(e.round, e.envoy) for e in spread.history if e.stage == stage}
                        == {(e.round, e.envoy) for e in one.history if e.stage == stage})
        dropouts = [e for e in runs["ray"][0].history if e.stage == Stage.DROPOUT]
        assert dropouts and all("this envoy's task fails" in e.note for e in dropouts)
        averaged = [int(next(m.value for m in e.metrics if m.name == "averaged"))
                    for e in runs["ray"][1].history if e.stage == Stage.ROUND and not e.envoy]
        assert 0 < sum(averaged) < 4  # dynamic averaging both kept models and averaged them: check-ins then SYNCs
    finally:
        local.close()


def test_bad_ray_options_are_refused_before_ray_starts(monkeypatch):
    with pytest.raises(ValueError, match=r"ray_options\['cpus_per_actor'\]: Input should be greater than 0"):
        federation(backend="ray", ray_options={"cpus_per_actor": 0})
    with pytest.raises(ValueError, match=r"ray_options\['gpu'\]: Extra inputs are not permitted"):
        federation(backend="ray", ray_options={"gpu": 1})
    with pytest.raises(ValueError, match="backend 'dask' is not one of"):
        federation(backend="dask")
    with pytest.raises(ValueError, match="are for backend='ray'"):
        federation(address="127.0.0.1:6379")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError, match=r"pip install 'fedjax-core\[ray\]'"):
        federation(backend="ray")


class CrashOnce(Arrays):
    """The first envoy to load its data ends its process (the Ray actor) at once; later ones load as usual."""

    marker = ""

    def get_train_loader(self, **kwargs):
        try:  # created atomically: of two actors loading at once, exactly one wins and dies
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return super().get_train_loader(**kwargs)
        os._exit(1)


def test_an_actor_that_dies_drops_its_envoys_for_the_round_and_comes_back(on_ray, tmp_path):
    fed = on_ray  # a new experiment: each actor makes its envoys' runners, loading their data, and one dies there
    CrashOnce.marker = str(tmp_path / "crashed")
    exp = FLExperiment(federation=fed, experiment_name="crash")
    exp.start(model_provider=ModelInterface(model=linear_state()), task_keeper=tasks(), data_loader=CrashOnce(),
              rounds_to_train=2, min_envoys=1, round_timeout_s=3600, opt_treatment="RESET")
    exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    assert exp.get_experiment_status().state == "finished"
    dropouts = [e for e in exp.history if e.stage == Stage.DROPOUT]
    homes = fed.client.ray.home
    lost = {homes[e.envoy] for e in dropouts}
    assert {e.round for e in dropouts} == {0} and len(lost) == 1  # one actor's envoys, in round 0 only
    assert {e.envoy for e in dropouts} == {name for name, home in homes.items() if home in lost}
    assert all("the Ray actor running envoy" in e.note and "drops out of this round" in e.note for e in dropouts)
    trained = {e.envoy for e in exp.history if e.stage == Stage.TRAIN and e.envoy and e.round == 1}
    assert trained == set(homes)  # the actor came back: every envoy trains the next round
