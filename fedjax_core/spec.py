"""The experiment spec: everything the director needs to run an experiment, except the code bundle.

One typed record with nested sections (sampling, deadline, communication, strategy, best model),
checked by one function, :func:`validate`, that the notebook calls before it sends a spec and the
director calls when one arrives. The director then adds the checks only it can make (the
envoys registered, the rounds sized on them: ``director/submission.py``). The proto message
``ExperimentSpec`` maps one to one onto it (``serde.spec_to_proto``); the director's database
keeps it as JSON (:func:`to_json`), and still reads the flat headers older directors wrote.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from fedjax_core.codecs import CODECS
from fedjax_core.errors import InvalidRequestError
from fedjax_core.records import OptTreatment, TensorSpec
from fedjax_core.strategies import strategy_from_wire
from fedjax_core.tensors import check_spec, is_float_dtype

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_ROUNDS = 100_000
MAX_ROUND_TIMEOUT_S = 30 * 24 * 3600.0
MAX_ROUND_CONFIG_CHARS = 1 << 20
MAX_TENSORS = 20_000  # tensors in a model (a large transformer with its optimizer state has a few thousand)
MAX_PARAMS_CHARS = 64 << 10  # the strategy's parameters, JSON
MAX_TEXT_CHARS = 256  # names: best metric, codec, strategy, submitter
MAX_LISTED_ENVOYS = 10_000


class SpecError(InvalidRequestError, ValueError):
    """A spec that cannot run. The message names the setting as ``FLExperiment.start`` calls it, and the fix."""


class SyncMode(StrEnum):
    """When the envoys' models are averaged (``fedjax_core.sync``)."""

    EVERY_ROUND = "every_round"
    PERIODIC = "periodic"  # every ``sync_every`` rounds
    DYNAMIC = "dynamic"  # when an envoy's squared distance from the global model exceeds ``sync_threshold``


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Who trains each round: ``envoys_per_round`` of the experiment's envoys, or that ``fraction`` of them
    (at least 1), drawn with ``seed``; both 0: every envoy."""

    envoys_per_round: int = 0
    fraction: float = 0.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Deadline:
    """When a round closes without everyone: at ``round_timeout_s`` (0: no deadline) with at least
    ``min_envoys`` results (0: every participant)."""

    round_timeout_s: float = 0.0
    min_envoys: int = 0


@dataclasses.dataclass(frozen=True)
class Communication:
    """What travels: the codec of uploads ('' none), deltas instead of weights, compressed downloads, and
    how often models are averaged."""

    compression: str = ""
    send_deltas: bool = False
    compress_downloads: bool = False
    sync: SyncMode = SyncMode.EVERY_ROUND
    sync_every: int = 0  # PERIODIC
    sync_threshold: float = 0.0  # DYNAMIC


@dataclasses.dataclass(frozen=True)
class StrategySpec:
    """The aggregation strategy by its registered name, and its parameters as a JSON object."""

    name: str = "fedavg"
    params: str = "{}"


@dataclasses.dataclass(frozen=True)
class BestModel:
    """The validation metric ('task/metric' or 'metric'; '' the first accuracy-like one) that picks the best model."""

    metric: str = ""
    higher_is_better: bool = True


class PrivacyMode(StrEnum):
    """Who makes an experiment's updates differentially private (``fedjax_core.privacy``)."""

    NONE = ""
    CENTRAL = "central"  # the director clips (or checks the envoys' clipping) and noises the average
    LOCAL = "local"  # each envoy clips and noises its own update before it leaves


class ClipOn(StrEnum):
    DIRECTOR = "director"
    ENVOY = "envoy"


@dataclasses.dataclass(frozen=True)
class Privacy:
    """Differential privacy of the updates, as ``CentralDP``/``LocalDP`` put it (see docs/privacy.md).

    Central: every update's change from the round's model is clipped to ``clipping_norm`` (its initial
    value when ``adaptive``), the clipped changes are averaged unweighted, and Gaussian noise of standard
    deviation ``noise_multiplier * clipping_norm / n`` is added. Local: each envoy clips its change to
    ``clipping_norm`` and adds the Gaussian noise that makes one upload (``epsilon``, ``delta``)-DP.
    """

    mode: PrivacyMode = PrivacyMode.NONE
    clipping_norm: float = 0.0
    noise_multiplier: float = 0.0  # central
    delta: float = 0.0
    epsilon: float = 0.0  # local: one upload's budget
    clip_on: ClipOn = ClipOn.DIRECTOR  # central
    adaptive: bool = False  # central, clip_on=director: Andrew et al. 2021
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float = -1.0  # -1: participants per round / 20 (Flower's default)
    max_epsilon: float = 0.0  # central: stop before the round that would exceed it (0: no cap)

    @property
    def enabled(self) -> bool:
        return self.mode != PrivacyMode.NONE


