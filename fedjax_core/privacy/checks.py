"""Refuse, at submission, a privacy setting that cannot keep its promise, with the reason and the fix.

``spec.validate`` calls :func:`check_privacy` for every spec with privacy, in the notebook before it
sends one and in the director when one arrives.
"""
from __future__ import annotations

import math

from fedjax_core.aggregation import weighted_mean
from fedjax_core.privacy import accounting
from fedjax_core.records import OptTreatment
from fedjax_core.spec import ClipOn, ExperimentSpec, Privacy, PrivacyMode, SpecError, SyncMode
from fedjax_core.strategies import strategy_from_wire

MAX_NOISE_MULTIPLIER = 1e6
MAX_CLIPPING_NORM = 1e12


def _number(setting: str, value, low: float, high: float, low_open: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise SpecError(f"{setting} must be a number in {bracket}{low:g}, {high:g}], got {value!r}")


def check_privacy(spec: ExperimentSpec) -> None:
    """Every privacy setting in range, and a combination with the rest of the spec that DP covers."""
    p = spec.privacy
    if p.mode not in tuple(PrivacyMode):
        raise SpecError(f"privacy mode {p.mode!r} is not one of 'central', 'local'")
    who = "CentralDP" if p.mode == PrivacyMode.CENTRAL else "LocalDP"
    _number(f"{who}(clipping_norm)", p.clipping_norm, 0, MAX_CLIPPING_NORM)
    _number(f"{who}(delta)", p.delta, 0, 1)
    if p.delta >= 1:
        raise SpecError(f"{who}(delta={p.delta}) must be below 1 (typically below 1 / the number of sites)")
    if spec.opt_treatment == OptTreatment.CONTINUE_GLOBAL:
        raise SpecError(f"{who} covers the model's params; opt_treatment='CONTINUE_GLOBAL' also uploads and averages "
                        "the optimizer state, unclipped and un-noised: use 'RESET' or 'CONTINUE_LOCAL'")
    if spec.communication.sync != SyncMode.EVERY_ROUND:
        raise SpecError(f"{who} accounts for one noised average per round; sync=Periodic/Dynamic sends divergence "
                        "check-ins that no noise covers: leave sync at its default")
    if p.mode == PrivacyMode.LOCAL:
        _check_local(p)
    else:
        _check_central(spec, p)


def _check_local(p: Privacy) -> None:
    _number("LocalDP(epsilon)", p.epsilon, 0, 1e3)
    for setting in ("noise_multiplier", "adaptive", "max_epsilon"):
        if getattr(p, setting) != getattr(Privacy(), setting):
            raise SpecError(f"LocalDP has no {setting}: it is CentralDP's")


def _check_central(spec: ExperimentSpec, p: Privacy) -> None:
    _number("CentralDP(noise_multiplier)", p.noise_multiplier, 0, MAX_NOISE_MULTIPLIER, low_open=False)
    if p.clip_on not in tuple(ClipOn):
        raise SpecError(f"CentralDP(clip_on={p.clip_on!r}) must be 'director' or 'envoy'")
    if p.epsilon:
        raise SpecError("CentralDP takes noise_multiplier, not epsilon: the accountant reports the epsilon it spends "
                        "(cap it with max_epsilon)")
    if p.max_epsilon:
        _number("CentralDP(max_epsilon)", p.max_epsilon, 0, 1e6)
    strategy = strategy_from_wire(spec.strategy.name, spec.strategy.params)
    if strategy.rule().combiner is not weighted_mean:
        raise SpecError(f"CentralDP replaces the average of the updates with a clipped, noised one; aggregation "
                        f"{strategy.name!r} combines the updates its own way (a robust rule), which DP's bound on "
                        "one site's influence does not cover: use fedavg, fedavgm, fedadam, fedyogi or fedadagrad")
    if p.clip_on == ClipOn.ENVOY and spec.communication.compression:
        raise SpecError(f"CentralDP(clip_on='envoy') with compression={spec.communication.compression!r}: the codec's "
                        "rounding after clipping can lengthen an update past clipping_norm, which the accountant "
                        "does not cover; drop compression, or clip on the director (clip_on='director')")
    if p.adaptive:
        _check_adaptive(p)
    elif (p.target_clipped_quantile, p.clip_norm_lr, p.clipped_count_stddev) != (0.5, 0.2, -1.0):
        raise SpecError("target_clipped_quantile, clip_norm_lr and clipped_count_stddev set adaptive clipping: "
                        "pass adaptive=True too")


def check_privacy_plan(spec: ExperimentSpec, per_round: int, envoys: int) -> None:
    """What only the envoys' number decides: adaptive clipping's default count noise (``per_round`` / 20) and
    the first round's epsilon against ``max_epsilon``."""
    p = spec.privacy
    if p.mode != PrivacyMode.CENTRAL:
        return
    if p.adaptive and p.clipped_count_stddev == -1.0 and p.noise_multiplier > 0 \
            and per_round / 20 <= p.noise_multiplier / 2:
        raise SpecError(f"CentralDP(adaptive=True): the default clipped_count_stddev, participants per round / 20 = "
                        f"{per_round / 20:g}, must exceed noise_multiplier / 2 ({p.noise_multiplier / 2:g}); pass "
                        f"clipped_count_stddev above {p.noise_multiplier / 2:g}")
    if spec.secure.enabled:
        _check_quantisation(spec, per_round)
    if p.max_epsilon:
        rate = accounting.sampling_rate(per_round, envoys)
        first = accounting.experiment_epsilon(spec, 1, rate)
        if first > p.max_epsilon:
            raise SpecError(f"CentralDP(max_epsilon={p.max_epsilon:g}): one round of {per_round} of {envoys} envoys "
                            f"already spends epsilon={first:.4g} at delta={p.delta:g}; raise noise_multiplier or "
                            "max_epsilon")


def _check_quantisation(spec: ExperimentSpec, per_round: int) -> None:
    """Under secure aggregation an envoy's clipped change is quantised: its norm can grow by up to a step per entry,
    step * sqrt(entries) in all, which the noise's sensitivity (clipping_norm) must dwarf."""
    from fedjax_core.aggregation import is_param
    from fedjax_core.personal import personal_names

    personal = set(personal_names([t.name for t in spec.model_spec], spec.personal))  # never summed
    entries = sum(math.prod(t.shape) for t in spec.model_spec if is_param(t) and t.name not in personal) + 1
    step = 2 * spec.secure.clip_range / (((1 << spec.secure.bits) - 1) // max(per_round, 1))
    if step * math.sqrt(entries) > 0.01 * spec.privacy.clipping_norm:
        raise SpecError(f"SecureAggregation(bits={spec.secure.bits}, clip_range={spec.secure.clip_range:g}) quantises "
                        f"{per_round} envoys' updates in steps of {step:.3g}, which can lengthen a clipped update of "
                        f"{entries} entries by up to {step * math.sqrt(entries):.3g}, more than 1% of CentralDP's "
                        f"clipping_norm {spec.privacy.clipping_norm:g}: raise bits or lower clip_range")


def _check_adaptive(p: Privacy) -> None:
    if p.clip_on == ClipOn.ENVOY:
        raise SpecError("CentralDP(adaptive=True, clip_on='envoy') is not supported: adaptive clipping needs every "
                        "update's norm before clipping, which only clip_on='director' gives the director")
    _number("CentralDP(target_clipped_quantile)", p.target_clipped_quantile, 0, 1, low_open=False)
    _number("CentralDP(clip_norm_lr)", p.clip_norm_lr, 0, 10)
    if p.clipped_count_stddev != -1.0:
        _number("CentralDP(clipped_count_stddev)", p.clipped_count_stddev, 0, 1e6, low_open=False)
        if p.noise_multiplier > 0 and p.clipped_count_stddev <= p.noise_multiplier / 2:
            raise SpecError(f"CentralDP(clipped_count_stddev={p.clipped_count_stddev:g}) must exceed noise_multiplier "
                            f"/ 2 ({p.noise_multiplier / 2:g}) for adaptive clipping to keep noise_multiplier's "
                            "guarantee; raise it, or lower noise_multiplier")


def check_secure(spec: ExperimentSpec) -> None:
    """Secure aggregation's settings, and refusals of what needs single updates, which the director never sees."""
    s = spec.secure
    _number("SecureAggregation(threshold)", s.threshold, 0.5, 1, low_open=False)
    _number("SecureAggregation(clip_range)", s.clip_range, 0, 1e9)
    if isinstance(s.bits, bool) or not isinstance(s.bits, int) or not 16 <= s.bits <= 62:
        raise SpecError(f"SecureAggregation(bits={s.bits!r}) must be an integer from 16 to 62")
    why = "secure aggregation gives the director only the sum of a round's updates, never one of them"
    strategy = strategy_from_wire(spec.strategy.name, spec.strategy.params)
    if strategy.rule().combiner is not weighted_mean:
        raise SpecError(f"aggregation {strategy.name!r} looks at each update (a robust rule), but {why}: use fedavg, "
                        "fedavgm, fedadam, fedyogi or fedadagrad")
    if spec.communication.compression:
        raise SpecError(f"compression={spec.communication.compression!r} encodes each update for the wire, but {why} "
                        "and quantises the masked updates itself (bits=): drop compression")
    if spec.communication.sync == SyncMode.DYNAMIC:
        raise SpecError(f"sync=Dynamic compares each envoy's model with the global one at the director, but {why}: "
                        "use Periodic or the default")
    if spec.communication.sync == SyncMode.PERIODIC:
        raise SpecError("sync=Periodic with secure aggregation is not supported: leave sync at its default")
    if spec.opt_treatment == OptTreatment.CONTINUE_GLOBAL:
        raise SpecError(f"opt_treatment='CONTINUE_GLOBAL' averages optimizer state and takes the maximum of step "
                        f"counters, but {why}: use 'RESET' or 'CONTINUE_LOCAL'")
    if spec.privacy.mode == PrivacyMode.CENTRAL and spec.privacy.clip_on != ClipOn.ENVOY:
        raise SpecError("CentralDP clips each update on the director, but " + why + ": pass CentralDP(..., "
                        "clip_on='envoy'), whose clipping happens on the envoys")
    if spec.privacy.adaptive:
        raise SpecError(f"adaptive clipping needs each update's norm, but {why}")
