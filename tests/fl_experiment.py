"""A small Flax CNN experiment on CIFAR-10 shards, in the seed tutorial's style, for tests."""
from __future__ import annotations

import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.core import unfreeze

from fedjax_core import CustomTrainState, DataInterface, TaskInterface

TRACES = {"update": 0}


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))


def create_train_state(seed: int = 0, lr: float = 0.01, momentum: float = 0.9,
                       param_dtype=jnp.float32) -> CustomTrainState:
    model = SmallCNN()
    params = unfreeze(model.init(jax.random.PRNGKey(seed), jnp.ones([1, 32, 32, 3]))["params"])
    params = jax.tree_util.tree_map(lambda p: p.astype(param_dtype), params)
    tx = optax.sgd(lr, momentum)
    return CustomTrainState.create(apply_fn=model.apply, params=params, tx=tx, opt_vars=["trace"])


@jax.jit
def apply_model(state, images, labels):
    TRACES["update"] += 1  # runs only while tracing: counts compilations of this step

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, loss, jnp.mean(jnp.argmax(logits, -1) == labels)


@jax.jit
def update_model(state, grads):
    return state.apply_gradients(grads=grads)


@jax.jit
def eval_step(params, apply_fn_state, images, labels):
    logits = apply_fn_state.apply_fn({"params": params}, images)
    return jnp.sum(jnp.argmax(logits, -1) == labels)


def train_epoch(state, dataset, batch_size: int = 64):
    n = len(dataset["label"])
    accs = []
    for start in range(0, n - batch_size + 1, batch_size):  # fixed shapes: one compilation
        images, labels = dataset["image"][start:start + batch_size], dataset["label"][start:start + batch_size]
        grads, _, acc = apply_model(state, images, labels)
        state = update_model(state, grads)
        accs.append(acc)
    return state, float(np.mean(accs))


def evaluate(state, dataset, batch_size: int = 64) -> float:
    n = len(dataset["label"])
    correct = 0
    for start in range(0, n, batch_size):
        images = np.zeros((batch_size, 32, 32, 3), np.float32)
        labels = np.full((batch_size,), -1, np.int32)
        chunk = dataset["label"][start:start + batch_size]
        images[:len(chunk)] = dataset["image"][start:start + batch_size]
        labels[:len(chunk)] = chunk
        correct += int(eval_step(state.params, state, images, labels))
    return correct / n


def trace_norm(state) -> float:
    leaves = jax.tree_util.tree_leaves(state.opt_state)
    return float(sum(jnp.sum(jnp.abs(x)) for x in leaves if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)))


class SubsetDataset(DataInterface):
    """The shard's splits, optionally cut to the first ``limit`` samples to keep tests fast."""

    def __init__(self, limit: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    @property
    def shard_descriptor(self):
        return self._shard_descriptor

    @shard_descriptor.setter
    def shard_descriptor(self, shard_descriptor):
        self._shard_descriptor = shard_descriptor
        cut = slice(0, self.limit)
        self.train_set = {k: v[cut] for k, v in shard_descriptor.get_split("train").items()}
        self.valid_set = {k: v[cut] for k, v in shard_descriptor.get_split("valid").items()}

    def get_train_loader(self, **kwargs):
        return self.train_set

    def get_valid_loader(self, **kwargs):
        return self.valid_set


def make_tasks(style: str = "inplace") -> TaskInterface:
    """Tasks in the seed's in-place style (``update_state``) or returning ``(new_state, metrics)``."""
    TI = TaskInterface()

    @TI.add_kwargs(batch_size=64)
    @TI.register_fl_task(model="state", data_loader="dataset", optimizer="optimizer", device="device",
                         round_num="round_num")
    def train(state, dataset, optimizer, device, round_num=0, batch_size=32, loss_fn=None, warmup=False,
              lr_scale=1.0):
        time.sleep(float(os.environ.get("FEDJAX_TEST_TRAIN_DELAY_S", "0")))  # a deliberately slow envoy
        if str(round_num) in os.environ.get("FEDJAX_TEST_FAIL_ROUNDS", "").split(","):  # an injected task failure
            raise RuntimeError(f"injected failure in round {round_num}")
        if str(round_num) in os.environ.get("FEDJAX_TEST_KILL_ROUNDS", "").split(","):  # a worker killed (OOM...)
            os.kill(os.getpid(), signal.SIGKILL)
        start_norm = trace_norm(state)
        new_state, acc = train_epoch(state, dataset, batch_size)
        metrics = {"train_acc": acc, "trace_norm_at_start": start_norm, "traces": float(TRACES["update"]),
                   "lr_scale": float(lr_scale), "batch_size": float(batch_size),
                   "pid": float(os.getpid()), "on_gpu": float(jax.default_backend() == "gpu"),
                   "device_is_cuda": float(str(device).startswith("cuda"))}
        if style == "inplace":
            state.update_state(new_state)
            return metrics
        return new_state, metrics

    @TI.register_fl_task(model="state", data_loader="dataset", device="device")
    def validate(state, dataset, device):
        return {"validation_accuracy": evaluate(state, dataset)}

    return TI


def make_mesh_tasks() -> TaskInterface:
    """The same training, data-parallel over the envoy's mesh (``register_fl_task(mesh=...)``)."""
    TI = TaskInterface()

    @TI.register_fl_task(model="state", data_loader="dataset", optimizer="optimizer", device="device", mesh="mesh")
    def train(state, dataset, optimizer, device, mesh, batch_size=64):
        from fedjax_core.parallel import replicate, shard_batch

        devices_at_start = len(state.params["Dense_0"]["kernel"].sharding.device_set)
        state = replicate(state, mesh)
        accs, rows = [], 0
        for start in range(0, len(dataset["label"]) - batch_size + 1, batch_size):
            images, labels = shard_batch((dataset["image"][start:start + batch_size],
                                          dataset["label"][start:start + batch_size]), mesh)
            rows = images.addressable_shards[0].data.shape[0]
            grads, _, acc = apply_model(state, images, labels)
            state = update_model(state, grads)
            accs.append(acc)
        return state, {"train_acc": float(np.mean(accs)), "mesh_devices": float(mesh.devices.size),
                       "rows_per_device": float(rows), "param_devices_at_start": float(devices_at_start),
                       "traces": float(TRACES["update"])}

    @TI.register_fl_task(model="state", data_loader="dataset", device="device")
    def validate(state, dataset, device):
        return {"validation_accuracy": evaluate(state, dataset)}

    return TI
