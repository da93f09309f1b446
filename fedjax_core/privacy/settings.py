"""What a notebook passes as ``FLExperiment.start(privacy=...)``: :class:`CentralDP` or :class:`LocalDP`.

Both are frozen dataclasses that become the spec's privacy section (:meth:`to_spec`); the spec's
checks (``fedjax_core/privacy/checks.py``) run when the experiment starts, in the notebook and
again in the director, with messages that name the setting.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from fedjax_core import spec as experiment_spec
from fedjax_core.spec import ClipOn, Privacy, PrivacyMode


@dataclasses.dataclass(frozen=True)
class CentralDP:
    """DP-FedAvg: the director clips each update's change to ``clipping_norm`` (or checks the envoys' clipping,
    ``clip_on="envoy"``), averages the clipped changes unweighted and adds Gaussian noise of standard deviation
    ``noise_multiplier * clipping_norm / participants``. The experiment's epsilon at ``delta`` is reported
    after every round; with ``max_epsilon`` training stops before the round that would exceed it.

    ``adaptive=True`` (Andrew et al. 2021): ``clipping_norm`` is the initial norm; each round it moves by
    ``exp(-clip_norm_lr * (unclipped fraction - target_clipped_quantile))``, the unclipped count noised
    with ``clipped_count_stddev`` (None: participants per round / 20, as Flower's).
    """

    noise_multiplier: float
    clipping_norm: float
    delta: float
    clip_on: Literal["director", "envoy"] = "director"
    adaptive: bool = False
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    max_epsilon: float | None = None

    def to_spec(self) -> Privacy:
        return Privacy(mode=PrivacyMode.CENTRAL, clipping_norm=self.clipping_norm,
                       noise_multiplier=self.noise_multiplier, delta=self.delta,
                       clip_on=_clip_on(self.clip_on), adaptive=self.adaptive,
                       target_clipped_quantile=self.target_clipped_quantile, clip_norm_lr=self.clip_norm_lr,
                       clipped_count_stddev=-1.0 if self.clipped_count_stddev is None else self.clipped_count_stddev,
                       max_epsilon=self.max_epsilon or 0.0)


@dataclasses.dataclass(frozen=True)
class LocalDP:
    """Each envoy clips its update's change to ``clipping_norm`` and adds the Gaussian noise that makes one
    upload (``epsilon``, ``delta``)-DP before it leaves (Flower's ``LocalDpMod``): the director never sees an
    update without its noise. The status reports epsilon composed over the rounds trained."""

    clipping_norm: float
    epsilon: float
    delta: float

    def to_spec(self) -> Privacy:
        return Privacy(mode=PrivacyMode.LOCAL, clipping_norm=self.clipping_norm, epsilon=self.epsilon,
                       delta=self.delta)


def _clip_on(value: str) -> ClipOn:
    try:
        return ClipOn(value)
    except ValueError:
        from fedjax_core.spec import SpecError

        raise SpecError(f"CentralDP(clip_on={value!r}) must be 'director' or 'envoy'") from None


def privacy_to_spec(privacy: CentralDP | LocalDP | None) -> Privacy:
    """The spec's privacy section for ``FLExperiment.start(privacy=...)``."""
    if privacy is None:
        return Privacy()
    if isinstance(privacy, (CentralDP, LocalDP)):
        return privacy.to_spec()
    raise TypeError(f"privacy must be fedjax_core.privacy.CentralDP(...) or LocalDP(...), got {type(privacy).__name__}")


@dataclasses.dataclass(frozen=True)
class SecureAggregation:
    """SecAgg+ (Bell et al. 2020): each round's participants mask their updates so that the director can unmask
    only their sum. ``threshold``: the fraction of a participant's neighbours that must stay to rebuild its masks
    (at least 0.5); up to ``1 - threshold`` of them may drop after the key sharing. Each entry of an update
    (multiplied by the envoy's share of the round's weight) is clipped to ``clip_range`` and quantised into the
    ring Z_(2^bits); the sum's error per entry is below ``participants * 2 * clip_range / ((2^bits - 1) //
    participants)`` (docs/privacy.md)."""

    threshold: float = 0.5
    clip_range: float = 1.0
    bits: int = 32

    def to_spec(self) -> experiment_spec.SecureAggregation:
        return experiment_spec.SecureAggregation(True, self.threshold, self.clip_range, self.bits)


def secure_to_spec(secure: SecureAggregation | None) -> experiment_spec.SecureAggregation:
    """The spec's secure aggregation section for ``FLExperiment.start(secure_aggregation=...)``."""
    if secure is None:
        return experiment_spec.SecureAggregation()
    if isinstance(secure, SecureAggregation):
        return secure.to_spec()
    raise TypeError(f"secure_aggregation must be fedjax_core.privacy.SecureAggregation(...), got {type(secure).__name__}")
