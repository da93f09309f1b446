"""Central DP on the director's closing path (closer.write_next_model over in-memory round models), against
numpy: the clipped unweighted mean, the noise's statistics, adaptive clipping's norm trajectory, and the check
of envoy-side clipping."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedjax_core.aggregation import ArraySource, RoundUpdates, Upload
from fedjax_core.director import closer
from fedjax_core.director.round_models import MemoryRoundModels
from fedjax_core.errors import InvalidRequestError
from fedjax_core.privacy import central
from fedjax_core.spec import ClipOn, Privacy, PrivacyMode
from fedjax_core.strategies import FedAvg

SHAPES = {"params/dense/kernel": (300, 300), "params/dense/bias": (10_000,)}  # 100,000 parameters


def model(rng, scale=1.0) -> dict[str, np.ndarray]:
    return {name: (rng.normal(size=shape) * scale).astype(np.float32) for name, shape in SHAPES.items()}


def central_privacy(**kwargs) -> Privacy:
    return Privacy(**{"mode": PrivacyMode.CENTRAL, "delta": 1e-5, **kwargs})


def close_round(models, round_, uploads, privacy, weights=None, per_round=None):
    """Close ``round_`` of experiment 'e' with ``uploads`` (name -> arrays) as the director does."""
    specs = list(models.model("e", round_).specs)
    updates = RoundUpdates(specs)
    for i, (envoy, arrays) in enumerate(sorted(uploads.items())):
        updates.add(Upload(envoy, (weights or {}).get(envoy, 100.0 + i), ArraySource(arrays)))
    metrics = closer.write_next_model(models, "e", round_, FedAvg(), updates, privacy, per_round or len(uploads))
    return {k: v.copy() for k, v in _arrays(models.model("e", round_ + 1)).items()}, metrics


def _arrays(source) -> dict[str, np.ndarray]:
    out = {}
    for spec in source.specs:
        flat = np.empty(math.prod(spec.shape), spec.dtype)
        out[spec.name] = source.read_into(spec.name, 0, flat).reshape(spec.shape)
    return out


def start(x) -> MemoryRoundModels:
    models = MemoryRoundModels()
    with models.model_writer("e", 0) as writer:
        for name, array in x.items():
            writer.add_array(name, array)
        writer.commit()
    return models


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[n], np.float64).ravel() for n in sorted(arrays)])


def test_the_round_is_the_unweighted_mean_of_updates_clipped_to_c():
    rng = np.random.default_rng(0)
    x = model(rng)
    scales = {"a": 0.001, "b": 0.01, "c": 0.05, "d": 0.2}  # norms about 0.3, 3, 16, 63: some under C, some over
    uploads = {e: {n: x[n] + (rng.normal(size=x[n].shape) * s).astype(np.float32) for n in x}
               for e, s in scales.items()}
    C = 5.0
    got, metrics = close_round(start(x), 0, uploads, central_privacy(clipping_norm=C, noise_multiplier=0.0),
                               weights={"a": 1.0, "b": 1000.0, "c": 7.0, "d": 50.0})  # weights are ignored
    deltas = [flat(u) - flat(x) for u in uploads.values()]
    norms = [np.linalg.norm(d) for d in deltas]
    assert min(norms) < C < max(norms)
    want = flat(x) + np.mean([d * min(1.0, C / n) for d, n in zip(deltas, norms)], axis=0)
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)
    assert metrics == {"clipping_norm": C, "noise_std": 0.0}


def test_the_noise_has_standard_deviation_z_c_over_n_on_a_100k_parameter_model():
    rng = np.random.default_rng(1)
    x = model(rng)
    n, z, C = 4, 1.3, 2.0
    uploads = {f"e{i}": {k: v.copy() for k, v in x.items()} for i in range(n)}  # no change: the output is noise
    got, metrics = close_round(start(x), 0, uploads, central_privacy(clipping_norm=C, noise_multiplier=z))
    noise = flat(got) - flat(x)
    assert noise.size == 100_000
    assert metrics["noise_std"] == pytest.approx(z * C / n)
    assert np.std(noise) == pytest.approx(z * C / n, rel=0.02)
    assert abs(np.mean(noise)) < 5 * z * C / n / math.sqrt(noise.size)
    again, _ = close_round(start(x), 0, uploads, central_privacy(clipping_norm=C, noise_multiplier=z))
    assert not np.allclose(flat(again), flat(got))  # fresh entropy each time: nothing replays the noise


def test_adaptive_clipping_follows_andrew_et_als_update_round_after_round():
    """noise_multiplier 0 and no count noise make the trajectory deterministic: C_{t+1} = C_t exp(-lr (b_t - gamma)),
    b_t the fraction of updates with norm <= C_t; C is carried in the strategy's state from round to round."""
    rng = np.random.default_rng(2)
    x = model(rng, 0.1)
    privacy = central_privacy(clipping_norm=0.5, noise_multiplier=0.0, adaptive=True, target_clipped_quantile=0.3,
                              clip_norm_lr=0.4, clipped_count_stddev=0.0)
    models = start(x)
    C, current, seen = 0.5, x, []
    for round_ in range(6):
        scales = rng.uniform(0.0005, 0.01, size=5)
        uploads = {f"e{i}": {n: current[n] + (rng.normal(size=current[n].shape) * s).astype(np.float32)
                             for n in current} for i, s in enumerate(scales)}
        norms = [np.linalg.norm(flat(u) - flat(current)) for u in uploads.values()]
        deltas = [flat(u) - flat(current) for u in uploads.values()]
        want = flat(current) + np.mean([d * min(1.0, C / nm) for d, nm in zip(deltas, norms)], axis=0)
        current, metrics = close_round(models, round_, uploads, privacy)
        np.testing.assert_allclose(flat(current), want, rtol=1e-5, atol=1e-6)
        assert metrics["clipping_norm"] == pytest.approx(C, rel=1e-12)
        seen.append(C)
        unclipped = np.mean([nm <= C for nm in norms])
        C = C * math.exp(-0.4 * (unclipped - 0.3))
    assert len(set(np.round(seen, 9))) > 3  # the norm moved


