"""How workers start. The standby (params.standby_worker): started with the daemon, it has imported JAX
before any experiment comes, becomes that experiment's one worker, exits with it, and is replaced; it
goes with its daemon. With the setting off, workers start cold and nothing waits between experiments.
The compilation cache (params.jax_compilation_cache) keeps what one experiment compiled for the next."""
from __future__ import annotations

from pathlib import Path

from fedjax_core import FLExperiment, ModelInterface
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import Stack, alive, children, loaded_jax, set_settings, wait_until


def _standby(daemon_pid: int) -> int | None:
    for pid in children(daemon_pid):
        try:
            if "--standby" in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"):
                return pid
        except OSError:
            pass
    return None


def _run(stack: Stack, name: str) -> None:
    exp = FLExperiment(federation=stack.federation(), experiment_name=name)
    exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
              data_loader=SubsetDataset(limit=64), rounds_to_train=1, device_assignment_policy="CPU_ONLY")
    exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    assert exp.get_experiment_status().state == "finished", stack.logs()


def test_the_standby_imports_jax_ahead_becomes_the_worker_and_is_replaced(tmp_path):
    stack = Stack(tmp_path, n_envoys=1)
    try:
        stack.start()
        envoy = stack.processes[1]
        first = wait_until(lambda: _standby(envoy.proc.pid), 60, "a standby worker")
        wait_until(lambda: loaded_jax(first), 60, "the standby to import JAX")
        assert not loaded_jax(envoy.proc.pid)  # the daemon itself never imports JAX

        _run(stack, "warm")
        started = envoy.wait_for(r"starting worker for experiment 'warm' \(pid (\d+), ([\w ]+);")
        assert (int(started.group(1)), started.group(2)) == (first, "the standby")
        wait_until(lambda: not alive(first), 60, "the worker to exit with its experiment")
        second = wait_until(lambda: _standby(envoy.proc.pid), 60, "the next standby")
        assert second != first

        _run(stack, "warm-again")  # the replacement serves the next experiment
        started = envoy.wait_for(r"starting worker for experiment 'warm-again' \(pid (\d+), ([\w ]+);")
        assert (int(started.group(1)), started.group(2)) == (second, "the standby")
        third = wait_until(lambda: _standby(envoy.proc.pid), 60, "the standby after that")
    finally:
        stack.stop()
    wait_until(lambda: not alive(third), 30, "the standby to go with its daemon")


def test_without_a_standby_workers_start_cold_and_nothing_waits(tmp_path):
    stack = Stack(tmp_path, n_envoys=1, envoy_params={"standby_worker": False})
    try:
        stack.start()
        envoy = stack.processes[1]
        assert children(envoy.proc.pid) == []
        _run(stack, "cold")
        started = envoy.wait_for(r"starting worker for experiment 'cold' \(pid (\d+), ([\w ]+);")
        assert started.group(2) == "cold"
        wait_until(lambda: not alive(int(started.group(1))), 60, "the worker to exit with its experiment")
        # and nothing takes its place (the daemon reaps it a moment after it exits; a standby would stay)
        wait_until(lambda: children(envoy.proc.pid) == [], 30, "the daemon to have no child process")
    finally:
        stack.stop()


def test_the_compilation_cache_keeps_what_an_experiment_compiled_for_the_next(tmp_path):
    stack = Stack(tmp_path, n_envoys=1, envoy_params={"jax_compilation_cache": True})
    set_settings(stack.envoy_configs[0], accept_from=["api"])  # the cache is one submitter's
    hit = "Persistent compilation cache hit for 'jit_apply_model'"  # the training step, in JAX's debug log
    try:
        stack.start(envoy_env={0: {"JAX_LOGGING_LEVEL": "DEBUG"}})
        envoy = stack.processes[1]
        root = Path(envoy.wait_for(r"compiled programs are kept across experiments in (\S+) ").group(1))
        (cache,) = root.iterdir()  # the one submitter's folder, for it alone, made before any worker's sandbox
        assert cache.name.startswith("api-") and oct(cache.stat().st_mode & 0o777) == "0o700"
        assert list(cache.iterdir()) == []
        _run(stack, "compiles")
        programs = {p.name for p in cache.iterdir()}
        assert any(name.startswith("jit_apply_model-") for name in programs), programs
        assert hit not in envoy.output()
        _run(stack, "reuses")  # the same model and steps: loaded, not compiled again
        envoy.wait_for(hit)
        assert {p.name for p in cache.iterdir()} == programs
    finally:
        stack.stop()
