"""The round engine with real processes: a server optimizer that survives a director kill -9
bit for bit, and sampling 2 of 4 envoys with per-round task settings."""
from __future__ import annotations

import os
import signal

import grpc
import numpy as np
import pytest

from fedjax_core import FedAdam, FedAvgM, FLExperiment, ModelInterface
from fedjax_core import records as r
from fedjax_core import serde
from fedjax_core.director.rules import select_participants
from fedjax_proto import federation_service_pb2 as fed_pb
from fedjax_proto import federation_service_pb2_grpc as fed_grpc
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import Stack, set_settings

ROUNDS = 4


def start(federation, name, **kwargs) -> FLExperiment:
    exp = FLExperiment(federation=federation, experiment_name=name)
    exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
              data_loader=SubsetDataset(limit=192), device_assignment_policy="CPU_ONLY", **kwargs)
    return exp


def leaves(state) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.opt_state, state.step))]


def test_fedadam_killed_mid_experiment_ends_with_the_uninterrupted_model(stack):
    fed = stack.federation()
    settings = dict(rounds_to_train=ROUNDS, opt_treatment="CONTINUE_GLOBAL", aggregation=FedAdam(eta=0.02))
    straight = start(fed, "adam-straight", **settings)
    assert straight.wait(timeout_s=300).state == "finished", stack.logs()
    assert_streams_agree(stack, "adam-straight")

    killed = start(fed, "adam-killed", **settings)
    for event in fed.client.events("adam-killed"):
        if event.stage == r.Stage.ROUND and event.round == 1:
            break  # rounds 0 and 1 are closed: the FedAdam state of round 2 is on disk
    os.killpg(stack.director.proc.pid, signal.SIGKILL)
    stack.director.proc.wait()
    stack.start_director()
    fed = stack.federation()
    killed = FLExperiment(federation=fed, experiment_name="adam-killed")
    assert killed.wait(timeout_s=300).state == "finished", stack.logs()

    killed.set_model_template(create_train_state())
    straight = FLExperiment(federation=fed, experiment_name="adam-straight")
    straight.set_model_template(create_train_state())
    want, got = leaves(straight.get_last_model()), leaves(killed.get_last_model())
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.tobytes() == b.tobytes()
    initial = leaves(create_train_state())
    assert not np.array_equal(initial[0], got[0])  # FedAdam moved the model


def assert_streams_agree(stack, name: str) -> None:
    """The notebook's batched metric stream (many events a message) and the one-event-a-message StreamMetrics
    that older notebooks call give the same events, in the same order, snapshot and followed."""
    request = fed_pb.StreamMetricsRequest(experiment_name=name, snapshot=True)
    with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as channel:
        stub = fed_grpc.FederationServiceStub(channel)
        single = [serde.metric_event_from_proto(m) for m in stub.StreamMetrics(request, timeout=30)]
        batches = list(stub.StreamMetricBatches(request, timeout=30))
    batched = [serde.metric_event_from_proto(m) for b in batches for m in b.events]
    assert batched[:-1] == single[:-1]  # the 'done' events last, stamped when sent
    assert batched[-1].experiment_done and single[-1].experiment_done and batched[-1].state == single[-1].state
    assert len(batches) < len(single) / 10  # the events of a look travel together
    followed = list(stack.federation().client.events(name))
    assert [(e.round, e.envoy, e.stage, e.metrics) for e in followed] == [(e.round, e.envoy, e.stage, e.metrics)
                                                                         for e in single]  # 'done' says when


@pytest.fixture
def four_envoys(tmp_path):
    s = Stack(tmp_path, n_envoys=4)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        print(s.logs())


def test_two_of_four_envoys_sampled_with_a_seed_and_round_config_reaching_the_tasks(four_envoys):
    envoys = ("env1", "env2", "env3", "env4")
    exp = start(four_envoys.federation(), "sampled", rounds_to_train=3, aggregation=FedAvgM(server_momentum=0.5),
                envoys_per_round=2, sampling_seed=7,
                round_config=lambda rnd: {"train": {"lr_scale": 1 / (rnd + 1)}})
    exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    status = exp.get_experiment_status()
    assert status.state == "finished", four_envoys.logs()
    expected = tuple(select_participants(envoys, 2, 7, rnd) for rnd in range(3))
    assert status.participants == dict(enumerate(expected))
    assert len(set(expected)) > 1
    trained = {rnd: sorted(e.envoy for e in exp.history if e.envoy and e.stage == r.Stage.TRAIN and e.round == rnd)
               for rnd in range(3)}
    assert trained == {rnd: list(expected[rnd]) for rnd in range(3)}
    assert [e.participants for e in exp.history if e.stage == r.Stage.ROUND] == list(expected)
    # round_config overrode add_kwargs' defaults round by round; add_kwargs' batch_size still applies
    for e in exp.history:
        if e.envoy and e.stage == r.Stage.TRAIN:
            values = {m.name: m.value for m in e.metrics}
            assert values["lr_scale"] == pytest.approx(1 / (e.round + 1)) and values["batch_size"] == 64
    # everyone validated the final model, and each envoy kept one worker through the rounds it sat out
    final = sorted(e.envoy for e in exp.history if e.envoy and e.stage == r.Stage.AGGREGATED and e.round == 3)
    assert final == list(envoys)
    pids = {}
    for e in exp.history:
        if e.envoy and e.stage == r.Stage.TRAIN:
            pids.setdefault(e.envoy, set()).update(m.value for m in e.metrics if m.name == "pid")
    assert all(len(p) == 1 for p in pids.values())


