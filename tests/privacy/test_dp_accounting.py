"""The privacy accountant against dp-accounting's own computations of the same events."""
from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedjax_core.privacy import accounting
from fedjax_core.records import TensorSpec
from fedjax_core.spec import ExperimentSpec, Privacy, PrivacyMode


def spec(rounds=100, **privacy) -> ExperimentSpec:
    return ExperimentSpec(name="dp", rounds=rounds, model_spec=(TensorSpec("params/w", "float32", (2,)),),
                          privacy=Privacy(**{"delta": 1e-5, "clipping_norm": 1.0, **privacy}))


@pytest.mark.parametrize("z, q, rounds", [(1.0, 0.1, 50), (0.8, 1.0, 10), (2.5, 0.01, 40), (1.1, 0.5, 1)])
def test_central_epsilon_is_dp_accountings_for_the_same_rounds(z, q, rounds):
    """Composed round by round as events of the library, with the same Renyi orders."""
    want = rdp.RdpAccountant(list(accounting.ORDERS))
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    want.compose(dp_accounting.ComposedDpEvent([event] * rounds))
    got = accounting.experiment_epsilon(spec(mode=PrivacyMode.CENTRAL, noise_multiplier=z), rounds, q)
    assert got == pytest.approx(want.get_epsilon(1e-5), rel=1e-9)


def test_the_renyi_bound_is_above_the_tight_pld_epsilon_and_not_far_off():
    event = dp_accounting.GaussianDpEvent(1.0)
    tight = pld.PLDAccountant()
    tight.compose(event, 10)
    got = accounting.experiment_epsilon(spec(mode=PrivacyMode.CENTRAL, noise_multiplier=1.0), 10, 1.0)
    assert tight.get_epsilon(1e-5) <= got * 1.001 and got <= 1.5 * tight.get_epsilon(1e-5)


def test_epsilon_grows_with_rounds_and_sampling_and_is_infinite_without_noise():
    s = spec(mode=PrivacyMode.CENTRAL, noise_multiplier=1.0)
    assert accounting.experiment_epsilon(s, 0, 0.1) == 0.0
    assert accounting.experiment_epsilon(s, 10, 0.1) < accounting.experiment_epsilon(s, 20, 0.1)
    assert accounting.experiment_epsilon(s, 10, 0.1) < accounting.experiment_epsilon(s, 10, 0.2)
    assert accounting.experiment_epsilon(spec(mode=PrivacyMode.CENTRAL), 3, 0.1) == math.inf
    assert math.isnan(accounting.experiment_epsilon(spec(), 3, 0.1))


def test_local_noise_makes_one_upload_epsilon_delta_dp_and_composes_over_rounds():
    z = accounting.local_noise_multiplier(2.0, 1e-5)
    one = rdp.RdpAccountant(list(accounting.ORDERS))
    one.compose(dp_accounting.GaussianDpEvent(z))
    assert one.get_epsilon(1e-5) == pytest.approx(2.0, rel=1e-4)
    assert z >= dp_accounting.get_sigma_gaussian(2.0, 1e-5)  # no less noise than the tight analytic Gaussian
    s = spec(mode=PrivacyMode.LOCAL, epsilon=2.0)
    five = rdp.RdpAccountant(list(accounting.ORDERS))
    five.compose(dp_accounting.GaussianDpEvent(z), 5)
    assert accounting.experiment_epsilon(s, 5, 0.3) == pytest.approx(five.get_epsilon(1e-5), rel=1e-9)


def test_max_epsilon_keeps_the_rounds_whose_epsilon_stays_within_it():
    s = spec(rounds=200, mode=PrivacyMode.CENTRAL, noise_multiplier=1.0, max_epsilon=4.0)
    k = accounting.rounds_within(s, 0.1)
    assert 0 < k < 200
    assert accounting.experiment_epsilon(s, k, 0.1) <= 4.0 < accounting.experiment_epsilon(s, k + 1, 0.1)
    assert accounting.rounds_within(spec(rounds=7, mode=PrivacyMode.CENTRAL, noise_multiplier=1.0), 0.1) == 7
