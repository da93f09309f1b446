"""Central differential privacy on the director: DP-FedAvg (McMahan et al. 2018) over a round's uploads.

Each participant's update, its change from the round's model over the ``params/`` float leaves, is
clipped to the round's clipping norm C; the clipped updates are averaged *unweighted* (a sample
count would let one site weigh more than C/n); Gaussian noise of standard deviation
``z * C / n`` is added per coordinate (n: the uploads aggregated); the round's target is the
round's model plus that noised average, and the strategy's server step (FedAdam...) takes it
from there. With ``adaptive``, C follows Andrew et al. 2021 from round to round and is kept in
the strategy's state (``privacy/clipping_norm``), so a restarted director goes on with it.

``clip_on="envoy"``: envoys clip before they upload; :func:`upload_check` refuses an upload whose
change is longer than C (float rounding allowed for), and the combiner clips again, which changes
nothing for an honest envoy and bounds a dishonest one.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from fedjax_core.aggregation import Combine, RoundUpdates, TensorSource, Upload, is_param
from fedjax_core.errors import InvalidRequestError
from fedjax_core.privacy import clipping, noise
from fedjax_core.spec import ClipOn, Privacy, PrivacyMode

STATE_KEY = "privacy/clipping_norm"


def count_stddev(privacy: Privacy, per_round: int) -> float:
    """The clipped count's noise: as given, or participants per round / 20 (Flower's default)."""
    return privacy.clipped_count_stddev if privacy.clipped_count_stddev >= 0 else per_round / 20


def update_noise_multiplier(privacy: Privacy, per_round: int) -> float:
    """The updates' noise multiplier: ``noise_multiplier``, less what the clipped count's noise spends when
    adaptive (the two together spend what ``noise_multiplier`` alone would)."""
    if privacy.adaptive:
        return clipping.adaptive_noise_multiplier(privacy.noise_multiplier, count_stddev(privacy, per_round))
    return privacy.noise_multiplier


def clipping_norm_of(privacy: Privacy, state: TensorSource) -> float:
    """This round's clipping norm: the adapted one kept in the strategy's state, else the initial one."""
    if privacy.adaptive and STATE_KEY in state:
        return float(state.read_into(STATE_KEY, 0, np.empty(1, np.float64))[0])
    return privacy.clipping_norm


@dataclasses.dataclass
class CentralRound:
    """One round's clipping and noise; after :meth:`combiner` ran, what it did (for the round's metrics)."""

    privacy: Privacy
    clipping_norm: float
    per_round: int
    summed: int = 0  # the round's one upload is already the mean of this many envoy-clipped updates (secure aggregation)
    rng: np.random.Generator = dataclasses.field(default_factory=noise.fresh_generator)
    noise_std: float = 0.0
    next_clipping_norm: float = 0.0

    def combiner(self, global_model: TensorSource) -> Callable[[RoundUpdates], Combine]:
        """The rule's combiner under DP: the round's model plus the noised mean of the clipped updates."""
        def combiner(updates: RoundUpdates) -> Combine:
            uploads = updates.sorted_uploads()
            leaves = [spec for spec in updates.specs.values() if is_param(spec)]
            if self.summed:  # clipped on the envoys and summed unseen: nothing to clip here
                norms, factors, n = [], [1.0] * len(uploads), self.summed
            else:
                norms = [clipping.update_norm(u.tensors, global_model, leaves) for u in uploads]
                factors = [clipping.clip_factor(norm, self.clipping_norm) for norm in norms]
                n = len(uploads)
            self.noise_std = update_noise_multiplier(self.privacy, self.per_round) * self.clipping_norm / n
            self.next_clipping_norm = self.clipping_norm
            if self.privacy.adaptive:
                self.next_clipping_norm = clipping.adapted_clipping_norm(
                    self.clipping_norm, norms, self.privacy.target_clipped_quantile, self.privacy.clip_norm_lr,
                    float(noise.gaussian(self.rng, count_stddev(self.privacy, self.per_round), 1)[0]))

            def combine(name: str):
                yield from _noised_mean(updates.specs[name], uploads, factors, global_model, self.noise_std,
                                        self.rng, divide_by=len(uploads))
            return combine
        return combiner

    def next_state(self) -> dict[str, np.ndarray]:
        """What the strategy's state keeps for the next round (the adapted clipping norm)."""
        return {STATE_KEY: np.array([self.next_clipping_norm])} if self.privacy.adaptive else {}

    def metrics(self) -> dict[str, float]:
        """What the round may publish: the clipping norm it used and the noise it added (never the raw
        clipped count, which is not private)."""
        return {"clipping_norm": self.clipping_norm, "noise_std": self.noise_std}


def _noised_mean(spec, uploads: list[Upload], factors: list[float], global_model: TensorSource, std: float,
                 rng: np.random.Generator, divide_by: int):
    """``(block, x + mean_k(f_k (u_k - x)) + N(0, std^2))`` over the flattened leaf, in float64."""
    size = math.prod(spec.shape)
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    buffer, x = np.empty(min(clipping.BLOCK, size), dtype), np.empty(min(clipping.BLOCK, size), dtype)
    for start in range(0, size, clipping.BLOCK):
        block = slice(start, min(start + clipping.BLOCK, size))
        width = block.stop - start
        base = global_model.read_into(spec.name, start, x[:width]).astype(np.float64)
        acc = np.zeros(width)
        for u, factor in zip(uploads, factors):
            acc += factor * (u.tensors.read_into(spec.name, start, buffer[:width]).astype(np.float64) - base)
        acc /= divide_by
        acc += noise.gaussian(rng, std, width)
        yield block, base + acc


def upload_check(privacy: Privacy, open_model: Callable[[], TensorSource]) -> Callable[[Upload], None] | None:
    """Under ``clip_on="envoy"``, a check that refuses an upload whose change from the round's model is longer
    than the clipping norm (allowing the rounding of the model's dtype); None otherwise."""
    if privacy.mode != PrivacyMode.CENTRAL or privacy.clip_on != ClipOn.ENVOY:
        return None
    cache: dict[str, float] = {}

    def check(upload: Upload, specs) -> None:
        model = open_model()
        leaves = [spec for spec in specs if is_param(spec)]
        if "model_norm" not in cache:
            cache["model_norm"] = clipping.model_norm(model, leaves)
        eps = max(float(np.finfo(np.dtype(spec.dtype)).eps) if np.dtype(spec.dtype).kind == "f" else 2.0 ** -7
                  for spec in leaves)
        allowed = privacy.clipping_norm * (1 + 1e-6) + eps * (cache["model_norm"] + privacy.clipping_norm)
        norm = clipping.update_norm(upload.tensors, model, leaves)
        if norm > allowed:
            raise InvalidRequestError(
                f"the update of {upload.envoy!r} changes the model by an L2 norm of {norm:.6g}, more than the "
                f"experiment's clipping_norm {privacy.clipping_norm:g} that its envoy must clip to "
                f"(CentralDP(clip_on='envoy')): the upload is refused as a protocol violation")
    return check
