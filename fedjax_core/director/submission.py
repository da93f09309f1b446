"""Checks of a submitted experiment header, and the round plan the director derives from it.

Everything here is a pure function of the header and the registry, so a bad submission is
refused before anything is stored, and a queued one is checked again when it starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Collection, Sequence

from fedjax_core import records as r
from fedjax_core.codecs import CODECS
from fedjax_core.director.rules import participants_per_round, round_size_floor
from fedjax_core.errors import InvalidRequestError
from fedjax_core.strategies import Strategy, strategy_from_wire
from fedjax_core.tensors import check_spec

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_ROUND_TIMEOUT_S = 30 * 24 * 3600.0
MAX_ROUND_CONFIG_CHARS = 1 << 20
MAX_ROUNDS = 100_000
MAX_TENSORS = 20_000  # tensors in a model (a large transformer with its optimizer state has a few thousand)
MAX_PARAMS_CHARS = 64 << 10  # aggregation_params, JSON
MAX_TEXT_CHARS = 256  # best_metric, compression, sync, aggregation: names
MAX_LISTED_ENVOYS = 10_000


def check_name(kind: str, name: str) -> None:
    if not NAME.fullmatch(name or ""):
        raise InvalidRequestError(
            f"{kind} name {name!r} is not valid: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """How the experiment's rounds run on a given set of envoys."""

    strategy: Strategy
    per_round: int  # participants sampled each training round
    round_kwargs: tuple[str, ...]  # per training round: JSON {task: {kwarg: value}}, or ""


def check_header(h: r.ExperimentHeader, registered: Collection[str]) -> None:
    """Refuse a header that cannot run; every message names the setting and the fix.

    The rounds are sized on the envoys the header names or, when it names none, on every registered
    envoy: one that too few online envoys could run waits in the queue for more (it is sized again on
    the online ones when it starts), one that even every registered envoy cannot run is refused."""
    check_name("experiment", h.name)  # name clashes are the store's UNIQUE constraint's to report
    if not 1 <= h.rounds <= MAX_ROUNDS:
        raise InvalidRequestError(f"rounds_to_train must be between 1 and {MAX_ROUNDS}, got {h.rounds}")
    for field in ("best_metric", "aggregation", "compression", "sync", "opt_treatment", "submitter"):
        value = getattr(h, field)
        if len(value) > MAX_TEXT_CHARS:
            raise InvalidRequestError(f"{field} is {len(value)} characters long; at most {MAX_TEXT_CHARS} are allowed")
    if len(h.aggregation_params) > MAX_PARAMS_CHARS:
        raise InvalidRequestError(f"aggregation_params is {len(h.aggregation_params)} characters of JSON; at most "
                                  f"{MAX_PARAMS_CHARS} are allowed")
    if len(h.model_spec) > MAX_TENSORS:
        raise InvalidRequestError(f"the model has {len(h.model_spec)} tensors; at most {MAX_TENSORS} are allowed: "
                                  "concatenate small ones, or keep what need not travel as static fields")
    if len(h.envoys) > MAX_LISTED_ENVOYS:
        raise InvalidRequestError(f"envoys lists {len(h.envoys)} names; at most {MAX_LISTED_ENVOYS} are allowed")
    if h.opt_treatment not in r.OPT_TREATMENTS:
        raise InvalidRequestError(
            f"opt_treatment {h.opt_treatment!r} is not one of {', '.join(r.OPT_TREATMENTS)}")
    if not h.model_spec:
        raise InvalidRequestError("the model has no tensors")
    for spec in h.model_spec:
        check_spec(spec)
        if spec.encoding is not None:
            raise InvalidRequestError(f"model_spec: tensor {spec.name!r} carries an encoding; the initial model "
                                      "travels uncompressed")
    if not any(s.name.startswith("params/") for s in h.model_spec):
        raise InvalidRequestError("the model has no 'params' tensors: pass a flax TrainState as the model")
    for envoy in h.envoys:
        check_name("envoy", envoy)
        if envoy not in registered:
            raise InvalidRequestError(f"envoys: no envoy named {envoy!r} has registered; "
                                      f"registered envoys: {', '.join(sorted(registered)) or 'none'}")
    if len(set(h.envoys)) != len(h.envoys):
        raise InvalidRequestError(f"envoys lists an envoy twice: {list(h.envoys)}")
    if h.min_envoys < 0:
        raise InvalidRequestError(f"min_envoys must be >= 0 (0: every participant), got {h.min_envoys}")
    if not (math.isfinite(h.round_timeout_s) and 0 <= h.round_timeout_s <= MAX_ROUND_TIMEOUT_S):
        raise InvalidRequestError(f"round_timeout_s must be between 0 (no deadline) and {MAX_ROUND_TIMEOUT_S:g} "
                                  f"seconds, got {h.round_timeout_s}")
    if h.envoys_per_round < 0:
        raise InvalidRequestError(f"envoys_per_round must be >= 1 (0: every envoy), got {h.envoys_per_round}")
    if not (math.isfinite(h.envoys_fraction) and 0 <= h.envoys_fraction <= 1):
        raise InvalidRequestError(f"envoys_per_round as a fraction must be in (0, 1], got {h.envoys_fraction}")
    if h.envoys_per_round and h.envoys_fraction:
        raise InvalidRequestError("give envoys_per_round as a count or as a fraction, not both")
    check_communication(h)
    plan_rounds(h, h.envoys or tuple(sorted(registered)))


