"""FedProx: the proximal term's value, and that mu > 0 keeps local training nearer the global model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core.runtime.fedprox import fedprox_term
from fedjax_core.runtime.interfaces import TaskInterface
from fedjax_core.runtime.tasks import run_task
from fl_experiment import create_train_state


def test_fedprox_term_is_half_mu_times_the_squared_distance():
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4), np.float32), "b": {"c": rng.standard_normal(5, np.float32)}}
    global_params = {"a": rng.standard_normal((3, 4), np.float32), "b": {"c": rng.standard_normal(5, np.float32)}}
    want = 0.5 * 0.3 * (np.sum((params["a"] - global_params["a"]) ** 2)
                        + np.sum((params["b"]["c"] - global_params["b"]["c"]) ** 2))
    assert float(fedprox_term(params, global_params, 0.3)) == pytest.approx(want, rel=1e-5)
    assert float(fedprox_term(params, params, 5.0)) == 0.0


def prox_tasks() -> TaskInterface:
    TI = TaskInterface()

    @jax.jit
    def step(state, global_params, images, labels, mu):
        def loss_fn(params):
            logits = state.apply_fn({"params": params}, images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss + fedprox_term(params, global_params, mu)
        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    @TI.register_fl_task(model="state", data_loader="dataset", device="device", optimizer="optimizer",
                         global_model="global_state")
    def train(state, dataset, optimizer, device, global_state, mu=0.0):
        for start in range(0, len(dataset["label"]) - 31, 32):
            state = step(state, global_state.params, dataset["image"][start:start + 32],
                         dataset["label"][start:start + 32], jnp.float32(mu))
        return state, {"mu": mu}

    return TI


def distance(a, b) -> float:
    return float(sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


def test_mu_above_zero_keeps_the_local_model_closer_to_the_global_one():
    rng = np.random.default_rng(1)
    data = {"image": rng.random((256, 32, 32, 3), np.float32), "label": rng.integers(0, 10, 256).astype(np.int32)}
    global_state = create_train_state(lr=0.05, momentum=0.0)
    ti = prox_tasks()
    distances = {}
    for mu in (0.0, 1.0, 10.0):
        trained, metrics = run_task(ti, "train", global_state, data, "cpu", None, 0, round_kwargs={"mu": mu},
                                    global_state=global_state)
        assert metrics == {"mu": mu}  # round_config's value reached the task
        distances[mu] = distance(trained.params, global_state.params)
    assert distances[0.0] > distances[1.0] > distances[10.0] > 0
