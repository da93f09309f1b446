"""A linear softmax model on small Gaussian data, as FLExperiment's model, tasks and data, for tests that run
experiments on SimulatedFederation (tests/simulation, tests/privacy)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from fedjax_core import DataInterface, FLExperiment, ModelInterface, TaskInterface

DIM, CLASSES = 4, 3
FAIL = {"envoy_train_size": -1}  # an envoy whose train split has this many samples raises in its task


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x, (x @ rng.normal(size=(DIM, CLASSES))).argmax(1).astype(np.int32)


def linear_state(lr: float = 0.1) -> train_state.TrainState:
    params = {"w": jnp.zeros((DIM, CLASSES)), "b": jnp.zeros((CLASSES,))}
    return train_state.TrainState.create(apply_fn=lambda p, x: x @ p["w"] + p["b"], params=params, tx=optax.sgd(lr))


def loss(params, apply_fn, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()


@jax.jit
def step(state, x, y):
    return state.apply_gradients(grads=jax.grad(loss)(state.params, state.apply_fn, x, y))


class Arrays(DataInterface):
    def get_train_loader(self, **kwargs):
        return self.shard_descriptor.get_split("train")

    def get_valid_loader(self, **kwargs):
        return self.shard_descriptor.get_split("valid")

    def get_train_data_size(self):
        return len(self.get_train_loader()["label"])

    def get_valid_data_size(self):
        return len(self.get_valid_loader()["label"])


def tasks() -> TaskInterface:
    ti = TaskInterface()

    @ti.register_fl_task(model="state", data_loader="split", device="device", optimizer="optimizer")
    def train(state, split, device, optimizer):
        if len(split["label"]) == FAIL["envoy_train_size"]:
            raise RuntimeError("this envoy's task fails")
        return step(state, split["image"], split["label"]), {"loss": float(loss(state.params, state.apply_fn,
                                                                                split["image"], split["label"]))}

    @ti.register_fl_task(model="state", data_loader="split", device="device")
    def validate(state, split, device):
        return {"accuracy": float(jnp.mean(state.apply_fn(state.params, split["image"]).argmax(1) == split["label"]))}

    return ti


def run(fed, name: str, rounds: int = 2, **kwargs) -> FLExperiment:
    exp = FLExperiment(federation=fed, experiment_name=name)
    exp.start(model_provider=ModelInterface(model=linear_state()), task_keeper=tasks(), data_loader=Arrays(),
              rounds_to_train=rounds, **kwargs)
    exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    return exp
