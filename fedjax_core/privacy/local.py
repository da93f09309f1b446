"""The envoy's part of differential privacy: clip its update (and noise it, under local DP) before it leaves.

The director's task says what to apply (``Task.clip_norm``, ``Task.noise_std``, from the experiment's
spec: :func:`envoy_treatment`); the worker applies it to the change of its ``params/`` float leaves
from the round's model, as one vector, and says in the upload's header what it applied, which the
director checks (:func:`check_applied`): an envoy whose worker applies nothing (an older
fedjax-core) is refused rather than trusted with un-noised updates.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedjax_core.errors import InvalidRequestError
from fedjax_core.privacy import accounting, clipping, noise
from fedjax_core.spec import ClipOn, Privacy, PrivacyMode
from fedjax_core.aggregation import is_param_leaf


def envoy_treatment(privacy: Privacy) -> tuple[float, float]:
    """``(clip_norm, noise_std)`` every envoy applies to its update (0: nothing)."""
    if privacy.mode == PrivacyMode.LOCAL:
        return privacy.clipping_norm, accounting.local_noise_multiplier(privacy.epsilon, privacy.delta) * \
            privacy.clipping_norm
    if privacy.mode == PrivacyMode.CENTRAL and privacy.clip_on == ClipOn.ENVOY:
        return privacy.clipping_norm, 0.0
    return 0.0, 0.0


def check_applied(privacy: Privacy, envoy: str, clip_norm: float, noise_std: float) -> None:
    """Refuse an upload whose worker did not apply the experiment's clipping and noise."""
    want_clip, want_noise = envoy_treatment(privacy)
    if not (math.isclose(clip_norm, want_clip, rel_tol=1e-9) and math.isclose(noise_std, want_noise, rel_tol=1e-9)):
        raise InvalidRequestError(
            f"the update of {envoy!r} says its worker clipped to {clip_norm:g} and added noise of std {noise_std:g}, "
            f"but the experiment's {privacy.mode} differential privacy needs clip_norm={want_clip:g}, "
            f"noise_std={want_noise:g}: the envoy's fedjax-core is older than its director's or was altered; "
            "upgrade the envoy")


def privatize(tensors: Mapping[str, np.ndarray], names: Iterable[str], global_tensors: Mapping[str, np.ndarray],
              clip_norm: float, noise_std: float, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """``tensors`` with the ``params/`` float leaves among ``names`` replaced by ``global + clip(delta) + noise``:
    their change from ``global_tensors`` clipped to ``clip_norm`` as one vector, then Gaussian noise of
    ``noise_std`` per coordinate (drawn from the OS's entropy unless ``rng`` is given), in each leaf's dtype."""
    leaves = [n for n in names if is_param_leaf(n, np.asarray(tensors[n]).dtype)]
    delta = {n: np.asarray(tensors[n], np.float64) - np.asarray(global_tensors[n], np.float64) for n in leaves}
    clipped, _ = clipping.clip_arrays(delta, clip_norm)
    rng = rng or noise.fresh_generator()
    out = dict(tensors)
    for n in leaves:
        base = np.asarray(global_tensors[n], np.float64)
        noised = clipped[n] + noise.gaussian(rng, noise_std, clipped[n].size).reshape(clipped[n].shape)
        out[n] = (base + noised).astype(np.asarray(tensors[n]).dtype)
    return out
