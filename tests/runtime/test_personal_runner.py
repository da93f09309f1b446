"""A worker's round runner under personal layers (FedPer, FedBN): it keeps its own personal tensors from round to
round, lays them over each round's model before validating and training, and never uploads them."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from fedjax_core import DataInterface, TaskInterface
from fedjax_core import records as r
from fedjax_core.runtime.model_tensors import canonicalize
from fedjax_core.runtime.round_runner import RoundRunner

SHARED = ("params/body/w",)


class BNState(train_state.TrainState):
    batch_stats: Any = None


def template() -> BNState:
    params = {"body": {"w": jnp.zeros(2)}, "head": {"w": jnp.zeros(2)}}
    return canonicalize(BNState.create(apply_fn=None, params=params, tx=optax.sgd(0.1),
                                       batch_stats={"mean": jnp.zeros(2)}))


class Data(DataInterface):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def get_train_loader(self, **kwargs):
        return np.full(4, self.value, np.float32)

    def get_valid_loader(self, **kwargs):
        return np.full(2, self.value, np.float32)

    def get_train_data_size(self):
        return 4

    def get_valid_data_size(self):
        return 2


def tasks() -> TaskInterface:
    ti = TaskInterface()

    @ti.register_fl_task(model="state", data_loader="x", device="device", optimizer="optimizer")
    def train(state, x, device, optimizer):
        params = {"body": {"w": state.params["body"]["w"] + 1}, "head": {"w": state.params["head"]["w"] + x.mean()}}
        stats = {"mean": 0.5 * state.batch_stats["mean"] + 0.5 * x.mean()}
        return state.replace(params=params, batch_stats=stats), {"loss": 0.0}

    @ti.register_fl_task(model="state", data_loader="x", device="device")
    def validate(state, x, device):  # reports what the validated state holds
        return {"body": float(state.params["body"]["w"][0]), "head": float(state.params["head"]["w"][0]),
                "bn": float(state.batch_stats["mean"][0])}

    return ti


class Link:
    """The director as a round runner sees it: each round's shared tensors, and what comes back."""

    envoy_name = "a"

    def __init__(self):
        self.global_body = np.zeros(2, np.float32)
        self.uploads: list[dict[str, np.ndarray]] = []
        self.reports: list[tuple[int, str, dict]] = []

    def round_model(self, experiment, round_):
        return {"params/body/w": self.global_body.copy()}

    def check_in(self, experiment, round_, divergence):
        return True

    def upload(self, experiment, round_, sample_count, tensors, encodings, applied=(0.0, 0.0)):
        self.uploads.append(dict(tensors))

    def send(self, experiment, round_, stage, metrics, sample_count):
        self.reports.append((round_, stage, metrics["validate"] if "validate" in metrics else metrics))

    def wait(self, raise_first=True):
        pass


def runner(link: Link, value: float = 3.0) -> RoundRunner:
    return RoundRunner(link, link, "exp", template(), None, tasks(), Data(value), "cpu", log=lambda text: None)


def task(round_: int, personal=("params/head/**", "batch_stats/**"), kind=r.TaskKind.TRAIN,
         opt_treatment="RESET", upload=SHARED) -> r.Task:
    return r.Task(kind=kind, round=round_, opt_treatment=opt_treatment, upload_tensors=upload, personal=personal)


def validated(link: Link, round_: int) -> dict:
    return next(m for rnd, stage, m in link.reports if rnd == round_ and stage == r.Stage.AGGREGATED)


@pytest.mark.parametrize("opt_treatment", ["RESET", "CONTINUE_LOCAL"])
def test_personal_tensors_stay_with_the_envoy_from_round_to_round(opt_treatment):
    link = Link()
    run = runner(link)
    run.run_round(task(0, opt_treatment=opt_treatment))
    assert validated(link, 0) == {"body": 0.0, "head": 0.0, "bn": 0.0}  # the template's at first
    assert list(link.uploads[-1]) == ["params/body/w"]  # the personal tensors never leave
    link.global_body = np.full(2, 10.0, np.float32)  # the director's next model
    run.run_round(task(1, opt_treatment=opt_treatment))
    assert validated(link, 1) == {"body": 10.0, "head": 3.0, "bn": 1.5}  # the round's body, its own head and stats
    run.run_round(task(2, kind=r.TaskKind.VALIDATE, opt_treatment=opt_treatment))
    assert validated(link, 2) == {"body": 10.0, "head": 6.0, "bn": 2.25}  # the final validation too
    assert [list(u) for u in link.uploads] == [["params/body/w"]] * 2


def test_without_personal_layers_a_reset_round_starts_from_the_template():
    link = Link()
    run = runner(link)
    run.run_round(task(0, personal=()))
    run.run_round(task(1, personal=()))
    assert validated(link, 1) == {"body": 0.0, "head": 0.0, "bn": 0.0}


def test_a_director_asking_for_a_personal_tensor_gets_no_upload():
    link = Link()
    with pytest.raises(RuntimeError, match="personal tensors \\['params/head/w'\\].*does not upload"):
        runner(link).run_round(task(0, upload=(*SHARED, "params/head/w")))
    assert link.uploads == []


def momentum_tasks() -> TaskInterface:
    ti = TaskInterface()

    @ti.register_fl_task(model="state", data_loader="x", device="device", optimizer="optimizer")
    def train(state, x, device, optimizer):  # a gradient of one on the head, none on the body
        grads = {"body": {"w": jnp.zeros(2)}, "head": {"w": jnp.ones(2)}}
        return state.apply_gradients(grads=grads), {"loss": 0.0}

    @ti.register_fl_task(model="state", data_loader="x", device="device")
    def validate(state, x, device):
        return {"head": float(state.params["head"]["w"][0])}

    return ti


@pytest.mark.parametrize("opt_treatment, final_head", [("RESET", -2.0), ("CONTINUE_LOCAL", -2.5)])
def test_continue_local_keeps_the_personal_layers_optimizer_state(opt_treatment, final_head):
    """SGD with momentum 0.5, lr 1, a gradient of 1 each round: a fresh optimizer steps -1 twice (RESET); the kept
    one steps -1 then -(1 + 0.5) (CONTINUE_LOCAL), so the envoy's momentum for its own head survives the rounds."""
    link = Link()
    state = canonicalize(BNState.create(apply_fn=None, params={"body": {"w": jnp.zeros(2)}, "head": {"w": jnp.zeros(2)}},
                                        tx=optax.sgd(1.0, momentum=0.5), batch_stats={"mean": jnp.zeros(2)}))
    run = RoundRunner(link, link, "exp", state, None, momentum_tasks(), Data(1.0), "cpu", log=lambda text: None)
    for round_ in range(2):
        run.run_round(task(round_, opt_treatment=opt_treatment))
    run.run_round(task(2, kind=r.TaskKind.VALIDATE, opt_treatment=opt_treatment))
    assert [validated(link, k)["head"] for k in range(3)] == [0.0, -1.0, final_head]