def test_a_second_daemon_claiming_an_online_name_is_refused(tmp_path):
    # heartbeats every 5 s: env1 counts as online for 12.5 s after each, so no late beat on a loaded machine lets
    # the twin take the name during the settings.name_held_wait_s (5 s here) it keeps trying
    stack = Stack(tmp_path, director_settings={"envoy_health_check_period": 5})
    try:
        stack.start()
        set_settings(stack.envoy_configs[0], name_held_wait_s=5)
        twin = stack.start_envoy(0)  # env1 again, while env1 is online: it tries for 5 s, then gives up
        twin.wait_for(r"an envoy named 'env1' is already online .*; retrying in .*a restarted envoy waits for its old")
        assert twin.proc.wait(timeout=5 + 60) != 0
        twin.wait_for(r"director refused envoy 'env1': an envoy named 'env1' is already online .*stop that daemon or "
                      "start this one under another name")
        registry = stack.federation().get_shard_registry()
        assert registry["env1"]["is_online"] and registry["env2"]["is_online"]
        exp = start(stack.federation(), "after-the-twin", rounds_to_train=1)  # the first env1 still works
        assert exp.wait(timeout_s=120).state == "finished", stack.logs()
    finally:
        stack.stop()


def test_refusing_envoy_drops_out_and_the_others_finish(tmp_path):
    import yaml

    s = Stack(tmp_path)
    config = yaml.safe_load(s.envoy_configs[1].read_text())
    config["settings"] = {"accept_from": ["a-colleague"]}
    s.envoy_configs[1].write_text(yaml.safe_dump(config))
    try:
        s.start()
        exp = start(s.federation(), "not-for-env2", rounds_to_train=2)
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        status = exp.get_experiment_status()
        assert status.state == "finished", s.logs()
        assert status.envoys == ("env1",)
        [dropout] = [e for e in exp.history if e.stage == r.Stage.DROPOUT]
        assert dropout.envoy == "env2" and dropout.note.startswith(
            "envoy 'env2' refused experiment 'not-for-env2': its submitter 'api' is not in this envoy's "
            "settings.accept_from (a-colleague); it drops out of the experiment, 1 of 2 envoys continue")
        trained = {e.envoy for e in exp.history if e.envoy and e.stage in (r.Stage.TRAIN, r.Stage.AGGREGATED)}
        assert trained == {"env1"}  # no later round sampled env2, nor did it validate the final model
        s.processes[2].wait_for("refused experiment 'not-for-env2'")
        assert "starting worker" not in s.processes[2].output()  # its code never ran there
    finally:
        s.stop()


@pytest.fixture
def env2_fails_round_1(tmp_path):
    s = Stack(tmp_path)
    try:
        s.start(envoy_env={1: {"FEDJAX_TEST_FAIL_ROUNDS": "1"}})
        yield s
    finally:
        s.stop()
        print(s.logs())


def test_a_task_that_raises_drops_its_envoy_out_of_that_round_only(env2_fails_round_1):
    exp = start(env2_fails_round_1.federation(), "dropout", rounds_to_train=3, min_envoys=1)
    rows = exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    status = exp.get_experiment_status()
    assert status.state == "finished", env2_fails_round_1.logs()
    dropouts = [e for e in exp.history if e.stage == r.Stage.DROPOUT]
    assert [(e.round, e.envoy) for e in dropouts] == [(1, "env2")]
    assert "envoy 'env2' dropped out of round 1: RuntimeError: injected failure in round 1; 1 of 2 continue" \
        in dropouts[0].note
    assert rows[1]["dropped"] == "env2"
    trained = {rnd: sorted(e.envoy for e in exp.history if e.envoy and e.stage == r.Stage.TRAIN and e.round == rnd)
               for rnd in range(3)}
    assert trained == {0: ["env1", "env2"], 1: ["env1"], 2: ["env1", "env2"]}  # env2 rejoined at round 2
    summary = {e.round: {m.name: m.value for m in e.metrics} for e in exp.history if e.stage == r.Stage.ROUND}
    assert summary[1]["envoys_reported"] == 1 and summary[2]["envoys_reported"] == 2
    pids = {m.value for e in exp.history if e.envoy == "env2" and e.stage == r.Stage.TRAIN for m in e.metrics
            if m.name == "pid"}
    assert len(pids) == 1  # the same worker carried on


