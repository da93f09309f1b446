"""The task contract: registration checks the function's signature, and run_task fills each role the contract
names, then the task's add_kwargs, then the round's kwargs, and takes either way a task may return."""
from __future__ import annotations

import pytest

from fedjax_core.runtime.interfaces import TaskError, TaskInterface, takes_keyword
from fedjax_core.runtime.tasks import TaskResultError, run_task


def test_registration_refuses_a_parameter_the_function_lacks_and_accepts_kwargs():
    TI = TaskInterface()
    with pytest.raises(TaskError, match=r"register_fl_task\(optimizer='opt'\) names a parameter the function does "
                                        r"not have; its parameters are \['state', 'data', 'device'\]"):
        @TI.register_fl_task(model="state", data_loader="data", device="device", optimizer="opt")
        def train(state, data, device):
            return {}

    @TI.register_fl_task(model="state", data_loader="data", device="device", optimizer="opt", mesh="mesh")
    def fit(state, data, device, **rest):
        return {}

    assert TI.train_tasks == ["fit"] and TI.validation_tasks == []
    assert takes_keyword(fit, "anything") and TI.accepts("fit", "lr")
    with pytest.raises(TaskError, match="has no task 'train'; registered tasks: fit"):
        TI.get_task("train")


def test_run_task_fills_the_roles_then_add_kwargs_then_the_rounds_kwargs():
    TI = TaskInterface()
    seen = {}

    @TI.add_kwargs(lr=0.1, epochs=2)
    @TI.register_fl_task(model="s", data_loader="d", device="dev", optimizer="o", round_num="rnd",
                         global_model="g", mesh="m")
    def train(s, d, dev, o, rnd, g, m, lr, epochs):
        seen.update(s=s, d=d, dev=dev, o=o, rnd=rnd, g=g, m=m, lr=lr, epochs=epochs)
        return s + 1, {"loss": 0.5}

    @TI.register_fl_task(model="s", data_loader="d", device="dev")
    def validate(s, d, dev):
        return {"acc": 1}

    TI.check()
    after, metrics = run_task(TI, "train", 10, "data", "cpu", "sgd", 3, {"lr": 0.5}, global_state="G", mesh="M")
    assert (after, metrics) == (11, {"loss": 0.5})
    assert seen == dict(s=10, d="data", dev="cpu", o="sgd", rnd=3, g="G", m="M", lr=0.5, epochs=2)
    assert run_task(TI, "validate", 10, "data", "cpu", None, 0) == (10, {"acc": 1.0})  # the state, unchanged


def test_a_contract_without_the_newer_roles_still_runs():
    TI = TaskInterface()

    @TI.register_fl_task(model="s", data_loader="d", device="dev")
    def validate(s, d, dev):
        return {"acc": 1}

    TI.task_contract["validate"] = {"model": "s", "data_loader": "d", "device": "dev", "optimizer": None}
    assert run_task(TI, "validate", 1, "data", "cpu", None, 0) == (1, {"acc": 1.0})


@pytest.mark.parametrize("returned, message", [
    ([1, 2], "task 'validate' returned list; return a dict of metrics"),
    ({"acc": "high"}, "task 'validate' metric 'acc' is str, not a number"),
])
def test_what_a_task_returns_is_checked(returned, message):
    TI = TaskInterface()

    @TI.register_fl_task(model="s", data_loader="d", device="dev")
    def validate(s, d, dev):
        return returned

    with pytest.raises(TaskResultError, match=message):
        run_task(TI, "validate", 1, "data", "cpu", None, 0)


def test_a_task_set_that_cannot_run_a_round_is_refused():
    TI = TaskInterface()
    with pytest.raises(TaskError, match="has no tasks"):
        TI.check()

    @TI.register_fl_task(model="s", data_loader="d", device="dev")
    def validate(s, d, dev):
        return {}

    with pytest.raises(TaskError, match="no training task"):
        TI.check()
    TI.task_settings["train"] = {"lr": 1}
    TI.register_fl_task(model="s", data_loader="d", device="dev", optimizer="o")(lambda s, d, dev, o: {})
    with pytest.raises(TaskError, match="add_kwargs was applied to 'train', which is not a registered task"):
        TI.check()
