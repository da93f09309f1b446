"""A FedAvg experiment over 50 simulated envoys on a Dirichlet split, in this one process."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from fedjax_core import DataInterface, FLExperiment, ModelInterface, TaskInterface, partition
from fedjax_core.simulation import SimulatedFederation

rng = np.random.default_rng(0)
x = rng.normal(size=(5_000, 8)).astype(np.float32)
y = (x @ rng.normal(size=(8, 4))).argmax(1).astype(np.int32)  # 4 classes
fed = SimulatedFederation.from_arrays(train=(x[:4_000], y[:4_000]), valid=(x[4_000:], y[4_000:]),
                                      partition=partition.dirichlet(n_envoys=50, alpha=1.0, seed=0))


def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x @ params["w"], y).mean()


@jax.jit
def sgd_step(state, x, y):
    return state.apply_gradients(grads=jax.grad(loss)(state.params, x, y))


class Shard(DataInterface):  # what each envoy's tasks get: its own split, as arrays
    def get_train_loader(self, **kwargs):
        return self.shard_descriptor.get_split("train")

    def get_valid_loader(self, **kwargs):
        return self.shard_descriptor.get_split("valid")


TI = TaskInterface()


@TI.register_fl_task(model="state", data_loader="split", device="device", optimizer="optimizer")
def train(state, split, device, optimizer):
    return sgd_step(state, split["image"], split["label"]), {"loss": float(loss(state.params, split["image"],
                                                                                split["label"]))}


@TI.register_fl_task(model="state", data_loader="split", device="device")
def validate(state, split, device):
    return {"accuracy": float(jnp.mean((split["image"] @ state.params["w"]).argmax(1) == split["label"]))}


state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.zeros((8, 4))}, tx=optax.sgd(0.5))
exp = FLExperiment(federation=fed, experiment_name="sim")
exp.start(model_provider=ModelInterface(model=state), task_keeper=TI, data_loader=Shard(), rounds_to_train=5,
          envoys_per_round=10, sampling_seed=0)
exp.stream_metrics(tensorboard_logs=False, progress=False)  # the same live table as a federation's
status = exp.get_experiment_status()
print(status.state, "participants of round 0:", status.participants[0])
best = exp.get_best_model()
fed.close()
