"""The experiment bundle: readable header, opaque payload, version checks before unpickling."""
import pytest

from fedjax_core import bundle


def test_pack_and_read_round_trip(tmp_path):
    path = tmp_path / "bundle.bin"
    path.write_bytes(bundle.pack({"experiment": "e", "device_assignment_policy": "CPU_ONLY"}, b"\x80payload"))
    read = bundle.read(path)
    assert read.payload == b"\x80payload"
    assert read.meta["experiment"] == "e"
    assert read.meta["versions"] == bundle.environment_versions()


def test_not_a_bundle(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello")
    with pytest.raises(bundle.BundleError, match="not an experiment bundle"):
        bundle.read(path)


def test_same_environment_passes_without_warnings():
    assert bundle.check_versions({"versions": bundle.environment_versions()}) == []


def test_python_minor_mismatch_is_refused_naming_both_versions():
    ours = bundle.environment_versions()
    theirs = {**ours, "python": "3.1.0"}
    with pytest.raises(bundle.BundleError, match=rf"Python 3.1.0 in the notebook vs {ours['python']} on this envoy"):
        bundle.check_versions({"versions": theirs})


def test_cloudpickle_major_mismatch_is_refused_other_packages_only_warn():
    ours = bundle.environment_versions()
    with pytest.raises(bundle.BundleError, match=rf"cloudpickle 1.0.0 in the notebook vs {ours['cloudpickle']}"):
        bundle.check_versions({"versions": {**ours, "cloudpickle": "1.0.0"}})
    warnings = bundle.check_versions({"versions": {**ours, "flax": "0.0.1"}})
    assert warnings == [f"flax 0.0.1 in the notebook vs {ours['flax']} on this envoy"]
