"""End to end: a real director and two envoy processes talking gRPC on loopback.

One federation serves the experiments of this module one after another, as a director
serves a lab's experiments.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from fedjax_core import ExperimentFailed, Federation, FLExperiment, ModelInterface, TaskInterface
from fedjax_core import records as r
from fedjax_core.api.interfaces import TaskError
from fedjax_core.errors import NotFoundError
from fl_experiment import SubsetDataset, create_train_state, evaluate, make_tasks, train_epoch
from processes import REPO, SHARED_DATA, Stack, free_port

LIMIT = 256  # samples per split per envoy: enough to learn, quick on two CPU cores


@pytest.fixture(scope="module")
def fed_stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("federation"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        print(stack.logs())  # shown by pytest for failing tests


@pytest.fixture
def federation(fed_stack):
    fed = Federation(client_id="api", director_node_fqdn="127.0.0.1", director_port=fed_stack.port, tls=False)
    yield fed
    fed.close()


def run(federation, name, rounds=2, opt_treatment="CONTINUE_GLOBAL", style="inplace", tasks=None, log_dir=None,
        **start_kwargs):
    exp = FLExperiment(federation=federation, experiment_name=name)
    exp.start(model_provider=ModelInterface(model=create_train_state(), optimizer=None),
              task_keeper=tasks or make_tasks(style), data_loader=SubsetDataset(limit=LIMIT),
              rounds_to_train=rounds, opt_treatment=opt_treatment, device_assignment_policy="CPU_ONLY",
              **start_kwargs)
    rows = exp.stream_metrics(tensorboard_logs=log_dir is not None, log_dir=log_dir or "logs", progress=False)
    return exp, rows


def scalars(run_dir):
    """{tag: [steps]} read back from a TensorBoard run directory with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def per_envoy(exp, stage, metric):
    """{round: {envoy: value}} of one metric from the streamed per-envoy events."""
    out: dict[int, dict[str, float]] = {}
    for e in exp.history:
        if e.envoy and e.stage == stage:
            for m in e.metrics:
                if m.name == metric:
                    out.setdefault(e.round, {})[e.envoy] = m.value
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def envoy_sets(split: str = "valid"):
    """The envoys' ``split`` (shards 1/2 and 2/2), cut like SubsetDataset."""
    import sys

    sys.path.insert(0, str(REPO / "envoy"))
    from cifar10_shard_descriptor import CIFAR10ShardDescriptor

    return [{k: v[:LIMIT] for k, v in CIFAR10ShardDescriptor(f"{i}, 2", str(SHARED_DATA)).get_split(split).items()}
            for i in (1, 2)]


def envoy_validation_sets():
    return envoy_sets("valid")


def union_accuracy(state, valid_sets):
    correct = sum(evaluate(state, v) * len(v["label"]) for v in valid_sets)
    return correct / sum(len(v["label"]) for v in valid_sets)


def test_registry_lists_both_shards(federation, fed_stack):
    registry = federation.get_shard_registry()
    assert sorted(registry) == ["env1", "env2"]
    assert registry["env1"]["shard_info"]["n_samples"] == {"train": 2585, "valid": 509}
    assert registry["env2"]["shard_info"]["n_samples"] == {"train": 2585, "valid": 508}
    assert all(entry["is_online"] for entry in registry.values())
    for name, entry in registry.items():  # each shard's label histogram, as its descriptor counted it
        counts = entry["shard_info"]["label_counts"]
        assert len(counts) == 10 and sum(counts) == 2585 and min(counts) > 0, (name, counts)
    assert "training records per label: 0: " in fed_stack.processes[1].output()
    sample, target = federation.get_dummy_shard_descriptor(size=10).get_dataset("train")[0]
    assert sample.shape == (32, 32, 3) and target.shape == (1,)


