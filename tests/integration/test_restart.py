"""Nothing lost: a director killed mid-experiment restarts from its database and finishes the job."""
from __future__ import annotations

import os
import signal

from fedjax_core import Federation, FLExperiment, ModelInterface
from fedjax_core import records as r
from fl_experiment import SubsetDataset, create_train_state, make_tasks

ROUNDS = 4


def test_director_killed_mid_experiment_resumes_and_keeps_best_and_last(stack):
    fed = Federation(director_node_fqdn="127.0.0.1", director_port=stack.port, tls=False)
    exp = FLExperiment(federation=fed, experiment_name="survivor")
    exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
              data_loader=SubsetDataset(limit=256), rounds_to_train=ROUNDS, opt_treatment="CONTINUE_GLOBAL",
              device_assignment_policy="CPU_ONLY")

    # follow the raw stream until the first round has closed, then kill the director outright
    for event in fed.client.events("survivor"):
        if event.stage == r.Stage.ROUND:
            break
    os.killpg(stack.director.proc.pid, signal.SIGKILL)
    stack.director.proc.wait()
    stack.start_director()  # same state dir, same port
    assert exp.get_experiment_status().state == "running"  # it was killed mid-experiment

    # the notebook's stream rides out the restart; the workers reconnect and the experiment completes
    rows = exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    status = exp.get_experiment_status()
    assert status.state == "finished", stack.logs()
    assert status.current_round == ROUNDS
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    assert all("agg_val/validation_accuracy" in row and "train/train_acc" in row for row in rows[:ROUNDS])
    # each envoy's metrics were counted once per round, retries after the kill included
    per_round = [sorted(e.envoy for e in exp.history if e.envoy and e.stage == r.Stage.TRAIN and e.round == rnd)
                 for rnd in range(ROUNDS)]
    assert per_round == [["env1", "env2"]] * ROUNDS
    # the same worker process (one per envoy) carried the experiment across the restart
    pids: dict[str, set[float]] = {}
    for e in exp.history:
        if e.envoy and e.stage == r.Stage.TRAIN:
            pids.setdefault(e.envoy, set()).update(m.value for m in e.metrics if m.name == "pid")
    assert {envoy: len(p) for envoy, p in pids.items()} == {"env1": 1, "env2": 1}

    best_before, last_before = exp.get_best_model(), exp.get_last_model()

    # a clean restart later: registry, experiment, best and last models are all still there
    stack.director.stop()
    stack.start_director()
    fed2 = Federation(director_node_fqdn="127.0.0.1", director_port=stack.port, tls=False)
    assert sorted(fed2.get_shard_registry()) == ["env1", "env2"]
    again = FLExperiment(federation=fed2, experiment_name="survivor")
    again.set_model_template(create_train_state())
    assert again.get_experiment_status() == status
    for before, after in ((best_before, again.get_best_model()), (last_before, again.get_last_model())):
        assert int(before.step) == int(after.step)
        for a, b in zip(*(jax_leaves(x.params) for x in (before, after))):
            assert (a == b).all()


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_envoy_started_before_the_director_waits_and_registers(tmp_path):
    from processes import Stack

    stack = Stack(tmp_path, n_envoys=1)
    try:
        envoy = stack.start_envoy(0)
        envoy.wait_for(r"director at 127\.0\.0\.1:\d+ unreachable \(UNAVAILABLE\); retrying in")
        stack.start_director()
        envoy.wait_for("ENVOY READY env1")
        fed = Federation(director_node_fqdn="127.0.0.1", director_port=stack.port, tls=False)
        assert fed.get_shard_registry()["env1"]["is_online"]
    finally:
        stack.stop()


def test_worker_dies_with_its_envoy_daemon(tmp_path):
    from processes import Stack, alive, wait_until

    stack = Stack(tmp_path)
    try:
        stack.start(envoy_env={0: {"FEDJAX_TEST_TRAIN_DELAY_S": "300"}})  # env1's worker sits in its task
        exp = FLExperiment(federation=stack.federation(), experiment_name="orphan")
        exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
                  data_loader=SubsetDataset(limit=64), rounds_to_train=1, device_assignment_policy="CPU_ONLY")
        daemon = stack.processes[1].proc
        worker = int(stack.processes[1].wait_for(r"starting worker for experiment 'orphan' \(pid (\d+)").group(1))
        os.kill(daemon.pid, signal.SIGKILL)  # no chance to clean up
        daemon.wait()
        wait_until(lambda: not alive(worker), 30, "the orphaned worker to exit")
    finally:
        stack.stop()


def test_an_envoy_killed_mid_round_and_restarted_rejoins_the_round_in_progress(tmp_path):
    """kill -9 of an envoy's daemon in the middle of its training task, then a restart at once: the new daemon
    is accepted once the old one fell silent (refused and retrying until then, if it came back sooner), and its
    new worker trains the round the old one left; nobody drops out."""
    from fedjax_core.config import EnvoySettings
    from processes import Stack, alive, wait_until

    stack = Stack(tmp_path)
    try:
        stack.start(envoy_env={0: {"FEDJAX_TEST_TRAIN_DELAY_S": "300"}})  # env1's first worker sits in its task
        exp = FLExperiment(federation=stack.federation(), experiment_name="comeback")
        exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
                  data_loader=SubsetDataset(limit=64), rounds_to_train=2, device_assignment_policy="CPU_ONLY")
        first = stack.processes[1]
        worker = int(first.wait_for(r"starting worker for experiment 'comeback' \(pid (\d+)").group(1))
        for event in exp.federation.client.events("comeback"):  # env2 trained round 0; env1 sits in its task
            if event.envoy == "env2" and event.stage == r.Stage.TRAIN:
                break
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        wait_until(lambda: not alive(worker), 30, "the killed daemon's worker to exit")

        second = stack.start_envoy(0)  # no train delay this time
        second.wait_for("ENVOY READY env1", timeout=EnvoySettings().name_held_wait_s + 30)
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        assert exp.get_experiment_status().state == "finished", stack.logs()
        history = exp.history
        assert not [e for e in history if e.stage == r.Stage.DROPOUT], stack.logs()
        per_round = [sorted(e.envoy for e in history if e.envoy and e.stage == r.Stage.TRAIN and e.round == rnd)
                     for rnd in range(2)]
        assert per_round == [["env1", "env2"]] * 2
    finally:
        stack.stop()
