"""Clipping of model updates by their L2 norm, and adaptive clipping's norm update (pure numpy).

An update is the change of a participant's ``params/`` float leaves from the round's model, taken
as one vector (Flower's FlatClip; McMahan et al. 2018). Clipping scales it by ``min(1, C / norm)``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedjax_core.aggregation import TensorSource
from fedjax_core.records import TensorSpec

BLOCK = 1 << 16  # elements read at a time


def _dtype(spec: TensorSpec) -> np.dtype:
    return np.dtype(spec.dtype).newbyteorder("<")


def update_norm(upload: TensorSource, global_model: TensorSource, leaves: Iterable[TensorSpec]) -> float:
    """``||upload - global||_2`` over ``leaves`` together, in float64, read block by block."""
    total = 0.0
    for spec in leaves:
        size = math.prod(spec.shape)
        u, x = np.empty(min(BLOCK, size), _dtype(spec)), np.empty(min(BLOCK, size), _dtype(spec))
        for start in range(0, size, BLOCK):
            n = min(BLOCK, size - start)
            d = (upload.read_into(spec.name, start, u[:n]).astype(np.float64)
                 - global_model.read_into(spec.name, start, x[:n]).astype(np.float64))
            total += float(np.dot(d, d))
    return math.sqrt(total)


def model_norm(model: TensorSource, leaves: Iterable[TensorSpec]) -> float:
    """``||model||_2`` over ``leaves`` together, in float64."""
    total = 0.0
    for spec in leaves:
        for _, values in model.blocks(spec.name, BLOCK):
            v = values.astype(np.float64)
            total += float(np.dot(v, v))
    return math.sqrt(total)


def clip_factor(norm: float, clipping_norm: float) -> float:
    """The scale that clips an update of L2 norm ``norm`` to ``clipping_norm``: ``min(1, C / norm)``."""
    return 1.0 if norm <= clipping_norm else clipping_norm / norm


def clip_arrays(delta: Mapping[str, np.ndarray], clipping_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``delta`` (float64 arrays) clipped together to ``clipping_norm``, and its norm before clipping."""
    norm = math.sqrt(sum(float(np.vdot(d, d)) for d in delta.values()))
    factor = clip_factor(norm, clipping_norm)
    return {name: d * factor for name, d in delta.items()}, norm


def adaptive_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The noise multiplier of the updates when the clipped count is noised too (Andrew et al. 2021,
    Theorem 1): ``(z^-2 - (2 sigma_b)^-2)^-1/2``, so that the pair spends what one Gaussian of ``z`` does."""
    if noise_multiplier <= 0:
        return 0.0
    if clipped_count_stddev <= noise_multiplier / 2:
        raise ValueError(f"clipped_count_stddev={clipped_count_stddev} must exceed noise_multiplier / 2 "
                         f"({noise_multiplier / 2}) for adaptive clipping to keep noise_multiplier's guarantee")
    return (noise_multiplier ** -2 - (2 * clipped_count_stddev) ** -2) ** -0.5


def adapted_clipping_norm(clipping_norm: float, norms: Iterable[float], target_quantile: float, lr: float,
                          count_noise: float) -> float:
    """Andrew et al. 2021's geometric update: ``C * exp(-lr * (b - target_quantile))``, where ``b`` is the
    fraction of updates whose norm was at most ``C`` (not clipped), estimated privately: each bit is centred
    (``bit - 1/2``, so that one site moves the sum by 1/2, the sensitivity the noise split of
    :func:`adaptive_noise_multiplier` assumes), the centred sum is noised by ``count_noise`` (one draw of
    N(0, sigma_b^2)), and ``b = sum / n + 1/2``. With ``target_quantile`` 0.5, C tracks the median update norm."""
    norms = list(norms)
    centred = sum(1.0 if n <= clipping_norm else 0.0 for n in norms) - len(norms) / 2 + count_noise
    return clipping_norm * math.exp(-lr * (centred / len(norms) + 0.5 - target_quantile))
