"""The strategy's part of closing a round: model_{r+1} and state_{r+1} written from model_r, state_r and the
round's updates, through :mod:`fedjax_core.aggregation` (the engine) and the strategy's rule. Models and
states are read and written through :class:`~fedjax_core.director.round_models.RoundModels`: the director's
files, or memory in the simulation, to the same values.

The new model goes to its file leaf by leaf, block by block, as the rule computes it: it is never
whole in memory; tensors that do not travel are copied from model_r block by block. The strategy's
state (zeros at round 0, ``server_state_round_NNNN.fjm`` beside the model after that) is read block
by block and the new one is written once the model is. Both files are written atomically, so a
director killed in between closes the round again to the same bytes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedjax_core.aggregation import ArraySource, NextState, RoundUpdates, TensorSource, init_state, stepper
from fedjax_core.director.round_models import ModelWriter, RoundModels
from fedjax_core.errors import PreconditionError
from fedjax_core.privacy import central
from fedjax_core.records import TensorSpec
from fedjax_core.spec import Privacy, PrivacyMode
from fedjax_core.strategies import Strategy


def write_next_model(models: RoundModels, experiment: str, round_: int, strategy: Strategy,
                     updates: RoundUpdates, privacy: Privacy = Privacy(), per_round: int = 0,
                     summed: int = 0) -> dict[str, float]:
    """model_{r+1} and state_{r+1} of `experiment` from model_r, state_r and the round's updates; under central
    DP (``privacy``, with ``per_round`` participants expected), what the round's clipping and noise were.
    ``summed``: the one update is the secure sum of that many envoys' (clipped) updates."""
    previous = models.model(experiment, round_)
    state = _state(models, experiment, round_, strategy, updates)
    dp = None
    if privacy.mode == PrivacyMode.CENTRAL:
        dp = central.CentralRound(privacy, central.clipping_norm_of(privacy, state), per_round, summed=summed)
    leaf = stepper(strategy, state, previous, updates, combiner=dp.combiner(previous) if dp else None)
    new_state = NextState()
    with models.model_writer(experiment, round_ + 1) as writer:
        for spec in previous.specs:
            if spec.name in updates.specs:  # written block by block as the strategy computes it
                writer.add_blocks(spec.name, spec.dtype, spec.shape, new_state.tee(spec, leaf(spec.name)))
            else:  # tensors that do not travel keep their initial values
                writer.copy_tensor(previous, spec.name)
        writer.commit()
    _write_state(models.state_writer(experiment, round_ + 1), {**new_state.arrays, **(dp.next_state() if dp else {})})
    return dp.metrics() if dp else {}


def write_initial_state(models: RoundModels, experiment: str, round_: int, strategy: Strategy,
                        specs: Sequence[TensorSpec]) -> None:
    """state_{round_} = the strategy's initial state (a round that did not average still starts the state)."""
    _write_state(models.state_writer(experiment, round_), init_state(strategy, specs))


def _state(models: RoundModels, experiment: str, round_: int, strategy: Strategy,
           updates: RoundUpdates) -> TensorSource:
    """The strategy's state at the start of ``round_``."""
    if round_ == 0:
        return ArraySource(init_state(strategy, list(updates.specs.values())))
    found = models.state(experiment, round_)
    if found is not None:
        return found
    if not strategy.stateful:  # stateless (and runs begun before state files existed)
        return ArraySource({})
    raise PreconditionError(f"the strategy state of round {round_} is missing "
                            f"({models.state_location(experiment, round_)})")


def _write_state(writer: ModelWriter, state: Mapping[str, np.ndarray]) -> None:
    with writer:
        for key, array in state.items():
            writer.add_array(key, np.asarray(array))
        writer.commit()
