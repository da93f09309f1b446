"""What only the director can check of an experiment spec, and the round plan it derives from it.

:func:`fedjax_core.spec.validate` checks the spec itself (the notebook ran it before sending);
here it is run again on arrival, then checked against the registry: the envoys it names, and
its rounds sized on them. Everything is a pure function of the spec and the registry, so a bad
submission is refused before anything is stored, and a queued one is checked again when it starts.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from fedjax_core.director.rules import participants_per_round, round_size_floor
from fedjax_core.errors import InvalidRequestError
from fedjax_core.privacy.checks import check_privacy_plan
from fedjax_core.spec import ExperimentSpec, parse_round_config, validate
from fedjax_core.strategies import Strategy, strategy_from_wire


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """How the experiment's rounds run on a given set of envoys."""

    strategy: Strategy
    per_round: int  # participants sampled each training round
    round_kwargs: tuple[str, ...]  # per training round: JSON {task: {kwarg: value}}, or ""


def check_submission(spec: ExperimentSpec, registered: Collection[str]) -> None:
    """Refuse a spec that cannot run; every message names the setting and the fix.

    The rounds are sized on the envoys the spec names or, when it names none, on every registered
    envoy: one that too few online envoys could run waits in the queue for more (it is sized again on
    the online ones when it starts), one that even every registered envoy cannot run is refused."""
    validate(spec)  # name clashes are the store's UNIQUE constraint's to report
    for envoy in spec.envoys:
        if envoy not in registered:
            raise InvalidRequestError(f"envoys: no envoy named {envoy!r} has registered; "
                                      f"registered envoys: {', '.join(sorted(registered)) or 'none'}")
    plan_rounds(spec, spec.envoys or tuple(sorted(registered)))


def plan_rounds(spec: ExperimentSpec, envoys: Sequence[str]) -> RoundPlan:
    """The round plan on ``envoys`` (the experiment's, or the online ones when it names none)."""
    strategy = strategy_from_wire(spec.strategy.name, spec.strategy.params)
    round_kwargs = parse_round_config(spec.round_config, spec.rounds)
    if not envoys:  # nothing to size against yet: checked again when the experiment starts
        return RoundPlan(strategy=strategy, per_round=0, round_kwargs=round_kwargs)
    per_round = participants_per_round(spec, len(envoys))
    if per_round > len(envoys):
        raise InvalidRequestError(f"envoys_per_round={per_round}, but the experiment has {len(envoys)} envoys "
                                  f"({', '.join(envoys)}): lower it or wait for more envoys")
    if spec.deadline.min_envoys > per_round:
        raise InvalidRequestError(f"min_envoys={spec.deadline.min_envoys} is more than the {per_round} envoys that "
                                  "take part in each round: lower min_envoys or raise envoys_per_round")
    strategy.check_round_size(round_size_floor(spec, per_round))
    if spec.privacy.enabled:
        check_privacy_plan(spec, per_round, len(envoys))
    return RoundPlan(strategy=strategy, per_round=per_round, round_kwargs=round_kwargs)
