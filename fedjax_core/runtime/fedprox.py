"""FedProx (Li et al. 2020): a proximal term that keeps local training near the round's global model."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def fedprox_term(params: Any, global_params: Any, mu: float) -> jax.Array:
    """``mu / 2 * ||params - global_params||²`` summed over every leaf; add it to the task's loss.

    Register the task with ``global_model="global_state"`` and pass ``global_state.params``.
    ``mu = 0`` is plain local training (FedAvg).
    """
    squares = jax.tree_util.tree_map(lambda p, g: jnp.sum(jnp.square(p - jax.lax.stop_gradient(g))),
                                     params, global_params)
    return 0.5 * mu * sum(jax.tree_util.tree_leaves(squares))
