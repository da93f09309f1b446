"""What secure aggregation cannot do without single updates is refused at submission, saying why."""
from __future__ import annotations

import dataclasses

import pytest

from fedjax_core.privacy import CentralDP, LocalDP, SecureAggregation
from fedjax_core.privacy.settings import privacy_to_spec, secure_to_spec
from fedjax_core.records import OptTreatment, TensorSpec
from fedjax_core.spec import Communication, ExperimentSpec, SpecError, StrategySpec, SyncMode, validate

MODEL = (TensorSpec("params/w", "float32", (4, 3)),)


def spec(secure=SecureAggregation(), privacy=None, **kwargs) -> ExperimentSpec:
    return ExperimentSpec(name="sa", rounds=3, model_spec=MODEL, secure=secure_to_spec(secure),
                          privacy=privacy_to_spec(privacy), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": StrategySpec("krum")}, r"'krum' looks at each update.*never one of them"),
    ({"strategy": StrategySpec("fedtrimmedavg")}, r"robust rule"),
    ({"communication": Communication(compression="int8")}, r"quantises the masked updates itself"),
    ({"communication": Communication(sync=SyncMode.DYNAMIC, sync_threshold=1.0)}, r"sync=Dynamic compares"),
    ({"opt_treatment": OptTreatment.CONTINUE_GLOBAL}, r"averages optimizer state"),
    ({"privacy": CentralDP(noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)}, r"clip_on='envoy'"),
    ({"secure": SecureAggregation(threshold=0.3)}, r"threshold\) must be a number in \[0.5, 1\]"),
    ({"secure": SecureAggregation(bits=64)}, r"bits=64\) must be an integer from 16 to 62"),
    ({"secure": SecureAggregation(clip_range=0.0)}, r"clip_range\) must be a number in \(0"),
])
def test_refusals(kwargs, message):
    with pytest.raises(SpecError, match=message):
        validate(spec(**kwargs))


def test_what_composes_passes():
    validate(spec(privacy=CentralDP(noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5, clip_on="envoy")))
    validate(spec(privacy=LocalDP(clipping_norm=1.0, epsilon=1.0, delta=1e-5)))
    validate(spec(strategy=StrategySpec("fedadam", '{"eta": 0.1}'), opt_treatment=OptTreatment.CONTINUE_LOCAL))
    validate(spec(communication=Communication(compress_downloads=False)))
    with pytest.raises(TypeError, match="SecureAggregation\\(...\\), got dict"):
        secure_to_spec({"threshold": 0.5})
    assert dataclasses.asdict(secure_to_spec(None))["enabled"] is False


def test_quantisation_that_could_lengthen_a_clipped_update_past_1_percent_of_c_is_refused_on_the_plan():
    from fedjax_core.director.submission import plan_rounds

    big = (TensorSpec("params/w", "float32", (1000, 1000)),)
    dp = CentralDP(noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5, clip_on="envoy")
    coarse = dataclasses.replace(spec(SecureAggregation(bits=16, clip_range=0.5), privacy=dp), model_spec=big)
    validate(coarse)
    with pytest.raises(SpecError, match=r"bits=16.*more than 1% of CentralDP's clipping_norm 1: raise bits"):
        plan_rounds(coarse, [f"e{i}" for i in range(50)])
    plan_rounds(dataclasses.replace(coarse, secure=dataclasses.replace(coarse.secure, bits=40)),
                [f"e{i}" for i in range(50)])
