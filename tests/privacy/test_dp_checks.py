"""Privacy settings that cannot keep their promise are refused at submission, saying why and what to do."""
from __future__ import annotations

import dataclasses

import pytest

from fedjax_core.director.submission import plan_rounds
from fedjax_core.privacy import CentralDP, LocalDP
from fedjax_core.privacy.settings import privacy_to_spec
from fedjax_core.records import OptTreatment, TensorSpec
from fedjax_core.spec import (Communication, ExperimentSpec, Sampling, SpecError, StrategySpec, SyncMode,
                              validate)

MODEL = (TensorSpec("params/w", "float32", (4, 3)), TensorSpec("opt/mu", "float32", (4, 3)))


def spec(privacy, **kwargs) -> ExperimentSpec:
    return ExperimentSpec(name="dp", rounds=5, model_spec=MODEL, privacy=privacy_to_spec(privacy), **kwargs)


CENTRAL = CentralDP(noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)


@pytest.mark.parametrize("privacy, kwargs, message", [
    (CENTRAL, {"strategy": StrategySpec("krum", '{"num_malicious_clients": 1}')}, r"'krum' combines the updates its own way"),
    (CENTRAL, {"strategy": StrategySpec("fedmedian")}, r"robust rule.*use fedavg"),
    (CENTRAL, {"opt_treatment": OptTreatment.CONTINUE_GLOBAL}, r"optimizer state, unclipped and un-noised"),
    (LocalDP(clipping_norm=1.0, epsilon=1.0, delta=1e-5), {"opt_treatment": OptTreatment.CONTINUE_GLOBAL},
     r"LocalDP covers the model's params"),
    (CENTRAL, {"communication": Communication(sync=SyncMode.PERIODIC, sync_every=2)}, r"check-ins that no noise"),
    (dataclasses.replace(CENTRAL, clip_on="envoy"), {"communication": Communication(compression="int8")},
     r"rounding after clipping.*clip_on='director'"),
    (dataclasses.replace(CENTRAL, adaptive=True, clip_on="envoy"), {}, r"adaptive=True, clip_on='envoy'.*not supported"),
    (dataclasses.replace(CENTRAL, adaptive=True, clipped_count_stddev=0.4), {}, r"must exceed noise_multiplier / 2"),
    (dataclasses.replace(CENTRAL, target_clipped_quantile=0.7), {}, r"pass adaptive=True too"),
    (dataclasses.replace(CENTRAL, clipping_norm=0.0), {}, r"CentralDP\(clipping_norm\) must be a number in \(0"),
    (dataclasses.replace(CENTRAL, delta=1.0), {}, r"delta=1.0\) must be below 1"),
    (dataclasses.replace(CENTRAL, noise_multiplier=float("nan")), {}, r"noise_multiplier\) must be a number"),
    (LocalDP(clipping_norm=1.0, epsilon=0.0, delta=1e-5), {}, r"LocalDP\(epsilon\) must be a number in \(0"),
])
def test_refusals_name_the_setting_and_the_fix(privacy, kwargs, message):
    with pytest.raises(SpecError, match=message):
        validate(spec(privacy, **kwargs))


def test_what_needs_the_envoys_is_checked_on_the_round_plan():
    adaptive = spec(dataclasses.replace(CENTRAL, adaptive=True))  # count noise 10 / 20 = 0.5, not above z / 2
    validate(adaptive)
    with pytest.raises(SpecError, match=r"participants per round / 20 = 0\.5, must exceed.*pass clipped_count_stddev"):
        plan_rounds(adaptive, [f"e{i}" for i in range(10)])
    plan_rounds(adaptive, [f"e{i}" for i in range(30)])
    capped = spec(dataclasses.replace(CENTRAL, max_epsilon=1.0), sampling=Sampling(envoys_per_round=5))
    with pytest.raises(SpecError, match=r"max_epsilon=1\): one round of 5 of 10 envoys already spends epsilon=\d"):
        plan_rounds(capped, [f"e{i}" for i in range(10)])
    plan_rounds(dataclasses.replace(capped, privacy=dataclasses.replace(capped.privacy, max_epsilon=10.0)),
                [f"e{i}" for i in range(10)])


def test_a_privacy_argument_of_the_wrong_kind_is_a_type_error():
    with pytest.raises(TypeError, match="CentralDP\\(...\\) or LocalDP\\(...\\), got dict"):
        privacy_to_spec({"noise_multiplier": 1.0})
    with pytest.raises(SpecError, match="clip_on='both'"):
        privacy_to_spec(dataclasses.replace(CENTRAL, clip_on="both"))


def test_fine_combinations_pass():
    validate(spec(CENTRAL, strategy=StrategySpec("fedadam", '{"eta": 0.1}')))
    validate(spec(LocalDP(clipping_norm=1.0, epsilon=1.0, delta=1e-5), strategy=StrategySpec("fedmedian")))
    validate(spec(dataclasses.replace(CENTRAL, clip_on="envoy")))
    validate(spec(CENTRAL, communication=Communication(compression="int8", send_deltas=True)))