def test_adaptive_noise_multiplier_splits_z_between_updates_and_the_count():
    p = central_privacy(clipping_norm=1.0, noise_multiplier=1.0, adaptive=True, clipped_count_stddev=2.0)
    z_update = central.update_noise_multiplier(p, per_round=10)
    assert (z_update ** -2 + (2 * 2.0) ** -2) ** -0.5 == pytest.approx(1.0)
    assert central.count_stddev(central_privacy(clipping_norm=1.0, adaptive=True), 40) == 2.0  # Flower's m / 20


def test_envoy_side_clipping_is_checked_when_an_upload_arrives():
    rng = np.random.default_rng(3)
    x = model(rng)
    privacy = central_privacy(clipping_norm=1.0, noise_multiplier=1.0, clip_on=ClipOn.ENVOY)
    specs = list(ArraySource(x).specs)
    updates = RoundUpdates(specs, central.upload_check(privacy, lambda: ArraySource(x)))

    def shifted(norm):
        d = {n: rng.normal(size=a.shape) for n, a in x.items()}
        scale = norm / np.linalg.norm(flat(d))
        return {n: (x[n] + d[n] * scale).astype(np.float32) for n in x}

    updates.add(Upload("honest", 10.0, ArraySource(shifted(0.999))))
    with pytest.raises(InvalidRequestError, match=r"'greedy'.*L2 norm of 1\.5.*clipping_norm 1 .*protocol violation"):
        updates.add(Upload("greedy", 10.0, ArraySource(shifted(1.5))))
    assert [u.envoy for u in updates.uploads] == ["honest"]
    assert central.upload_check(central_privacy(clipping_norm=1.0, noise_multiplier=1.0), lambda: None) is None
