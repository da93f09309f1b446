"""SimulatedFederation: FLExperiment's rounds over virtual envoys in this process, checked against numpy
references and the director's own rules (the same experiment on real envoys: tests/integration/test_federation.py)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_core import codecs
from fedjax_core import FedAdam, FLExperiment, ModelInterface, Periodic, partition
from fedjax_core.api.experiment import ExperimentFailed
from fedjax_core.director import rules
from fedjax_core.records import Stage
from fedjax_core.errors import AlreadyExistsError, InvalidRequestError, NotFoundError
from fedjax_core.shard_descriptor import DummyShardDescriptor
from fedjax_core.simulation import SimulatedFederation
from linear_federation import CLASSES, DIM, FAIL, Arrays, data, linear_state, run, step, tasks


@pytest.fixture
def fed():
    federation = SimulatedFederation.from_arrays(train=data(600, 0), valid=data(120, 1),
                                                 partition=partition.dirichlet(n_envoys=6, alpha=1.0, seed=0))
    yield federation
    federation.close()


def shard_sets(fed, split: str):
    return {name: fed.client.shards[name].get_split(split) for name in sorted(fed.client.shards)}


def test_fedavg_rounds_are_the_weighted_mean_of_each_envoys_step(fed):
    """RESET, every envoy each round: the next model is the sample-weighted mean of one SGD step per envoy."""
    exp = run(fed, "fedavg", rounds=2, opt_treatment="RESET")
    assert exp.get_experiment_status().state == "finished"
    sets = shard_sets(fed, "train")
    model = linear_state()
    for _ in range(2):
        stepped = [(step(model, s["image"], s["label"]), len(s["label"])) for s in sets.values()]
        total = sum(n for _, n in stepped)
        mean = jax.tree_util.tree_map(lambda *leaves: sum(np.asarray(l, np.float64) * n for l, (_, n) in
                                                          zip(leaves, stepped)) / total,
                                      *[s.params for s, _ in stepped])
        model = linear_state().replace(params=jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), mean))
    last = exp.get_last_model()
    for got, want in zip(jax.tree_util.tree_leaves(last.params), jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_sampling_records_the_directors_participants_and_weights_metrics_by_samples(fed):
    exp = run(fed, "sampled", rounds=3, envoys_per_round=2, sampling_seed=7, opt_treatment="RESET")
    status = exp.get_experiment_status()
    envoys = tuple(sorted(fed.client.shards))
    for round_ in range(3):
        assert status.participants[round_] == rules.select_participants(envoys, 2, 7, round_)
    rounds = [e for e in exp.history if e.stage == Stage.ROUND]
    assert [e.participants for e in rounds] == [status.participants[i] for i in range(3)]
    train = [e for e in exp.history if e.stage == Stage.TRAIN and e.envoy and e.round == 0]
    assert {e.envoy for e in train} == set(status.participants[0])
    sizes = {name: len(s["label"]) for name, s in shard_sets(fed, "train").items()}
    want = sum(e.metrics[0].value * sizes[e.envoy] for e in train) / sum(sizes[e.envoy] for e in train)
    aggregate = next(e for e in exp.history if e.stage == Stage.TRAIN and not e.envoy and e.round == 0)
    assert aggregate.metrics[0].value == pytest.approx(want, rel=1e-12)  # weighted by each envoy's samples


def test_fedadam_and_periodic_averaging_and_int8_uploads_run_as_the_director_runs_them(fed):
    exp = run(fed, "adam", rounds=4, aggregation=FedAdam(eta=0.05), sync=Periodic(every=2), compression="int8",
              send_deltas=True, opt_treatment="CONTINUE_LOCAL")
    assert exp.get_experiment_status().state == "finished"
    summaries = {e.round: e for e in exp.history if e.stage == Stage.ROUND and not e.envoy}
    averaged = {r: int(next(m.value for m in e.metrics if m.name == "averaged")) for r, e in summaries.items()}
    assert averaged == {0: 0, 1: 1, 2: 0, 3: 1}
    uploaded = {r: next(m.value for m in e.metrics if m.name == "bytes_received") for r, e in summaries.items()}
    n_params = DIM * CLASSES + CLASSES
    assert uploaded[0] == 0 and uploaded[1] == 6 * n_params  # int8: one byte per parameter, from each of 6 envoys
    assert {e.envoy for e in exp.history if e.stage == Stage.SYNC_CHECK and e.round == 0} == set(fed.client.shards)


def test_compressed_downloads_train_from_the_decoded_model_and_count_its_bytes(fed):
    """compress_downloads: each training round's model reaches the envoys int8-encoded (their tasks start from its
    decoded values, as a worker's do), the bytes counted are the encoded ones; the final validation gets it exact."""
    exp = run(fed, "down", rounds=2, compression="int8", compress_downloads=True, opt_treatment="RESET")
    sets = shard_sets(fed, "train")
    model = linear_state()

    def int8(params):  # what travels, as its receiver decodes it (uploads are int8 as well)
        return jax.tree_util.tree_map(lambda a: np.float32(codecs.decode(*codecs.encode("t", np.asarray(a), "int8"))),
                                      params)

    for _ in range(2):
        start = model.replace(params=int8(model.params))  # the download
        stepped = [(int8(step(start, s["image"], s["label"]).params), len(s["label"])) for s in sets.values()]
        total = sum(n for _, n in stepped)
        mean = jax.tree_util.tree_map(lambda *ls: sum(np.asarray(l, np.float64) * n for l, (_, n) in
                                                      zip(ls, stepped)) / total, *[p for p, _ in stepped])
        model = linear_state().replace(params=jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), mean))
    for got, want in zip(jax.tree_util.tree_leaves(exp.get_last_model().params),
                         jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    sent = {e.round: next(m.value for m in e.metrics if m.name == "bytes_sent")
            for e in exp.history if e.stage == Stage.ROUND and not e.envoy}
    n_params = DIM * CLASSES + CLASSES
    assert sent[1] < 6 * n_params * 4 / 2  # int8 (and its scales), not float32, to each of 6 envoys


def test_a_task_that_raises_drops_its_envoy_and_the_round_goes_on(fed):
    sizes = sorted(len(s["label"]) for s in shard_sets(fed, "train").values())
    FAIL["envoy_train_size"] = sizes[0]
    try:
        exp = run(fed, "dropout", rounds=2, min_envoys=4, round_timeout_s=3600, opt_treatment="RESET")
    finally:
        FAIL["envoy_train_size"] = -1
    assert exp.get_experiment_status().state == "finished"
    dropouts = [e for e in exp.history if e.stage == Stage.DROPOUT]
    assert {e.round for e in dropouts} == {0, 1} and all("this envoy's task fails" in e.note for e in dropouts)


def test_a_dropout_that_leaves_too_few_fails_the_experiment_with_the_reason(fed):
    FAIL["envoy_train_size"] = min(len(s["label"]) for s in shard_sets(fed, "train").values())
    try:
        with pytest.raises(ExperimentFailed, match="failed"):
            run(fed, "too-few", rounds=2, min_envoys=6, opt_treatment="RESET")
    finally:
        FAIL["envoy_train_size"] = -1


def test_best_and_last_models_and_errors_name_the_problem(fed):
    exp = run(fed, "models", rounds=2, opt_treatment="RESET", best_metric="validate/accuracy")
    assert exp.get_best_model().params["w"].shape == (DIM, CLASSES)
    with pytest.raises(AlreadyExistsError, match="already exists"):
        run(fed, "models", rounds=1)
    with pytest.raises(NotFoundError, match="no experiment named 'nope'"):
        fed.client.status("nope")
    with pytest.raises(InvalidRequestError, match="no envoy named 'ghost' has registered"):
        run(fed, "ghost", rounds=1, envoys=["ghost"])
    registry = fed.get_shard_registry()
    assert len(registry) == 6 and sum(sum(e["shard_info"]["label_counts"]) for e in registry.values()) == 600


def test_bad_shards_are_refused_naming_the_fix():
    with pytest.raises(TypeError, match="must be a dict"):
        SimulatedFederation("shards")
    with pytest.raises(ValueError, match="at least one shard"):
        SimulatedFederation([])
    with pytest.raises(TypeError, match="not a fedjax_core.ShardDescriptor"):
        SimulatedFederation({"a": object()})
    with pytest.raises(ValueError, match="shapes differ"):
        SimulatedFederation([DummyShardDescriptor(["4"], ["1"], 2), DummyShardDescriptor(["5"], ["1"], 2)])
    with pytest.raises(ValueError, match="envoys got no samples"):
        SimulatedFederation.from_arrays(train=data(5, 0), valid=data(5, 1),
                                        partition=partition.iid(n_envoys=10, seed=0))
    with pytest.raises(TypeError, match="partition must be"):
        SimulatedFederation.from_arrays(train=data(5, 0), valid=data(5, 1), partition="iid")


def test_the_valid_split_may_have_a_partition_of_its_own():
    """Fewer test samples than envoys: the valid split's own partitioner may leave envoys without any."""
    fed = SimulatedFederation.from_arrays(train=data(600, 0), valid=data(5, 1), partition=partition.iid(n_envoys=10),
                                          valid_partition=partition.iid(n_envoys=10, allow_empty=True))
    try:
        valid = [e["shard_info"]["n_samples"]["valid"] for e in fed.get_shard_registry().values()]
        train = [e["shard_info"]["n_samples"]["train"] for e in fed.get_shard_registry().values()]
        assert sum(valid) == 5 and valid.count(0) == 5 and train == [60] * 10
    finally:
        fed.close()
    with pytest.raises(ValueError, match="valid_partition splits among 5 envoys but partition among 10"):
        SimulatedFederation.from_arrays(train=data(600, 0), valid=data(5, 1), partition=partition.iid(n_envoys=10),
                                        valid_partition=partition.iid(n_envoys=5))
    with pytest.raises(TypeError, match="valid_partition must be"):
        SimulatedFederation.from_arrays(train=data(600, 0), valid=data(5, 1), partition=partition.iid(n_envoys=10),
                                        valid_partition="iid")


def test_a_thousand_envoys_run_their_rounds():
    """Equal shards (an IID split): the tasks compile once, so this measures the platform, not JAX; every envoy
    validates the final model, as on a federation."""
    fed = SimulatedFederation.from_arrays(train=data(40_000, 0), valid=data(10_000, 1),
                                          partition=partition.iid(n_envoys=1000, seed=0))
    try:
        exp = FLExperiment(federation=fed, experiment_name="thousand")
        exp.start(model_provider=ModelInterface(model=linear_state()), task_keeper=tasks(), data_loader=Arrays(),
                  rounds_to_train=2, envoys_per_round=20, sampling_seed=1, opt_treatment="RESET",
                  envoys=sorted(fed.client.shards))
        status = exp.wait(timeout_s=600)
        assert status.state == "finished" and len(status.participants[0]) == 20
        assert json.dumps(fed.get_shard_registry())  # a thousand entries, as a federation lists them
    finally:
        fed.close()
