"""Envoys decide what runs on them, and what their workers get: manual review, refusal as a dropout,
bundle integrity, and a worker with no key, no daemon secrets and no direct line to the director."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from fedjax_core import ExperimentFailed, FLExperiment, ModelInterface
from fedjax_core import records as r
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import FEDJAX, Stack, set_settings

FAST_REVIEW = {"FEDJAX_REVIEW_CHECK_S": "0.2"}  # the daemon looks for decisions this often


def start(federation, name: str, **kwargs) -> FLExperiment:
    exp = FLExperiment(federation=federation, experiment_name=name)
    exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
              data_loader=SubsetDataset(limit=128), device_assignment_policy="CPU_ONLY", **kwargs)
    return exp


def review(stack: Stack, index: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDJAX, "envoy", "review", "-c", str(stack.envoy_configs[index]), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def env2_reviews(tmp_path):
    """Two envoys; env2 holds every experiment for its operator (settings.review: manual)."""
    s = Stack(tmp_path)
    set_settings(s.envoy_configs[1], review="manual")
    try:
        s.start(envoy_env={1: FAST_REVIEW})
        yield s
    finally:
        s.stop()
        print(s.logs())


def test_manual_review_holds_an_experiment_until_approved(env2_reviews):
    s, env2 = env2_reviews, env2_reviews.processes[2]
    exp = start(s.federation(), "reviewed", rounds_to_train=1)
    env2.wait_for(r"envoy env2 holds experiment 'reviewed' from submitter 'api'")
    sha = env2.wait_for(r"^  bundle sha256: ([0-9a-f]{64})").group(1)
    assert re.search(r"experiment 'reviewed' submitted by 'api': bundle of \d+ bytes, sha256 " + sha,
                     s.director.output())  # the director recorded the same hash at submission
    assert "starting worker" not in env2.output()  # held: no worker, nothing unpickled
    assert exp.get_experiment_status().state == "running"

    listed = review(s, 1)
    assert listed.returncode == 0, listed.stderr
    assert "experiment 'reviewed' from submitter 'api'" in listed.stdout and sha in listed.stdout
    assert "tasks: train, validate" in listed.stdout and "cloudpickle" in listed.stdout

    approved = review(s, 1, "--approve", "reviewed")
    assert approved.returncode == 0 and f"approved experiment 'reviewed' (bundle sha256 {sha})" in approved.stdout
    env2.wait_for("experiment 'reviewed' approved in review")
    exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    assert exp.get_experiment_status().state == "finished", s.logs()
    assert {e.envoy for e in exp.history if e.envoy and e.stage == r.Stage.TRAIN} == {"env1", "env2"}
    assert review(s, 1).stdout.strip() == "no experiment is pending review"
    assert "no experiment named 'nope' is pending review" in review(s, 1, "--approve", "nope").stderr


def test_refused_in_review_reaches_the_notebook(env2_reviews):
    s, env2 = env2_reviews, env2_reviews.processes[2]
    exp = start(s.federation(), "unwanted", rounds_to_train=2)
    env2.wait_for("envoy env2 holds experiment 'unwanted'")
    refused = review(s, 1, "--refuse", "unwanted", "--reason", "not on a weekday")
    assert refused.returncode == 0, refused.stderr
    exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    assert exp.get_experiment_status().state == "finished", s.logs()  # env1 carried on alone
    [dropout] = [e for e in exp.history if e.stage == r.Stage.DROPOUT]
    assert dropout.envoy == "env2" and dropout.note.startswith(
        "envoy 'env2' refused experiment 'unwanted': refused in review by the envoy's operator: not on a weekday")
    assert {e.envoy for e in exp.history if e.envoy and e.stage == r.Stage.TRAIN} == {"env1"}
    assert "starting worker" not in env2.output()


def test_tampered_bundle_is_refused(tmp_path):
    s = Stack(tmp_path)
    set_settings(s.envoy_configs[0], review="manual")  # env1 holds the first experiment: the director waits
    try:
        s.start(envoy_env={0: FAST_REVIEW})
        fed = s.federation()
        start(fed, "blocker", rounds_to_train=1, envoys=["env1"])
        s.processes[1].wait_for("envoy env1 holds experiment 'blocker'")
        victim = start(fed, "victim", rounds_to_train=1)  # queued behind the held one
        assert victim.get_experiment_status().state == "queued"
        bundle = tmp_path / "director_state" / "experiments" / "victim" / "bundle.bin"
        data = bytearray(bundle.read_bytes())
        data[-1] ^= 0xFF  # someone with access to the director's disk swaps the code
        bundle.write_bytes(bytes(data))
        assert review(s, 0, "--refuse", "blocker").returncode == 0  # the queue moves on
        with pytest.raises(ExperimentFailed, match="the downloaded bundle has sha256 [0-9a-f]{64}, but the director "
                                                   "recorded [0-9a-f]{64} when it was submitted"):
            victim.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        for envoy in s.processes[1:]:
            envoy.wait_for("refused experiment 'victim': the downloaded bundle has sha256")
            assert "starting worker for experiment 'victim'" not in envoy.output()
    finally:
        s.stop()
        print(s.logs())


def test_worker_never_sees_the_private_key_or_daemon_secrets(tmp_path):
    s = Stack(tmp_path, tls=True)
    set_settings(s.envoy_configs[1], review="manual")  # env2's review keeps env1's worker alive to inspect
    try:
        s.start(envoy_env={0: {"MY_SECRET_TOKEN": "hunter2"}, 1: FAST_REVIEW})
        exp = start(s.federation(), "isolated", rounds_to_train=1)
        started = s.processes[1].wait_for(r"starting worker for experiment 'isolated' \(pid (\d+), [\w ]+; folder (.+)\)")
        pid, spec_path = int(started.group(1)), Path(started.group(2)) / "worker.json"
        s.processes[2].wait_for("envoy env2 holds experiment 'isolated'")
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in item)
        spec_text = spec_path.read_text()
        spec = json.loads(spec_text)

        key = str(s.pki / "env1.key")
        assert "MY_SECRET_TOKEN" not in environ
        assert not any(key in value or ".key" in value or "pki" in value for value in environ.values())
        allowed = re.compile(r"^(PATH|HOME|LANG|TMPDIR|TZ|PYTHONPATH|PYTHONUNBUFFERED|LD_LIBRARY_PATH|"
                             r"MALLOC_MMAP_MAX_|MALLOC_TRIM_THRESHOLD_|"  # the daemon's own (worker_reuses_memory)
                             r"(LC|JAX|XLA|CUDA|NVIDIA|TF|TFDS|GRPC|FEDJAX)_\w*)$")
        assert [name for name in environ if not allowed.match(name)] == []
        assert ".key" not in spec_text and "pki" not in spec_text and "tls" not in spec
        assert spec["director_target"].startswith("unix:")
        socket_dir = Path(spec["director_target"][len("unix:"):]).parent
        assert stat.S_IMODE(os.stat(socket_dir).st_mode) == 0o700

        assert review(s, 1, "--approve", "isolated").returncode == 0
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        assert exp.get_experiment_status().state == "finished", s.logs()  # every worker call went through the proxy
        assert {e.envoy for e in exp.history if e.envoy and e.stage == r.Stage.TRAIN} == {"env1", "env2"}
    finally:
        s.stop()
        print(s.logs())


def test_worker_user_needs_a_root_daemon_and_an_existing_account(monkeypatch):
    from fedjax_core.config import ConfigError, EnvoySettings, worker_account

    assert worker_account(EnvoySettings()) is None
    with pytest.raises(ConfigError, match="settings.worker_user: no local account named 'no-such-user-here'"):
        worker_account(EnvoySettings(worker_user="no-such-user-here"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="settings.worker_user: running workers as 'nobody' needs the envoy "
                                          "daemon to run as root"):
        worker_account(EnvoySettings(worker_user="nobody"))


def test_review_setting_is_checked_with_the_key_named(tmp_path):
    from fedjax_core.config import ConfigError, EnvoyConfig, load_config

    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump({"settings": {"review": "sometimes"},
                                      "shard_descriptor": {"template": "a.B"}}))
    with pytest.raises(ConfigError, match=r"settings\.review: .*'auto' or 'manual'"):
        load_config(config, EnvoyConfig)