@dataclasses.dataclass(frozen=True)
class SecureAggregation:
    """SecAgg+ (``fedjax_core/secagg``): the director learns only the sum of each round's updates. ``threshold``: the
    fraction of a participant's neighbours whose shares rebuild its secrets; updates are clipped entrywise to
    ``clip_range`` and quantised into the ring Z_(2^bits)."""

    enabled: bool = False
    threshold: float = 0.5
    clip_range: float = 1.0
    bits: int = 32


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """An experiment as submitted: its name, rounds and model, and how its rounds run."""

    name: str
    rounds: int
    opt_treatment: OptTreatment = OptTreatment.RESET
    model_spec: tuple[TensorSpec, ...] = ()  # the initial model's tensors, by pytree path
    envoys: tuple[str, ...] = ()  # () : every envoy online when it starts
    submitter: str = ""  # the director sets it from the caller's certificate
    bundle_size: int = 0  # bytes of the code bundle that follows the spec
    round_config: str = ""  # JSON list, one {task: {kwarg: value}} per training round; '' for none
    sampling: Sampling = Sampling()
    deadline: Deadline = Deadline()
    communication: Communication = Communication()
    strategy: StrategySpec = StrategySpec()
    best: BestModel = BestModel()
    privacy: Privacy = Privacy()
    secure: SecureAggregation = SecureAggregation()
    # personal layers: pytree path patterns of tensors that never leave the envoys (fedjax_core/personal.py)
    personal: tuple[str, ...] = ()


def check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SpecError(f"{kind} name {name!r} is not valid: use 1-128 letters, digits, '_', '-' or '.', "
                        "starting with a letter or digit")


def validate(spec: ExperimentSpec) -> None:
    """Refuse a spec that cannot run, whoever built it; every message names the setting and the fix."""
    check_name("experiment", spec.name)
    _check_int("rounds_to_train", spec.rounds, 0, MAX_ROUNDS, " (0: validate the given model only)")
    if spec.rounds == 0:
        _check_evaluation_only(spec)
    if spec.opt_treatment not in tuple(OptTreatment):
        raise SpecError(f"opt_treatment {spec.opt_treatment!r} is not one of {', '.join(OptTreatment)}")
    for setting, value in (("best_metric", spec.best.metric), ("compression", spec.communication.compression),
                           ("aggregation", spec.strategy.name), ("submitter", spec.submitter)):
        if len(value) > MAX_TEXT_CHARS:
            raise SpecError(f"{setting} is {len(value)} characters long; at most {MAX_TEXT_CHARS} are allowed")
    _check_model(spec.model_spec)
    _check_envoys(spec.envoys)
    _check_sampling(spec.sampling)
    _check_deadline(spec.deadline)
    _check_communication(spec.communication, spec.rounds, spec.sampling)
    if len(spec.strategy.params) > MAX_PARAMS_CHARS:
        raise SpecError(f"the aggregation's parameters are {len(spec.strategy.params)} characters of JSON; at most "
                        f"{MAX_PARAMS_CHARS} are allowed")
    try:
        strategy_from_wire(spec.strategy.name, spec.strategy.params)
    except InvalidRequestError as exc:
        raise SpecError(str(exc)) from None
    parse_round_config(spec.round_config, spec.rounds)
    _check_personal(spec)
    if spec.privacy.enabled or spec.secure.enabled:
        from fedjax_core.privacy.checks import check_privacy, check_secure  # the privacy package builds on the spec

        if spec.privacy.enabled:
            check_privacy(spec)
        if spec.secure.enabled:
            check_secure(spec)


def _check_evaluation_only(spec: ExperimentSpec) -> None:
    """rounds_to_train=0 validates the given model on every envoy: settings of training have nothing to act on."""
    training = [name for name, used in (
        ("privacy", spec.privacy.enabled), ("secure_aggregation", spec.secure.enabled),
        ("sync", spec.communication.sync != SyncMode.EVERY_ROUND), ("compression", bool(spec.communication.compression)),
        ("send_deltas", spec.communication.send_deltas), ("envoys_per_round", bool(spec.sampling.envoys_per_round
                                                                                  or spec.sampling.fraction)),
        ("personal", bool(spec.personal))) if used]
    if training:
        raise SpecError(f"rounds_to_train=0 only validates the given model on every envoy, so {', '.join(training)} "
                        "would do nothing: leave it out, or train for at least one round")