def test_a_dropout_that_leaves_too_few_results_fails_the_experiment_saying_so(env2_fails_round_1):
    from fedjax_core import ExperimentFailed

    exp = start(env2_fails_round_1.federation(), "too-few", rounds_to_train=2, min_envoys=2)
    with pytest.raises(ExperimentFailed, match="envoy 'env2' failed in round 1, leaving fewer than the 2 results "
                                               r"the round needs \(min_envoys=2\): RuntimeError: injected failure"):
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)


def test_a_worker_killed_mid_round_is_a_dropout_and_a_new_worker_joins_the_next_round(tmp_path):
    s = Stack(tmp_path)
    try:
        s.start(envoy_env={1: {"FEDJAX_TEST_KILL_ROUNDS": "1"}})
        exp = start(s.federation(), "killed-worker", rounds_to_train=3, min_envoys=1)
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        assert exp.get_experiment_status().state == "finished", s.logs()
        dropouts = [e for e in exp.history if e.stage == r.Stage.DROPOUT]
        assert [(e.round, e.envoy) for e in dropouts] == [(1, "env2")]
        assert "the worker process was killed by signal 9" in dropouts[0].note
        pids = {e.round: next(m.value for m in e.metrics if m.name == "pid")
                for e in exp.history if e.envoy == "env2" and e.stage == r.Stage.TRAIN}
        assert sorted(pids) == [0, 2] and pids[0] != pids[2]  # a new worker took round 2
        s.processes[2].wait_for(r"starting a new worker for 'killed-worker' \(restart 1 of 3\)")
    finally:
        s.stop()


def test_an_envoy_killed_mid_experiment_is_dropped_after_its_timeout_and_rejoins_when_restarted(tmp_path):
    import os
    import signal

    import yaml

    s = Stack(tmp_path)
    config = yaml.safe_load(s.director_config.read_text())
    # heartbeats come every second: 8 s of silence is a lost envoy, never a healthy one on a loaded machine
    config["settings"]["envoy_timeout_s"] = 8.0
    s.director_config.write_text(yaml.safe_dump(config))
    try:
        s.start(envoy_env={0: {"FEDJAX_TEST_TRAIN_DELAY_S": "1.5"}})  # rounds last long enough to come back
        fed = s.federation()
        # far more rounds than the test needs: it cancels the experiment once env2 trained again
        exp = start(fed, "lost-envoy", rounds_to_train=60, min_envoys=1)
        for event in fed.client.events("lost-envoy"):
            if event.stage == r.Stage.ROUND and event.round == 0:
                break
        env2 = s.processes[2]
        os.killpg(env2.proc.pid, signal.SIGKILL)  # the daemon and its worker, without a word
        env2.proc.wait()
        for event in fed.client.events("lost-envoy"):
            if event.stage == r.Stage.DROPOUT and event.envoy == "env2":
                assert "no heartbeat for 8s" in event.note and "1 of 2 continue" in event.note
                lost_round = event.round
                break
        s.start_envoy(1).wait_for("ENVOY READY env2")  # back, under the same name
        for event in fed.client.events("lost-envoy"):
            assert not event.experiment_done, s.logs()
            if event.envoy == "env2" and event.stage == r.Stage.TRAIN and event.round > lost_round:
                break
        exp.cancel()
        history = list(fed.client.events("lost-envoy"))
        lost_rounds = {e.round for e in history if e.stage == r.Stage.DROPOUT}
        trained_after = {e.round for e in history if e.envoy == "env2" and e.stage == r.Stage.TRAIN} - {0}
        assert not [e for e in history if e.stage == r.Stage.DROPOUT and e.envoy == "env1"]
        # it rejoined: trained a round after the last it was lost from (it may have trained round 1 before the
        # kill: the next task comes with the upload's answer, sooner than the test reads round 0's end)
        assert lost_rounds and max(trained_after, default=-1) > max(lost_rounds)
    finally:
        s.stop()
