"""The envoy's clipping and noise before an update leaves, and the director's check that it was applied."""
from __future__ import annotations

import numpy as np
import pytest

from fedjax_core.errors import InvalidRequestError
from fedjax_core.privacy import accounting
from fedjax_core.privacy.local import check_applied, envoy_treatment, privatize
from fedjax_core.runtime.round_runner import check_finite_update
from fedjax_core.spec import ClipOn, Privacy, PrivacyMode


def test_privatize_clips_the_change_as_one_vector_and_adds_noise_of_the_given_std():
    rng = np.random.default_rng(0)
    glob = {"params/k": rng.normal(size=(300, 300)).astype(np.float32),
            "params/b": rng.normal(size=(10_000,)).astype(np.float32), "params/step": np.array(3, np.int32)}
    trained = {"params/k": glob["params/k"] + 0.1, "params/b": glob["params/b"] - 0.2,
               "params/step": np.array(7, np.int32), "opt/mu": np.ones(3, np.float32)}
    names = ["params/b", "params/k", "params/step"]
    clipped = privatize(trained, names, glob, clip_norm=2.0, noise_std=0.0)
    change = np.concatenate([(clipped[n].astype(np.float64) - glob[n]).ravel() for n in ("params/k", "params/b")])
    assert np.linalg.norm(change) == pytest.approx(2.0, rel=1e-4)  # was about 36: clipped, direction kept
    np.testing.assert_allclose(clipped["params/k"] - glob["params/k"], 0.1 * 2.0 / np.sqrt(90_000 * 0.01 + 10_000 * 0.04),
                               rtol=1e-3)
    assert clipped["params/step"] == 7 and clipped["opt/mu"] is trained["opt/mu"]  # only params/ float leaves
    assert clipped["params/k"].dtype == np.float32
    noised = privatize(trained, names, glob, clip_norm=2.0, noise_std=0.05)
    noise = np.concatenate([(noised[n].astype(np.float64) - clipped[n]).ravel() for n in ("params/k", "params/b")])
    assert np.std(noise) == pytest.approx(0.05, rel=0.02)


def test_the_director_says_what_each_envoy_applies_and_refuses_an_upload_that_did_not():
    local = Privacy(mode=PrivacyMode.LOCAL, clipping_norm=1.5, epsilon=2.0, delta=1e-5)
    clip, std = envoy_treatment(local)
    assert clip == 1.5 and std == pytest.approx(1.5 * accounting.local_noise_multiplier(2.0, 1e-5))
    check_applied(local, "a", clip, std)
    with pytest.raises(InvalidRequestError, match=r"'old'.*clip_norm=1\.5.*older than its director.*upgrade"):
        check_applied(local, "old", 0.0, 0.0)
    envoy_clip = Privacy(mode=PrivacyMode.CENTRAL, clipping_norm=3.0, noise_multiplier=1.0, delta=1e-5,
                         clip_on=ClipOn.ENVOY)
    assert envoy_treatment(envoy_clip) == (3.0, 0.0)
    assert envoy_treatment(Privacy(mode=PrivacyMode.CENTRAL, clipping_norm=3.0, noise_multiplier=1.0)) == (0.0, 0.0)
    check_applied(Privacy(), "plain", 0.0, 0.0)


def test_an_update_with_nan_is_not_privatised():
    with pytest.raises(RuntimeError, match="'params/w' holds NaN.*does not upload"):
        check_finite_update({"params/w": np.array([1.0, np.nan])}, ["params/w"])