def _check_personal(spec: ExperimentSpec) -> None:
    """Personal layers (``fedjax_core/personal.py``): valid patterns, each matching a tensor of the model, leaving a
    ``params/`` float tensor shared, and no averaged optimizer state (CONTINUE_GLOBAL)."""
    if not spec.personal:
        return
    from fedjax_core.personal import PatternError, check_patterns

    try:
        check_patterns(spec.personal, [(t.name, is_float_dtype(t.dtype)) for t in spec.model_spec])
    except PatternError as exc:
        raise SpecError(str(exc)) from None
    if spec.opt_treatment == OptTreatment.CONTINUE_GLOBAL:
        raise SpecError("personal layers cannot be combined with opt_treatment='CONTINUE_GLOBAL', which averages the "
                        "optimizer state, the personal tensors' included: use 'CONTINUE_LOCAL' (each envoy keeps its "
                        "own optimizer state) or 'RESET'")


def _check_int(setting: str, value: Any, low: int, high: int, meaning: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SpecError(f"{setting} must be an integer from {low} to {high}{meaning}, got {value!r}")


def _check_model(model_spec: tuple[TensorSpec, ...]) -> None:
    if not model_spec:
        raise SpecError("the model has no tensors")
    if len(model_spec) > MAX_TENSORS:
        raise SpecError(f"the model has {len(model_spec)} tensors; at most {MAX_TENSORS} are allowed: "
                        "concatenate small ones, or keep what need not travel as static fields")
    for tensor in model_spec:
        try:
            check_spec(tensor)
        except InvalidRequestError as exc:
            raise SpecError(f"model_spec: {exc}") from None
        if tensor.encoding is not None:
            raise SpecError(f"model_spec: tensor {tensor.name!r} carries an encoding; the initial model travels "
                            "uncompressed")
    if not any(t.name.startswith("params/") for t in model_spec):
        raise SpecError("the model has no 'params' tensors: pass a flax TrainState as the model")


def _check_envoys(envoys: tuple[str, ...]) -> None:
    if len(envoys) > MAX_LISTED_ENVOYS:
        raise SpecError(f"envoys lists {len(envoys)} names; at most {MAX_LISTED_ENVOYS} are allowed")
    for envoy in envoys:
        check_name("envoy", envoy)
    if len(set(envoys)) != len(envoys):
        raise SpecError(f"envoys lists an envoy twice: {list(envoys)}")


def _check_sampling(s: Sampling) -> None:
    _check_int("envoys_per_round", s.envoys_per_round, 0, MAX_LISTED_ENVOYS, " (0: every envoy)")
    if isinstance(s.fraction, bool) or not isinstance(s.fraction, (int, float)) or not 0 <= s.fraction <= 1:
        raise SpecError(f"envoys_per_round as a fraction must be in (0, 1], got {s.fraction!r}")
    if s.envoys_per_round and s.fraction:
        raise SpecError("give envoys_per_round as a count or as a fraction, not both")
    _check_int("sampling_seed", s.seed, 0, 2**63 - 1)


def _check_deadline(d: Deadline) -> None:
    _check_int("min_envoys", d.min_envoys, 0, MAX_LISTED_ENVOYS, " (0: every participant)")
    t = d.round_timeout_s
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and 0 <= t <= MAX_ROUND_TIMEOUT_S):
        raise SpecError(f"round_timeout_s must be a number of seconds from 0 (no deadline) to "
                        f"{MAX_ROUND_TIMEOUT_S:.0f} (30 days), got {t!r}")


def _check_communication(c: Communication, rounds: int, sampling: Sampling) -> None:
    if c.compression and c.compression not in CODECS:
        raise SpecError(f"compression={c.compression!r} is not a codec: use None, {', '.join(map(repr, CODECS))}")
    if c.compress_downloads and not c.compression:
        raise SpecError("compress_downloads=True needs a codec: pass compression='fp16', 'bf16' or 'int8' too")
    if c.sync not in tuple(SyncMode):
        raise SpecError(f"sync {c.sync!r} is not one of {', '.join(SyncMode)}")
    if c.sync == SyncMode.PERIODIC and not (isinstance(c.sync_every, int) and 1 <= c.sync_every <= rounds):
        raise SpecError(f"Periodic(every={c.sync_every}) must be between 1 and rounds_to_train ({rounds})")
    if c.sync == SyncMode.DYNAMIC and not (isinstance(c.sync_threshold, (int, float))
                                           and math.isfinite(c.sync_threshold) and c.sync_threshold > 0):
        raise SpecError(f"Dynamic(delta_threshold={c.sync_threshold}) must be a finite number > 0")
    if c.sync != SyncMode.EVERY_ROUND and (sampling.envoys_per_round or sampling.fraction):
        raise SpecError("sync=Periodic/Dynamic averages models every envoy keeps training: it cannot be combined "
                        "with envoys_per_round (drop one of the two)")


