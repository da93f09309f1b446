"""The seed tutorial's ``CustomTrainState``: a flax TrainState with named optimizer variables."""
from __future__ import annotations

from typing import Any

from flax import struct
from flax.training import train_state


def _copy_named_fields(target: Any, source: Any, names: tuple[str, ...]) -> Any:
    """``target`` with the NamedTuple fields in ``names`` taken from ``source``, at any depth."""
    if hasattr(target, "_fields") and isinstance(target, tuple):
        picked = {f: getattr(source, f) for f in target._fields if f in names}
        rest = {f: _copy_named_fields(getattr(target, f), getattr(source, f), names)
                for f in target._fields if f not in names}
        return target._replace(**picked, **rest)
    if isinstance(target, (tuple, list)):
        return type(target)(_copy_named_fields(t, s, names) for t, s in zip(target, source))
    return target


class CustomTrainState(train_state.TrainState):
    """TrainState plus ``opt_vars``, the names of the optimizer variables (e.g. ``('trace',)``).

    ``update_state(new_state)`` copies ``new_state``'s params, step and named optimizer
    variables into this object in place, as the seed tutorial's tasks expect; tasks may
    instead return ``(new_state, metrics)``.
    """

    opt_vars: tuple = struct.field(pytree_node=False, default=())

    @classmethod
    def create(cls, *, apply_fn, params, tx, opt_vars=(), **kwargs):
        return super().create(apply_fn=apply_fn, params=params, tx=tx, opt_vars=tuple(opt_vars), **kwargs)

    def update_state(self, new_state: train_state.TrainState) -> None:
        object.__setattr__(self, "params", new_state.params)
        object.__setattr__(self, "step", new_state.step)
        if self.opt_vars:
            opt_state = _copy_named_fields(self.opt_state, new_state.opt_state, tuple(self.opt_vars))
        else:
            opt_state = new_state.opt_state
        object.__setattr__(self, "opt_state", opt_state)
