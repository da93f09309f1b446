"""Gaussian noise from the operating system's entropy.

Every generator is seeded from ``os.urandom`` (numpy's ``default_rng()`` without a seed), fresh for
each round or upload: no seed exists that a notebook, a log or the spec could carry, so nobody can
replay the noise and subtract it. Floating-point sampling has known side channels (Mironov 2012);
docs/privacy.md says so.
"""
from __future__ import annotations

import numpy as np


def fresh_generator() -> np.random.Generator:
    """A generator seeded from the OS's entropy (never from anything the experiment chose)."""
    return np.random.default_rng()


def gaussian(rng: np.random.Generator, std: float, size: int) -> np.ndarray:
    """``size`` float64 draws of N(0, std^2); zeros when ``std`` is 0."""
    if std <= 0:
        return np.zeros(size)
    return rng.normal(0.0, std, size)