def parse_round_config(text: str, rounds: int) -> tuple[str, ...]:
    """Per training round, the JSON of ``{task: {kwarg: value}}``; () when there is no round_config (every
    round's is "": nothing held per round)."""
    if not text:
        return ()
    if len(text) > MAX_ROUND_CONFIG_CHARS:
        raise SpecError(f"round_config is {len(text)} characters of JSON; at most {MAX_ROUND_CONFIG_CHARS} are allowed")
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        raise SpecError("round_config is not valid JSON (or nests too deeply)") from None
    if not isinstance(config, list) or len(config) != rounds:
        raise SpecError(f"round_config must list one entry per training round ({rounds}), "
                        f"got {len(config) if isinstance(config, list) else type(config).__name__}")
    out = []
    for round_, entry in enumerate(config):
        if not isinstance(entry, dict) or not all(isinstance(v, dict) for v in entry.values()):
            raise SpecError(f"round_config for round {round_} must map task names to {{kwarg: value}} dicts, "
                            f"got {json.dumps(entry)[:200]}")
        out.append(json.dumps(entry, sort_keys=True) if entry else "")
    return tuple(out)


# ------------------------------------------------------------------ stored form
def to_json(spec: ExperimentSpec) -> str:
    return json.dumps(dataclasses.asdict(spec))


def from_json(text: str) -> ExperimentSpec:
    """A spec from :func:`to_json`'s text, or from the flat header JSON that directors before the spec wrote."""
    return from_dict(json.loads(text))


def from_dict(d: Mapping[str, Any]) -> ExperimentSpec:
    if "sampling" not in d:
        return from_flat(d)
    return ExperimentSpec(
        name=d["name"], rounds=d["rounds"], opt_treatment=OptTreatment(d["opt_treatment"]),
        model_spec=_tensor_specs(d["model_spec"]), envoys=tuple(d["envoys"]), submitter=d["submitter"],
        bundle_size=d["bundle_size"], round_config=d["round_config"], sampling=Sampling(**d["sampling"]),
        deadline=Deadline(**d["deadline"]),
        communication=Communication(**{**d["communication"], "sync": SyncMode(d["communication"]["sync"])}),
        strategy=StrategySpec(**d["strategy"]), best=BestModel(**d["best"]),
        privacy=privacy_from_dict(d.get("privacy") or {}),
        secure=SecureAggregation(**(d.get("secure") or {})),
        personal=tuple(d.get("personal") or ()),
    )


def privacy_from_dict(d: Mapping[str, Any]) -> Privacy:
    """The privacy section as stored (specs stored before privacy existed have none)."""
    if not d:
        return Privacy()
    return Privacy(**{**d, "mode": enum_of(PrivacyMode, d.get("mode", ""), "privacy"),
                      "clip_on": enum_of(ClipOn, d.get("clip_on") or ClipOn.DIRECTOR, "clip_on")})


def from_flat(d: Mapping[str, Any]) -> ExperimentSpec:
    """A spec from the flat header of directors and notebooks before the spec (the database's old rows, the
    legacy ``ExperimentHeader`` message); a missing key takes the default it had then."""
    return ExperimentSpec(
        name=d["name"], rounds=d["rounds"], opt_treatment=enum_of(OptTreatment, d["opt_treatment"], "opt_treatment"),
        model_spec=_tensor_specs(d.get("model_spec", ())), envoys=tuple(d.get("envoys", ())),
        submitter=d.get("submitter", ""), bundle_size=d.get("bundle_size", 0),
        round_config=d.get("round_config", ""),
        sampling=Sampling(d.get("envoys_per_round", 0), d.get("envoys_fraction", 0.0), d.get("sampling_seed", 0)),
        deadline=Deadline(d.get("round_timeout_s", 0.0), d.get("min_envoys", 0)),
        communication=Communication(d.get("compression", ""), d.get("send_deltas", False),
                                    d.get("compress_downloads", False),
                                    enum_of(SyncMode, d.get("sync") or SyncMode.EVERY_ROUND, "sync"),
                                    d.get("sync_every", 0), d.get("sync_threshold", 0.0)),
        strategy=StrategySpec(d.get("aggregation") or "fedavg", d.get("aggregation_params") or "{}"),
        best=BestModel(d.get("best_metric", ""), d.get("best_higher_is_better", True)),
    )


def enum_of(kind: type[StrEnum], value: str, setting: str):
    """``kind(value)``, or a SpecError naming the setting and the values it takes."""
    try:
        return kind(value)
    except ValueError:
        raise SpecError(f"{setting} {value!r} is not one of {', '.join(kind)}") from None


def _tensor_specs(items) -> tuple[TensorSpec, ...]:
    return tuple(s if isinstance(s, TensorSpec) else TensorSpec(s["name"], s["dtype"], tuple(s["shape"]))
                 for s in items)
