"""OpenFL's tutorial notebook, with its own ``CustomTrainState`` (``opt_vars`` a pytree list of strings),
runs here with the imports changed, and the model pulled back keeps its class and jits (its tensors:
tests/runtime/test_model_tensors.py)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fedjax_core import FLExperiment, ModelInterface
from fedjax_core import records as r
from fedjax_core.runtime.model_tensors import state_to_tensors
from fl_experiment import SubsetDataset
from processes import Stack
from seed_tutorial import CustomTrainState, apply_model, create_train_state, seed_tasks


def test_the_seeds_train_state_trains_in_a_real_federation(tmp_path):
    stack = Stack(tmp_path)
    try:
        stack.start()
        exp = FLExperiment(federation=stack.federation(), experiment_name="seed_state")
        exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=seed_tasks(),
                  data_loader=SubsetDataset(limit=64), rounds_to_train=2, opt_treatment="CONTINUE_GLOBAL",
                  device_assignment_policy="CPU_ONLY")
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        assert exp.get_experiment_status().state == "finished", stack.logs()
        trained = {e.envoy for e in exp.history if e.stage == r.Stage.TRAIN and e.envoy}
        assert trained == {"env1", "env2"}
        last = exp.get_last_model()
        assert isinstance(last, CustomTrainState) and last.opt_vars == ["trace"]
        apply_model(last, np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int32))  # jits, as in the notebook
        start = state_to_tensors(create_train_state())
        assert not np.array_equal(np.asarray(last.params["Dense_0"]["kernel"]), start["params/Dense_0/kernel"])
        assert float(jnp.abs(last.opt_state[0].trace["Dense_0"]["kernel"]).sum()) > 0  # momentum came back
    finally:
        stack.stop()
