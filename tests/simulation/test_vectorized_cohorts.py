"""Vectorised cohorts: tasks registered with vectorized=True run a round's participants under one jax.vmap, on
padded and masked data, and train to the model the same tasks reach envoy by envoy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from fedjax_core import DataInterface, FLExperiment, ModelInterface, TaskInterface, partition
from fedjax_core.api.experiment import ExperimentFailed
from fedjax_core.runtime.interfaces import TaskError
from fedjax_core.simulation import SimulatedFederation
from fedjax_core.simulation.cohort import CohortError, padded_length, stack_splits

DIM, CLASSES = 4, 3


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x, (x @ rng.normal(size=(DIM, CLASSES))).argmax(1).astype(np.int32)


def linear_state() -> train_state.TrainState:
    params = {"w": jnp.zeros((DIM, CLASSES)), "b": jnp.zeros((CLASSES,))}
    return train_state.TrainState.create(apply_fn=lambda p, x: x @ p["w"] + p["b"], params=params,
                                         tx=optax.sgd(0.5, momentum=0.9))


def masked_loss(params, apply_fn, batch):
    losses = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, batch["image"]), batch["label"])
    return jnp.sum(losses * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


@jax.jit
def two_steps(state, batch):  # full-batch steps: momentum carries between them
    for _ in range(2):
        state = state.apply_gradients(grads=jax.grad(masked_loss)(state.params, state.apply_fn, batch))
    return state, masked_loss(state.params, state.apply_fn, batch)


@jax.jit
def accuracy(state, batch):
    hits = (state.apply_fn(state.params, batch["image"]).argmax(1) == batch["label"]) * batch["mask"]
    return jnp.sum(hits) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


class Arrays(DataInterface):
    def get_train_loader(self, **kwargs):
        return self.shard_descriptor.get_split("train")

    def get_valid_loader(self, **kwargs):
        return self.shard_descriptor.get_split("valid")


def tasks(traceable: bool = True) -> TaskInterface:
    ti = TaskInterface()

    @ti.register_fl_task(model="state", data_loader="batch", device="device", optimizer="optimizer", vectorized=True)
    def train(state, batch, device, optimizer):
        state, loss = two_steps(state, batch)
        return state, {"loss": loss if traceable else float(loss)}

    @ti.register_fl_task(model="state", data_loader="batch", device="device", vectorized=True)
    def validate(state, batch, device):
        return {"accuracy": accuracy(state, batch)}

    return ti


def run(fed, name: str, ti=None, **kwargs) -> FLExperiment:
    exp = FLExperiment(federation=fed, experiment_name=name)
    exp.start(model_provider=ModelInterface(model=linear_state()), task_keeper=ti or tasks(), data_loader=Arrays(),
              **{"rounds_to_train": 3, "opt_treatment": "CONTINUE_LOCAL", **kwargs})
    exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    return exp


def federation(**options) -> SimulatedFederation:
    return SimulatedFederation.from_arrays(train=data(600, 0), valid=data(200, 1),
                                           partition=partition.dirichlet(n_envoys=8, alpha=1.0, seed=0), **options)


@pytest.mark.parametrize("opt_treatment", ["CONTINUE_LOCAL", "RESET"])  # a state per envoy; one shared state
def test_vectorised_and_envoy_by_envoy_runs_train_to_the_same_model_and_metrics(opt_treatment):
    together, one_by_one = federation(max_cohort=4), federation(vectorize=False)  # 6 of 8 envoys: cohorts 4 and 2
    try:
        a = run(together, "v", envoys_per_round=6, sampling_seed=4, opt_treatment=opt_treatment, rounds_to_train=2)
        b = run(one_by_one, "s", envoys_per_round=6, sampling_seed=4, opt_treatment=opt_treatment, rounds_to_train=2)
    finally:
        together.close()
        one_by_one.close()
    for got, want in zip(jax.tree_util.tree_leaves(a.get_last_model()), jax.tree_util.tree_leaves(b.get_last_model())):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)

    def reports(exp):
        return sorted((e.round, e.envoy, e.stage, m.name, round(m.value, 4)) for e in exp.history
                      if e.stage in ("train", "aggregated_model_validation", "locally_tuned_model_validation")
                      for m in e.metrics)

    assert reports(a) == reports(b) and len(reports(a)) > 6 * 2 * 3  # every envoy's reports, the same values
    assert a.get_experiment_status().participants == b.get_experiment_status().participants


def test_a_vectorised_task_that_cannot_be_traced_fails_the_experiment_naming_the_fix():
    fed = federation()
    try:
        with pytest.raises(ExperimentFailed, match="vectorized=True must be a pure JAX function"):
            run(fed, "float", ti=tasks(traceable=False))
    finally:
        fed.close()


def test_padding_and_masks_and_cohort_shape_errors():
    assert [padded_length(n) for n in (0, 1, 2, 3, 5, 64, 65)] == [1, 1, 2, 4, 8, 64, 128]
    stacked = stack_splits([{"x": np.ones((3, 2))}, {"x": np.ones((5, 2))}], ["a", "b"])
    assert stacked["x"].shape == (2, 8, 2) and stacked["mask"].sum(1).tolist() == [3, 5]
    assert stack_splits([{"x": np.ones(2)}] * 3, ["a", "b", "c"])["mask"].sum(1).tolist() == [2, 2, 2, 0]
    assert stacked["x"][0, 3:].sum() == 0  # padding is zeros, and masked out
    with pytest.raises(CohortError, match=r"data key 'x' has different shapes per sample across the cohort"):
        stack_splits([{"x": np.ones((3, 2))}, {"x": np.ones((3, 4))}], ["a", "b"])
    with pytest.raises(CohortError, match="envoy 'b': its data has keys"):
        stack_splits([{"x": np.ones(3)}, {"y": np.ones(3)}], ["a", "b"])
    with pytest.raises(CohortError, match="must return a dict of arrays"):
        stack_splits([[1, 2]], ["a"])
    with pytest.raises(TaskError, match="vectorized task cannot also take a mesh"):
        TaskInterface().register_fl_task(model="s", data_loader="d", device="v", mesh="m", vectorized=True)


def test_ten_thousand_envoys_with_a_tiny_model_finish():
    fed = SimulatedFederation.from_arrays(train=data(40_000, 0), valid=data(20_000, 1),
                                          partition=partition.iid(n_envoys=10_000, seed=0), max_cohort=1024)
    try:
        exp = FLExperiment(federation=fed, experiment_name="ten-thousand")
        exp.start(model_provider=ModelInterface(model=linear_state()), task_keeper=tasks(), data_loader=Arrays(),
                  rounds_to_train=2, envoys_per_round=100, sampling_seed=0, opt_treatment="RESET")
        status = exp.wait(timeout_s=900)
        assert status.state == "finished" and len(status.participants[1]) == 100
        final = [e for e in fed.client.store.events("ten-thousand") if e[1].round == 2 and e[1].envoy]
        assert len(final) == 10_000  # every envoy validated the final model
    finally:
        fed.close()