def check_communication(h: r.ExperimentHeader) -> None:
    """Compression and sync settings: known codecs and modes, with the parameters each needs."""
    if h.compression and h.compression not in CODECS:
        raise InvalidRequestError(f"compression {h.compression!r} is not a codec; use one of {', '.join(CODECS)} "
                                  "or none")
    if h.compress_downloads and not h.compression:
        raise InvalidRequestError("compress_downloads needs a codec: set compression too")
    if h.sync not in ("", "periodic", "dynamic"):
        raise InvalidRequestError(f"sync {h.sync!r} is not one of periodic, dynamic (or empty: every round)")
    if h.sync == "periodic" and not 1 <= h.sync_every <= h.rounds:
        raise InvalidRequestError(f"Periodic(every={h.sync_every}) must be between 1 and rounds_to_train "
                                  f"({h.rounds})")
    if h.sync == "dynamic" and not (math.isfinite(h.sync_threshold) and h.sync_threshold > 0):
        raise InvalidRequestError(f"Dynamic(delta_threshold={h.sync_threshold}) must be a finite number > 0")
    if h.sync and (h.envoys_per_round or h.envoys_fraction):
        raise InvalidRequestError(f"sync={h.sync} cannot be combined with envoys_per_round: every envoy keeps "
                                  "training its own model between averagings")


def plan_rounds(h: r.ExperimentHeader, envoys: Sequence[str]) -> RoundPlan:
    """The round plan on ``envoys`` (the experiment's, or the online ones when it names none)."""
    strategy = strategy_from_wire(h.aggregation, h.aggregation_params)
    round_kwargs = parse_round_config(h.round_config, h.rounds)
    if not envoys:  # nothing to size against yet: checked again when the experiment starts
        return RoundPlan(strategy=strategy, per_round=0, round_kwargs=round_kwargs)
    per_round = participants_per_round(h, len(envoys))
    if per_round > len(envoys):
        raise InvalidRequestError(f"envoys_per_round={per_round}, but the experiment has {len(envoys)} envoys "
                                  f"({', '.join(envoys)}): lower it or wait for more envoys")
    if h.min_envoys > per_round:
        raise InvalidRequestError(f"min_envoys={h.min_envoys} is more than the {per_round} envoys that take part "
                                  "in each round: lower min_envoys or raise envoys_per_round")
    strategy.check_round_size(round_size_floor(h, per_round))
    return RoundPlan(strategy=strategy, per_round=per_round, round_kwargs=round_kwargs)


def parse_round_config(text: str, rounds: int) -> tuple[str, ...]:
    """Per training round, the JSON of ``{task: {kwarg: value}}``; () when there is no round_config (every
    round's is "": nothing held per round)."""
    if not text:
        return ()
    if len(text) > MAX_ROUND_CONFIG_CHARS:
        raise InvalidRequestError(f"round_config is {len(text)} characters of JSON; at most {MAX_ROUND_CONFIG_CHARS} "
                                  "are allowed")
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidRequestError("round_config is not valid JSON (or nests too deeply)") from None
    if not isinstance(config, list) or len(config) != rounds:
        raise InvalidRequestError(f"round_config must list one entry per training round ({rounds}), "
                                  f"got {len(config) if isinstance(config, list) else type(config).__name__}")
    out = []
    for round_, entry in enumerate(config):
        if not isinstance(entry, dict) or not all(isinstance(v, dict) for v in entry.values()):
            raise InvalidRequestError(f"round_config for round {round_} must map task names to "
                                      f"{{kwarg: value}} dicts, got {json.dumps(entry)[:200]}")
        out.append(json.dumps(entry, sort_keys=True) if entry else "")
    return tuple(out)
