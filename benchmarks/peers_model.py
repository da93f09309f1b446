"""Model code shared by both sides of ``make bench-peers``: this project's tasks and Flower's client.

Imported by the project's notebook side (and sent to its envoys by value) and by the Flower
client (run with ``.venv-flower``'s python), so both train the same jitted step on the same
batches. ``TRACES`` counts how often each jitted step was traced: a count that grows after
the first round means JAX recompiled.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import seed_cnn

MiB = 1 << 20
TRACES = {"train": 0, "eval": 0, "nudge": 0}


# ----------------------------------------------------------------------------- case 1: the seed CNN
def _train_step(state, images, labels):
    TRACES["train"] += 1  # Python body: runs only while JAX traces
    return seed_cnn.train_step_fn(state, images, labels)


def _eval_step(state, images, labels, mask):
    TRACES["eval"] += 1
    return seed_cnn.eval_step_fn(state, images, labels, mask)


train_step = jax.jit(_train_step)
eval_step = jax.jit(_eval_step)


def train_epoch(state, dataset, round_num: int):
    """One epoch of the seed's SGD step over the seed's batches for this round; (state, train accuracy)."""
    accs = []
    for idx in seed_cnn._batches(dataset, round_num):
        state, acc = train_step(state, dataset["image"][idx], dataset["label"][idx])
        accs.append(acc)
    return state, float(np.mean(jax.device_get(accs)))


def evaluate(state, dataset) -> dict:
    """The seed's validation: accuracy and mean loss over the whole split, padded to full batches."""
    images, labels, batch = dataset["image"], dataset["label"], seed_cnn.BATCH
    loss, correct = 0.0, 0
    for start in range(0, len(labels), batch):
        x, y = images[start:start + batch], labels[start:start + batch]
        real = len(y)
        x = np.concatenate([x, np.zeros((batch - real, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros(batch - real, y.dtype)])
        batch_loss, batch_correct = eval_step(state, x, y, np.arange(batch) < real)
        loss, correct = loss + float(batch_loss), correct + int(batch_correct)
    return {"validation_accuracy": correct / len(labels), "validation_loss": loss / len(labels)}


def traces() -> int:
    return sum(TRACES.values())


# ----------------------------------------------------------------------------- cases 2 and 3: no compute
def width_for(model_bytes: int, in_features: int = 32 * 32 * 3, classes: int = 10) -> int:
    """Hidden width w of Dense(w)-Dense(w)-Dense(10) with about model_bytes of float32 params."""
    n, b = model_bytes / 4, in_features + classes + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * (n - classes))) / 2))


class MLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


def mlp_params(model_mb: float, shapes_only: bool = False):
    """The MLP's initial params (seed 0), or only their shapes (``jax.eval_shape``, no memory)."""
    model = MLP(width=width_for(int(model_mb * MiB)))
    init = lambda: model.init(jax.random.PRNGKey(0), jnp.ones([1, 32, 32, 3]))["params"]  # noqa: E731
    return jax.eval_shape(init) if shapes_only else init()


def mlp_state(model_mb: float):
    """A CustomTrainState of the MLP with plain SGD (no optimizer state): only params travel."""
    from fedjax_core import CustomTrainState

    params = mlp_params(model_mb)
    return CustomTrainState.create(apply_fn=MLP(width=width_for(int(model_mb * MiB))).apply, params=params,
                                   tx=optax.sgd(0.01), opt_vars=[])


def _nudge(params):
    TRACES["nudge"] += 1
    return jax.tree_util.tree_map(lambda x: x + jnp.asarray(1e-6, x.dtype), params)


nudge = jax.jit(_nudge)  # "training" for cases 2 and 3: the model comes back slightly changed


# ----------------------------------------------------------------------------- this project's tasks
# Each task reports "traces" (cumulative, this process) and "task_s" (its own compute time).
def project_tasks(kind: str):
    """The TaskInterface of case 1 (``kind='cnn'``) or of cases 2 and 3 (``'nudge'``)."""
    from fedjax_core import TaskInterface

    TI = TaskInterface()
    if kind == "cnn":
        @TI.register_fl_task(model="state", data_loader="dataset", device="device", optimizer="optimizer",
                             round_num="round_num")
        def train(state, dataset, optimizer, device, round_num):
            t0 = time.perf_counter()
            state, acc = train_epoch(state, dataset, round_num)
            return state, {"train_acc": acc, "traces": traces(), "task_s": time.perf_counter() - t0}

        @TI.register_fl_task(model="state", data_loader="dataset", device="device")
        def validate(state, dataset, device):
            t0 = time.perf_counter()
            return {**evaluate(state, dataset), "traces": traces(), "task_s": time.perf_counter() - t0}
    else:
        @TI.register_fl_task(model="state", data_loader="dataset", optimizer="optimizer", device="device")
        def train(state, dataset, optimizer, device):
            t0 = time.perf_counter()
            state = state.replace(params=nudge(state.params))
            return state, {"traces": traces(), "task_s": time.perf_counter() - t0}

        @TI.register_fl_task(model="state", data_loader="dataset", device="device")
        def validate(state, dataset, device):
            return {"accuracy": 0.0, "traces": traces(), "task_s": 0.0}
    return TI
