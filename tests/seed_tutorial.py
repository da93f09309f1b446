"""OpenFL's Flax CIFAR-10 tutorial's own train state and tasks, as that notebook defines them.

``CustomTrainState`` below is the seed's class, word for word (``opt_vars`` a list of strings
and a pytree field, ``update_state`` updating dicts in place); ``create_train_state`` differs
only in calling ``flax.core.unfreeze`` instead of the old flax ``FrozenDict.unfreeze()``."""
from __future__ import annotations

from dataclasses import field

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

from fedjax_core import TaskInterface


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(features=8, kernel_size=(3, 3))(x)), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(features=10)(x)


class CustomTrainState(train_state.TrainState):
    """ Subclass `train_state.Trainstate` and `update_state` method
        to allow update of `model parameters` and `optimizer state`
        during `training` loop execution
    """
    opt_vars : list = field(default_factory=list)

    def update_state(self, new_state: train_state.TrainState) -> None:
        '''
        Update the model states, used during evaluation/inference.
        '''
        # Update Params
        self.params.update(new_state.params)

        # Update Optimizer States
        for var in self.opt_vars:
            opt_var_dict = getattr(self.opt_state[0], var)
            new_opt_var_dict = getattr(new_state.opt_state[0], var)
            opt_var_dict.update(new_opt_var_dict)


def _get_opt_vars(x):
    return False if x.startswith('_') or x in ['index', 'count'] else True


def create_train_state(rng=None, learning_rate=0.01, momentum=0.9):
    """Creates initial `TrainState`."""
    cnn = CNN()
    rng = jax.random.PRNGKey(0) if rng is None else rng
    params = flax.core.unfreeze(cnn.init(rng, jnp.ones([1, 32, 32, 3]))['params'])  # Random Parameters
    tx = optax.sgd(learning_rate, momentum)  # Optimizer
    optvars = list(filter(_get_opt_vars, dir(tx.init(params)[0])))
    return CustomTrainState.create(apply_fn=cnn.apply, params=params, tx=tx, opt_vars=optvars)


@jax.jit
def apply_model(state, images, labels):
    def loss_fn(params):
        logits = state.apply_fn({'params': params}, images)
        loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=jax.nn.one_hot(labels, 10)))
        return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, loss, jnp.mean(jnp.argmax(logits, -1) == labels)


@jax.jit
def update_model(state, grads):
    return state.apply_gradients(grads=grads)


def seed_tasks(batch_size: int = 32) -> TaskInterface:
    """The seed's train (in place, through ``update_state``) and validate tasks."""
    TI = TaskInterface()

    @TI.register_fl_task(model='state', data_loader='dataset', optimizer='optimizer', device='device')
    def train(state, dataset, optimizer, device, loss_fn=None, warmup=False):
        new_state, accs = state, []
        for start in range(0, len(dataset['label']) - batch_size + 1, batch_size):
            grads, _, acc = apply_model(new_state, dataset['image'][start:start + batch_size],
                                        dataset['label'][start:start + batch_size])
            new_state = update_model(new_state, grads)
            accs.append(acc)
        state.update_state(new_state)
        return {'train_acc': float(jnp.mean(jnp.array(accs)))}

    @TI.register_fl_task(model='state', data_loader='dataset', device='device')
    def validate(state, dataset, device):
        _, loss, acc = apply_model(state, dataset['image'], dataset['label'])
        return {'validation_accuracy': float(acc)}

    return TI
