"""Model code shared by every side of ``make bench-simulation``: the floor, this project's simulation (sequential
and vectorised tasks) and Flower's simulation engine (run with ``.venv-flower``'s python).

All of them train the seed tutorial's CNN (``seed_cnn.CNN``, SGD with momentum) for one local epoch per round
on each participant's own samples, in batches of ``BATCH`` padded with a mask, so a shard of any size takes
the same compiled step: the floor and the sequential tasks loop over ``masked_step``; the vectorised task runs
``epoch`` (a ``lax.scan`` over the same padded batches) under ``jax.vmap``. A batch that is all padding leaves
the state as it was, so padding a cohort to one length changes nothing. ``count_compiles`` counts XLA
compilations in this process, whoever's code asked for them.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import seed_cnn

BATCH = 8  # a Dirichlet split of 5,170 images over 1,000 envoys leaves 0 to about 20 per envoy
TRACES = {"step": 0, "epoch": 0, "eval": 0}
CACHE: dict = {}  # simulation_flower.py's data set, once per process
COMPILED_AT: list[float] = []  # wall times of this process's XLA compilations, once count_compiles() ran


def count_compiles() -> None:
    """From now on, note the time of each of this process's XLA compilations in ``COMPILED_AT``."""
    import time

    from jax import monitoring

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            COMPILED_AT.append(time.time())

    monitoring.register_event_duration_secs_listener(listener)


def initial_state():
    return seed_cnn.create_train_state()


def _loss(params, apply_fn, images, labels, mask):
    logits = apply_fn({"params": params}, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _step(state, images, labels, mask):
    """One SGD step on the unmasked samples; the state unchanged for a batch of padding only."""
    loss, grads = jax.value_and_grad(_loss)(state.params, state.apply_fn, images, labels, mask)
    stepped = state.apply_gradients(grads=grads)
    real = jnp.sum(mask) > 0
    return jax.tree_util.tree_map(lambda new, old: jnp.where(real, new, old), stepped, state), loss * jnp.sum(mask)


def _masked_step(state, images, labels, mask):
    TRACES["step"] += 1  # Python body: runs only while JAX traces
    return _step(state, images, labels, mask)


masked_step = jax.jit(_masked_step)


def padded(n: int) -> int:
    """Samples once padded to whole batches."""
    return max(1, math.ceil(n / BATCH)) * BATCH


def pad_to(images: np.ndarray, labels: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = np.zeros(length, np.float32)
    mask[:len(labels)] = 1.0
    images = np.concatenate([images, np.zeros((length - len(images), *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(length - len(labels), labels.dtype)])
    return images, labels, mask


def train_epoch(state, images: np.ndarray, labels: np.ndarray):
    """One local epoch as a Python loop of ``masked_step``: the floor's, the sequential tasks' and Flower's."""
    images, labels, mask = pad_to(images, labels, padded(len(labels)))
    total = 0.0
    for start in range(0, len(labels), BATCH):
        end = start + BATCH
        state, loss = masked_step(state, images[start:end], labels[start:end], mask[start:end])
        total += float(loss)
    return state, total / max(1, int(mask.sum()))


def epoch(state, images, labels, mask):
    """The same epoch as one JAX function of fixed-shape arrays (vectorisable): padded to whole batches, then a
    ``lax.scan`` of the step over them. Returns the state and the summed loss."""
    TRACES["epoch"] += 1
    n = labels.shape[0]
    extra = padded(n) - n
    images = jnp.pad(images, [(0, extra)] + [(0, 0)] * (images.ndim - 1))
    labels, mask = jnp.pad(labels, (0, extra)), jnp.pad(mask, (0, extra))
    steps = labels.shape[0] // BATCH

    def body(state, batch):
        return _step(state, *batch)

    state, losses = jax.lax.scan(body, state, (images.reshape(steps, BATCH, *images.shape[1:]),
                                               labels.reshape(steps, BATCH), mask.reshape(steps, BATCH)))
    return state, jnp.sum(losses)


def _evaluate(state, images, labels, mask):
    TRACES["eval"] += 1
    logits = state.apply_fn({"params": state.params}, images)
    return jnp.sum(jnp.where(mask > 0, jnp.argmax(logits, -1) == labels, False)), jnp.sum(mask)


evaluate_batch = jax.jit(_evaluate)


def accuracy(state, images: np.ndarray, labels: np.ndarray) -> float:
    """Test accuracy of ``state`` (batches of 256, padded)."""
    correct = 0
    for start in range(0, len(labels), 256):
        x, y, m = pad_to(images[start:start + 256], labels[start:start + 256], 256)
        correct += int(evaluate_batch(state, x, y, m)[0])
    return correct / len(labels)


def traces() -> int:
    return sum(TRACES.values())


def compiles_between(start: float, end: float) -> int:
    """XLA compilations between two wall times (from the first round's end to the last's: recompilations)."""
    return sum(start < t <= end for t in COMPILED_AT)


def params_of(state) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(state.params)]


def with_params(state, leaves: list[np.ndarray]):
    treedef = jax.tree_util.tree_structure(state.params)
    return state.replace(params=jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in leaves]))


def fedavg(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Sample-weighted mean of the participants' parameters (those with samples)."""
    total = sum(n for _, n in results)
    return [sum(p[i].astype(np.float64) * n for p, n in results) / total for i in range(len(results[0][0]))]
