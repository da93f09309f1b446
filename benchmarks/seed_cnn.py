"""The seed tutorial's CNN, tasks and data interface (workspace/FLAX_CIFAR10_CNN.ipynb), as a module
that travels to the envoys by value. Used by ``benchmarks/strategies.py``."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from fedjax_core import CustomTrainState, DataInterface, TaskInterface

BATCH = 128


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for features in (32, 64, 128):
            x = nn.avg_pool(nn.relu(nn.Conv(features=features, kernel_size=(3, 3))(x)), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(features=10)(nn.relu(nn.Dense(features=256)(x)))


def create_train_state(seed: int = 0, lr: float = 0.01, momentum: float = 0.9) -> CustomTrainState:
    cnn = CNN()
    params = flax.core.unfreeze(cnn.init(jax.random.PRNGKey(seed), jnp.ones([1, 32, 32, 3], jnp.float32))["params"])
    return CustomTrainState.create(apply_fn=cnn.apply, params=params, tx=optax.sgd(lr, momentum), opt_vars=["trace"])


def train_step_fn(state, images, labels):
    """One SGD step; ``train_step`` is its jit (``peers_model`` jits it with a trace counter)."""
    def loss_fn(params):
        logits = state.apply_fn({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), jnp.mean(jnp.argmax(logits, -1) == labels)


train_step = jax.jit(train_step_fn)


@jax.jit
def prox_train_step(state, images, labels, global_params, mu):
    """train_step with FedProx's proximal term added to the loss."""
    from fedjax_core import fedprox_term

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss + fedprox_term(params, global_params, mu), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), jnp.mean(jnp.argmax(logits, -1) == labels)


def eval_step_fn(state, images, labels, mask):
    """Summed loss and correct count of the unmasked samples; ``eval_step`` is its jit."""
    logits = state.apply_fn({"params": state.params}, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(jnp.where(mask, jnp.argmax(logits, -1) == labels, False))


eval_step = jax.jit(eval_step_fn)


def _batches(dataset, round_num):
    n = len(dataset["label"]) // BATCH * BATCH
    return np.random.default_rng(round_num).permutation(len(dataset["label"]))[:n].reshape(-1, BATCH)


def make_tasks(prox_mu: float = 0.0) -> TaskInterface:
    """The seed's train and validate tasks; ``prox_mu`` > 0 trains with FedProx's proximal term."""
    TI = TaskInterface()

    if prox_mu > 0:
        @TI.register_fl_task(model="state", data_loader="dataset", device="device", optimizer="optimizer",
                             round_num="round_num", global_model="global_state")
        def train(state, dataset, optimizer, device, round_num, global_state):
            accs = []
            for idx in _batches(dataset, round_num):
                state, acc = prox_train_step(state, dataset["image"][idx], dataset["label"][idx],
                                             global_state.params, prox_mu)
                accs.append(acc)
            return state, {"train_acc": float(np.mean(jax.device_get(accs)))}
    else:
        @TI.register_fl_task(model="state", data_loader="dataset", device="device", optimizer="optimizer",
                             round_num="round_num")
        def train(state, dataset, optimizer, device, round_num):
            accs = []
            for idx in _batches(dataset, round_num):
                state, acc = train_step(state, dataset["image"][idx], dataset["label"][idx])
                accs.append(acc)
            return state, {"train_acc": float(np.mean(jax.device_get(accs)))}

    @TI.register_fl_task(model="state", data_loader="dataset", device="device")
    def validate(state, dataset, device):
        images, labels = dataset["image"], dataset["label"]
        loss, correct = 0.0, 0
        for start in range(0, len(labels), BATCH):
            x, y = images[start:start + BATCH], labels[start:start + BATCH]
            real = len(y)
            x = np.concatenate([x, np.zeros((BATCH - real, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(BATCH - real, y.dtype)])
            batch_loss, batch_correct = eval_step(state, x, y, np.arange(BATCH) < real)
            loss, correct = loss + float(batch_loss), correct + int(batch_correct)
        return {"validation_accuracy": correct / len(labels), "validation_loss": loss / len(labels)}

    return TI


class ShardSplits(DataInterface):
    def get_train_loader(self, **kwargs):
        return self.shard_descriptor.get_split("train")

    def get_valid_loader(self, **kwargs):
        return self.shard_descriptor.get_split("valid")
