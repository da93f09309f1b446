"""Personal layers (FedPer) on SimulatedFederation, against a numpy reference: a two-layer linear model whose
'head' is personal. The shared 'body' is the FedAvg of each envoy's step; each envoy's head trains on its own data
only; the model pulled back holds the template's head; the status reports each envoy's personalised validation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from fedjax_core import FLExperiment, ModelInterface, TaskInterface, partition
from fedjax_core.records import Stage
from fedjax_core.simulation import SimulatedFederation
from linear_federation import CLASSES, DIM, Arrays, data

HIDDEN, LR, ROUNDS = 5, 0.5, 3


def template() -> train_state.TrainState:
    rng = np.random.default_rng(3)
    params = {"body": {"w": jnp.asarray(rng.normal(size=(DIM, HIDDEN)) * 0.5, jnp.float32)},
              "head": {"w": jnp.asarray(rng.normal(size=(HIDDEN, CLASSES)) * 0.5, jnp.float32),
                       "b": jnp.zeros((CLASSES,), jnp.float32)}}
    return train_state.TrainState.create(apply_fn=lambda p, x: x @ p["body"]["w"] @ p["head"]["w"] + p["head"]["b"],
                                         params=params, tx=optax.sgd(LR))


def mean_loss(params, apply_fn, batch):
    losses = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, batch["image"]), batch["label"])
    mask = batch["mask"] if "mask" in batch else jnp.ones_like(losses)  # a cohort's padded rows have mask 0
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@jax.jit
def sgd_step(state, batch):
    return state.apply_gradients(grads=jax.grad(mean_loss)(state.params, state.apply_fn, batch))


def tasks() -> TaskInterface:
    ti = TaskInterface()

    @ti.register_fl_task(model="state", data_loader="batch", device="device", optimizer="optimizer", vectorized=True)
    def train(state, batch, device, optimizer):
        return sgd_step(state, batch), {"loss": mean_loss(state.params, state.apply_fn, batch)}

    @ti.register_fl_task(model="state", data_loader="batch", device="device", vectorized=True)
    def validate(state, batch, device):
        return {"loss": mean_loss(state.params, state.apply_fn, batch)}

    return ti


# ---------------------------------------------------------------------------------------------- numpy reference
def np_loss_and_grads(body, head_w, head_b, x, y):
    """Mean softmax cross-entropy of x @ body @ head_w + head_b, and its gradients, in float64."""
    x, body, head_w, head_b = (np.asarray(a, np.float64) for a in (x, body, head_w, head_b))
    hidden = x @ body
    logits = hidden @ head_w + head_b
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y]).mean()
    d = p.copy()
    d[np.arange(len(y)), y] -= 1
    d /= len(y)
    return loss, (x.T @ (d @ head_w.T), hidden.T @ d, d.sum(0))


def reference(shards_train, shards_valid, rounds):
    """Each round: every envoy validates (shared body, its own head), takes one SGD step on its own data, keeps its
    head; the body is the sample-weighted mean of the envoys' stepped bodies. After the last round every envoy
    validates the final body with its own head. Returns (final body, {round: {envoy: aggregated validation loss}},
    {envoy: final head})."""
    t = template().params
    body = np.asarray(t["body"]["w"], np.float64)
    heads = {e: (np.asarray(t["head"]["w"], np.float64), np.asarray(t["head"]["b"], np.float64)) for e in shards_train}
    validations = {}
    for round_ in range(rounds + 1):
        validations[round_] = {e: np_loss_and_grads(body, *heads[e], v["image"], v["label"])[0]
                               for e, v in shards_valid.items()}
        if round_ == rounds:
            break
        bodies, weights = [], []
        for e, s in shards_train.items():
            _, (g_body, g_w, g_b) = np_loss_and_grads(body, *heads[e], s["image"], s["label"])
            bodies.append(body - LR * g_body)
            weights.append(len(s["label"]))
            heads[e] = (heads[e][0] - LR * g_w, heads[e][1] - LR * g_b)
        body = sum(w * b for w, b in zip(weights, bodies)) / sum(weights)
    return body, validations, heads


# ------------------------------------------------------------------------------------------------------ the test
@pytest.mark.parametrize("vectorize", [False, True], ids=["envoy-by-envoy", "cohort"])
def test_personal_head_stays_with_each_envoy_and_the_body_is_their_fedavg(vectorize):
    fed = SimulatedFederation.from_arrays(train=data(240, 0), valid=data(90, 1),
                                          partition=partition.pathological(n_envoys=3, classes_per_envoy=1),
                                          vectorize=vectorize)
    try:
        exp = FLExperiment(federation=fed, experiment_name="fedper")
        exp.start(model_provider=ModelInterface(model=template()), task_keeper=tasks(), data_loader=Arrays(),
                  rounds_to_train=ROUNDS, opt_treatment="RESET", personal=["params/head/**"])
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        status = exp.get_experiment_status()
        train = {e: fed.client.shards[e].get_split("train") for e in sorted(fed.client.shards)}
        valid = {e: fed.client.shards[e].get_split("valid") for e in sorted(fed.client.shards)}
        uploaded = {e.round: next(m.value for m in e.metrics if m.name == "bytes_received")
                    for e in exp.history if e.stage == Stage.ROUND and not e.envoy}
    finally:
        fed.close()
    assert status.state == "finished"
    body, validations, _ = reference(train, valid, ROUNDS)

    # (a) the model pulled back: the FedAvg of the bodies, and the template's head (never averaged, never uploaded)
    last = exp.get_last_model()
    np.testing.assert_allclose(np.asarray(last.params["body"]["w"]), body, rtol=1e-4, atol=1e-6)
    for key in ("w", "b"):
        np.testing.assert_array_equal(np.asarray(last.params["head"][key]), np.asarray(template().params["head"][key]))
    assert uploaded == {r: 3 * DIM * HIDDEN * 4 for r in range(ROUNDS)}  # each envoy's float32 body, nothing else

    # (b) each envoy validates the round's body with the head it trained on its own data only, every round
    reported = {(e.round, e.envoy): next(m.value for m in e.metrics if m.name == "loss")
                for e in exp.history if e.stage == Stage.AGGREGATED and e.envoy}
    for round_, losses in validations.items():
        for envoy, loss in losses.items():
            assert reported[round_, envoy] == pytest.approx(loss, rel=1e-4), (round_, envoy)
    heads_differ = len({round(v, 6) for v in validations[ROUNDS].values()}) == 3
    assert heads_differ  # label skew: a shared head could not match every envoy's loss above

    # (c) the status: each envoy's latest personalised validation, the final round's
    assert [v.envoy for v in status.personal_validation] == sorted(train)
    for v in status.personal_validation:
        assert v.round == ROUNDS
        assert dict((m.name, m.value) for m in v.metrics)["loss"] == pytest.approx(validations[ROUNDS][v.envoy],
                                                                                   rel=1e-4)