def test_inplace_tasks_train_compile_once_and_return_best_and_last(federation, fed_stack, tmp_path):
    exp, rows = run(federation, "inplace", rounds=3, style="inplace", log_dir=tmp_path / "notebook_logs")
    status = exp.get_experiment_status()
    assert status.state == "finished" and status.current_round == 3
    assert [row["round"] for row in rows] == [0, 1, 2, 3]  # three training rounds + the final validation
    # every aggregated model, the last one included, was validated
    assert all("agg_val/validation_accuracy" in row for row in rows)

    # compile once: one worker process per envoy for the whole experiment, whose jit step traced once
    pids, traces = per_envoy(exp, r.Stage.TRAIN, "pid"), per_envoy(exp, r.Stage.TRAIN, "traces")
    for envoy in ("env1", "env2"):
        assert len({pids[rnd][envoy] for rnd in range(3)}) == 1
        assert [traces[rnd][envoy] for rnd in range(3)] == [1.0, 1.0, 1.0]
    assert pids[0]["env1"] != pids[0]["env2"]
    # ... which exits when the experiment ends (handing its memory back)
    wait_until(lambda: not any(alive(int(pids[0][e])) for e in ("env1", "env2")), timeout_s=60)

    # best and last come back as usable states whose local evaluation matches the director's metric
    valid_sets = envoy_validation_sets()
    best, last = exp.get_best_model(), exp.get_last_model()
    assert 1 <= status.best_round <= 3
    assert union_accuracy(best, valid_sets) == pytest.approx(status.best_value, abs=1e-6)
    assert union_accuracy(last, valid_sets) == pytest.approx(rows[3]["agg_val/validation_accuracy"], abs=1e-6)
    assert status.best_value == pytest.approx(max(row["agg_val/validation_accuracy"] for row in rows[1:]), abs=1e-9)
    assert rows[status.best_round]["agg_val/validation_accuracy"] == pytest.approx(status.best_value)

    # FedAvg of two equal-size shards: the aggregated model is the mean of the envoys' models,
    # so it differs from the initial model, and its step is the max of the envoys' steps
    initial = create_train_state()
    assert not np.allclose(last.params["Dense_1"]["kernel"], initial.params["Dense_1"]["kernel"])
    assert int(last.step) == 3 * (LIMIT // 64)


def test_returning_tasks_train_too_and_best_metric_is_overridable(federation):
    # perversely keep the model with the *lowest* validation accuracy, to see the override act
    exp, rows = run(federation, "returning", rounds=3, style="returning", best_metric="validation_accuracy",
                    higher_is_better=False)
    status = exp.get_experiment_status()
    assert status.state == "finished"
    accuracies = [row["agg_val/validation_accuracy"] for row in rows[1:]]
    assert status.best_value == pytest.approx(min(accuracies), abs=1e-9)
    assert status.best_round == 1 + accuracies.index(min(accuracies))
    # the trained state came back through the (new_state, metrics) return value
    assert per_envoy(exp, r.Stage.TRAIN, "trace_norm_at_start")[1]["env1"] > 0
    assert int(exp.get_last_model().step) == 3 * (LIMIT // 64)


def test_opt_treatments_are_observably_different(federation):
    norms, bytes_sent = {}, {}
    for treatment in ("RESET", "CONTINUE_LOCAL", "CONTINUE_GLOBAL"):
        exp, rows = run(federation, f"opt-{treatment.lower()}", rounds=3, opt_treatment=treatment)
        norms[treatment] = per_envoy(exp, r.Stage.TRAIN, "trace_norm_at_start")
        bytes_sent[treatment] = [m.value for e in exp.history if e.stage == r.Stage.ROUND
                                 for m in e.metrics if m.name == "bytes_sent"]
    # RESET: every round starts from a fresh optimizer state
    assert all(v == 0.0 for rnd in norms["RESET"].values() for v in rnd.values())
    # CONTINUE_LOCAL: each envoy continues its own momentum, so the envoys differ
    for rnd in (1, 2):
        local = norms["CONTINUE_LOCAL"][rnd]
        assert local["env1"] > 0 and local["env2"] > 0 and local["env1"] != local["env2"]
    # CONTINUE_GLOBAL: both start from the same averaged momentum
    for rnd in (1, 2):
        glob = norms["CONTINUE_GLOBAL"][rnd]
        assert glob["env1"] > 0 and glob["env1"] == pytest.approx(glob["env2"], rel=1e-6)
    # only CONTINUE_GLOBAL moves optimizer state over the wire
    assert bytes_sent["RESET"] == bytes_sent["CONTINUE_LOCAL"]
    assert all(g > 1.9 * r_ for g, r_ in zip(bytes_sent["CONTINUE_GLOBAL"], bytes_sent["RESET"]))


def test_experiments_queue_while_one_runs(federation):
    first, second = (FLExperiment(federation=federation, experiment_name=n) for n in ("queue-a", "queue-b"))
    kwargs = dict(task_keeper=make_tasks(), data_loader=SubsetDataset(limit=LIMIT), rounds_to_train=1,
                  device_assignment_policy="CPU_ONLY")
    # far more rounds than the asserts below take however slow the machine: it runs until cancelled
    assert first.start(model_provider=ModelInterface(model=create_train_state()), **{**kwargs,
                                                                                    "rounds_to_train": 10_000}) == 0
    assert second.start(model_provider=ModelInterface(model=create_train_state()), **kwargs) == 1
    assert second.get_experiment_status().state == "queued"
    assert {s.name: s.state for s in federation.list_experiments()}["queue-b"] == "queued"
    third = FLExperiment(federation=federation, experiment_name="queue-c")
    assert third.start(model_provider=ModelInterface(model=create_train_state()), **kwargs) == 2
    assert third.cancel().state == "cancelled"  # withdrawn while queued: it never runs
    assert first.cancel().state == "cancelled"  # the queue moves on to the second
    assert second.wait(timeout_s=300).state == "finished"
    assert first.get_experiment_status().state == "cancelled"
    assert third.get_experiment_status().state == "cancelled"
    assert not [e for e in third.federation.client.events("queue-c") if not e.experiment_done]


def test_failing_task_fails_the_experiment_with_its_message(federation):
    TI = make_tasks()

    @TI.register_fl_task(model="state", data_loader="dataset", device="device")
    def validate(state, dataset, device):
        raise ValueError("labels look wrong")

    with pytest.raises(ExperimentFailed, match="labels look wrong"):
        run(federation, "failing", rounds=1, tasks=TI)
    error = FLExperiment(federation, "failing").get_experiment_status().error
    assert "labels look wrong" in error
    # the worker's traceback names this file and line, and shows the line (not cloudpickle's <dynamic-code>)
    line = validate.__code__.co_firstlineno + 2
    assert f'File "{__file__}", line {line}, in validate' in error, error
    assert 'raise ValueError("labels look wrong")' in error and "<dynamic-code>" not in error


def test_bad_notebook_calls_get_clear_errors(federation):
    exp = FLExperiment(federation=federation, experiment_name="never")
    model = ModelInterface(model=create_train_state())
    with pytest.raises(TaskError, match="no training task"):
        TI = TaskInterface()

        @TI.register_fl_task(model="state", data_loader="dataset", device="device")
        def validate(state, dataset, device):
            return {}

        exp.start(model_provider=model, task_keeper=TI, data_loader=SubsetDataset(), rounds_to_train=1)
    with pytest.raises(TaskError, match="has no task 'evaluate'; registered tasks: train, validate"):
        make_tasks().get_task("evaluate")
    with pytest.raises(ValueError, match="opt_treatment 'GLOBAL'"):
        exp.start(model_provider=model, task_keeper=make_tasks(), data_loader=SubsetDataset(), rounds_to_train=1,
                  opt_treatment="GLOBAL")
    with pytest.raises(ValueError, match="higher_is_better needs best_metric"):
        exp.start(model_provider=model, task_keeper=make_tasks(), data_loader=SubsetDataset(), rounds_to_train=1,
                  higher_is_better=False)
    with pytest.raises(ValueError, match=r"rounds_to_train must be an integer from 0 .*0: validate the given model"):
        exp.start(model_provider=model, task_keeper=make_tasks(), data_loader=SubsetDataset(), rounds_to_train=-1)
    with pytest.raises(NotFoundError, match="no experiment named 'never'"):
        exp.get_experiment_status()


def test_unreachable_director_is_a_clear_error():
    port = free_port()
    with pytest.raises(ConnectionError, match=f"cannot reach the director at 127.0.0.1:{port}"):
        Federation(director_node_fqdn="127.0.0.1", director_port=port, tls=False, timeout_s=2)


def test_tensorboard_has_every_round_for_each_envoy_and_the_aggregate(federation, fed_stack, tmp_path):
    run(federation, "tensorboard", rounds=2, log_dir=tmp_path / "logs")
    validated, trained = [0, 1, 2], [0, 1]
    for root in (fed_stack.workdir / "logs" / "tensorboard", tmp_path / "logs" / "tensorboard"):  # director, notebook
        assert sorted(p.name for p in root.iterdir()) == ["aggregated", "env1", "env2"]
        for envoy in ("env1", "env2"):
            tags = scalars(root / envoy)
            assert tags["aggregated_model_validation/validation_accuracy"] == validated
            assert tags["train/train_acc"] == trained
            assert tags["locally_tuned_model_validation/validation_accuracy"] == trained
        tags = scalars(root / "aggregated")
        assert tags["aggregated_model_validation/validation_accuracy"] == validated
        assert tags["train/train_acc"] == trained
        for tag in ("round/time_s", "round/bytes_received", "round/bytes_sent", "round/envoys_reported",
                    "round/envoys_selected"):
            assert tags[tag] == trained
        assert participants_text(root / "aggregated") == {0: "env1, env2", 1: "env1, env2"}


def participants_text(run_dir) -> dict[int, str]:
    """{step: text} of the round/participants text summary, read with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    tag = next(t for t in acc.Tags()["tensors"] if t.startswith("round/participants"))
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}


def test_a_bfloat16_model_trains_and_aggregates_in_bfloat16(federation):
    import jax
    import jax.numpy as jnp

    exp = FLExperiment(federation=federation, experiment_name="bf16")
    initial = create_train_state(param_dtype=jnp.bfloat16)
    exp.start(model_provider=ModelInterface(model=initial), task_keeper=make_tasks(),
              data_loader=SubsetDataset(limit=LIMIT), rounds_to_train=2, opt_treatment="CONTINUE_GLOBAL",
              device_assignment_policy="CPU_ONLY")
    rows = exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    assert exp.get_experiment_status().state == "finished"
    last = exp.get_last_model()
    for before, after in zip(jax.tree_util.tree_leaves(initial.params), jax.tree_util.tree_leaves(last.params)):
        assert after.dtype == jnp.bfloat16
        assert not np.array_equal(np.asarray(before, np.float32), np.asarray(after, np.float32))  # it moved
    # the notebook's own evaluation of the returned bf16 model matches the director's aggregate
    assert union_accuracy(last, envoy_validation_sets()) == pytest.approx(rows[-1]["agg_val/validation_accuracy"],
                                                                          abs=1e-6)


def test_the_aggregated_model_is_the_mean_of_the_envoys_trained_models(federation):
    """One round, fresh optimizer state: each envoy trains the initial model on its first LIMIT samples,
    as the test does here with the same jitted steps; FedAvg of two equal shards is their mean."""
    exp, _ = run(federation, "mean", rounds=1, opt_treatment="RESET")
    assert exp.get_experiment_status().state == "finished"
    trained = [train_epoch(create_train_state(), train, 64)[0] for train in envoy_sets("train")]
    last = exp.get_last_model()
    import jax

    got = jax.tree_util.tree_leaves_with_path(last.params)
    want = [jax.tree_util.tree_leaves(t.params) for t in trained]
    for (path, leaf), a, b in zip(got, *want):
        np.testing.assert_allclose(np.asarray(leaf), (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    assert not np.allclose(np.asarray(trained[0].params["Dense_1"]["kernel"]),
                           np.asarray(trained[1].params["Dense_1"]["kernel"]))  # the mean is of two different models


def test_a_simulation_of_the_same_shards_trains_to_the_federations_model(federation):
    """The same experiment (shards, seeds, strategy, opt treatment) on the real envoys and as a
    SimulatedFederation in this process ends with the same model, and the same aggregated metrics."""
    import sys

    import jax

    from fedjax_core import FedAdam
    from fedjax_core.simulation import SimulatedFederation

    sys.path.insert(0, str(REPO / "envoy"))
    from cifar10_shard_descriptor import CIFAR10ShardDescriptor

    settings = dict(rounds=2, opt_treatment="CONTINUE_LOCAL", aggregation=FedAdam(eta=0.01), sampling_seed=3)
    real, real_rows = run(federation, "twin-real", **settings)
    sim_fed = SimulatedFederation({f"env{i}": CIFAR10ShardDescriptor(rank_worldsize=f"{i}, 2", data_dir=str(SHARED_DATA))
                                   for i in (1, 2)})
    try:
        sim, sim_rows = run(sim_fed, "twin-sim", **settings)
        for got, want in zip(jax.tree_util.tree_leaves(sim.get_last_model().params),
                             jax.tree_util.tree_leaves(real.get_last_model().params)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
        agg = "agg_val/validation_accuracy"
        assert [row.get(agg) for row in sim_rows] == pytest.approx([row.get(agg) for row in real_rows])
    finally:
        sim_fed.close()


def test_differential_privacy_is_applied_by_real_envoys_and_reported_over_grpc(federation):
    """One round each, fresh optimizer state, as in the mean test above. CentralDP(clip_on="envoy") without noise:
    the model is the initial one plus the unweighted mean of each envoy's change clipped (by the envoy) to C.
    LocalDP: the same clipped mean plus the two envoys' noise, averaged: standard deviation sigma / sqrt(2)."""
    import jax

    from fedjax_core.privacy import CentralDP, LocalDP, accounting

    def flat(params):
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(params)])

    initial = flat(create_train_state().params)
    changes = [flat(train_epoch(create_train_state(), train, 64)[0].params) - initial for train in envoy_sets("train")]
    norms = [np.linalg.norm(c) for c in changes]
    C = 0.5 * min(norms)
    clipped_mean = np.mean([c * C / n for c, n in zip(changes, norms)], axis=0)

    exp, rows = run(federation, "dp-envoy-clip", rounds=1, opt_treatment="RESET",
                    privacy=CentralDP(noise_multiplier=0.0, clipping_norm=C, delta=1e-5, clip_on="envoy"))
    status = exp.get_experiment_status()
    assert status.state == "finished" and status.epsilon == float("inf") and status.delta == 1e-5
    np.testing.assert_allclose(flat(exp.get_last_model().params) - initial, clipped_mean, rtol=1e-3, atol=1e-6)
    assert rows[0]["epsilon"] == float("inf")

    exp, _ = run(federation, "dp-local", rounds=1, opt_treatment="RESET",
                 privacy=LocalDP(clipping_norm=C, epsilon=8.0, delta=1e-5))
    status = exp.get_experiment_status()
    assert status.state == "finished" and status.epsilon == pytest.approx(8.0, rel=1e-4)
    noise = flat(exp.get_last_model().params) - initial - clipped_mean
    sigma = C * accounting.local_noise_multiplier(8.0, 1e-5)
    assert np.std(noise) == pytest.approx(sigma / np.sqrt(2), rel=0.05)
