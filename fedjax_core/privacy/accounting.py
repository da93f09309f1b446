"""How much privacy an experiment has spent: epsilon at delta after each round, from Google's dp-accounting.

Central DP: each training round is one Gaussian mechanism of noise multiplier z on the clipped
average, subsampled by the fraction q of the envoys that train in it; the rounds compose. The
platform samples a fixed number of envoys per round, without replacement; the accountant treats
each round as Poisson sampling with q = envoys_per_round / envoys, as DP-FedAvg's analysis
(McMahan et al. 2018) and TensorFlow Privacy do: Renyi-DP bounds for fixed-size sampling hold under
"replace one" neighbours, not the "add or remove one site" neighbours user-level DP needs (see
docs/privacy.md). With every envoy in every round (q = 1) a round is the plain Gaussian mechanism.

Local DP: each upload is a Gaussian mechanism on the envoy's clipped change, its noise calibrated so
that one upload is (epsilon, delta)-DP under this same accountant; a site's uploads compose over the
rounds it trains in (counted as every round: an upper bound under sampling).

The Renyi-DP accountant (``dp_accounting.rdp``) is used throughout: a thousand rounds cost about
0.1 s; results are cached, since the director asks again for every status. dp-accounting (and SciPy under
it, 77 MiB of a process's memory) is imported at the first use: a director without a DP experiment never loads it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math

from typing import TYPE_CHECKING

from fedjax_core.spec import ExperimentSpec, PrivacyMode

# Renyi orders: TensorFlow Privacy's defaults without the fractional ones below 2, whose series the library
# fails to sum for many (q, z) pairs (it logs a warning and skips them); the integer orders decide the bound.
ORDERS = tuple(range(2, 64)) + (80, 96, 128, 192, 256, 384, 512)

if TYPE_CHECKING:
    import dp_accounting


def round_event(noise_multiplier: float, sampling_rate: float) -> dp_accounting.DpEvent:
    """One central-DP round: the Gaussian mechanism, Poisson-subsampled at ``sampling_rate`` when below 1."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if sampling_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=4096)
def epsilon_of(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of :func:`round_event` (inf without noise; 0 before any)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(list(ORDERS))
    accountant.compose(round_event(noise_multiplier, sampling_rate), rounds)
    with _quiet_absl():
        return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def local_noise_multiplier(epsilon: float, delta: float) -> float:
    """The noise multiplier that makes one Gaussian upload (``epsilon``, ``delta``)-DP under the accountant."""
    import dp_accounting
    from dp_accounting import rdp

    def accountant() -> rdp.RdpAccountant:
        return rdp.RdpAccountant(list(ORDERS))

    with _quiet_absl():
        return float(dp_accounting.calibrate_dp_mechanism(
            accountant, dp_accounting.GaussianDpEvent, epsilon, delta,
            dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-6))


def sampling_rate(per_round: int, envoys: int) -> float:
    """The fraction of the experiment's envoys that train in a round (1 when every envoy does)."""
    return 1.0 if envoys <= 0 or per_round >= envoys else per_round / envoys


def experiment_epsilon(spec: ExperimentSpec, rounds: int, rate: float) -> float:
    """The experiment's epsilon at its delta after ``rounds`` training rounds; NaN without DP."""
    p = spec.privacy
    if p.mode == PrivacyMode.CENTRAL:
        return epsilon_of(p.noise_multiplier, rate, rounds, p.delta)
    if p.mode == PrivacyMode.LOCAL:
        return epsilon_of(local_noise_multiplier(p.epsilon, p.delta), 1.0, rounds, p.delta)
    return math.nan


def rounds_within(spec: ExperimentSpec, rate: float) -> int:
    """How many training rounds keep epsilon within ``max_epsilon`` (all of them without a cap)."""
    p = spec.privacy
    if p.mode != PrivacyMode.CENTRAL or not p.max_epsilon:
        return spec.rounds
    low, high = 0, spec.rounds  # epsilon grows with rounds: the largest k with epsilon(k) <= max_epsilon
    while low < high:
        mid = (low + high + 1) // 2
        if experiment_epsilon(spec, mid, rate) <= p.max_epsilon:
            low = mid
        else:
            high = mid - 1
    return low
