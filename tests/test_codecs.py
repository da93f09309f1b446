"""Codecs: each round trip within the bound the module states, deltas, and int8's hard cases."""
import numpy as np
import pytest

from fedjax_core import codecs
from fedjax_core.records import Encoding, TensorChunk
from fedjax_core.tensors import BFLOAT16, TensorError, assemble, check_spec, iter_chunks
from fedjax_core.model_file import ModelFile, ModelFileWriter

RNG = np.random.default_rng(0)
KERNEL = (RNG.standard_normal((3, 3, 16, 32)) * np.logspace(-3, 0, 32)).astype(np.float32)  # channels differ


def roundtrip(array, codec, reference=None):
    wire, encoding = codecs.encode("w", array, codec, reference)
    return wire, encoding, codecs.decode(wire, encoding, reference)


def test_fp16_roundtrip_within_relative_bound():
    x = RNG.standard_normal(10_000).astype(np.float32) * 10
    wire, enc, back = roundtrip(x, "fp16")
    assert wire.dtype == np.float16 and enc.codec == "fp16" and back.dtype == np.float32
    normal = np.abs(x) >= 2**-14
    err = np.abs(back.astype(np.float64) - x)
    assert np.all(err[normal] <= np.abs(x[normal]) * 2**-11)
    assert np.all(err[~normal] <= 2**-25)


def test_fp16_out_of_range_tensor_travels_uncompressed():
    x = np.array([1.0, 1e6], np.float32)
    wire, enc, back = roundtrip(x, "fp16")
    assert enc is None and wire.dtype == np.float32 and np.array_equal(back, x)


def test_bf16_roundtrip_within_relative_bound():
    x = (RNG.standard_normal(10_000) * 1e3).astype(np.float32)
    wire, enc, back = roundtrip(x, "bf16")
    assert wire.dtype == BFLOAT16 and enc.codec == "bf16"
    assert np.all(np.abs(back.astype(np.float64) - x) <= np.abs(x) * 2**-8)


@pytest.mark.parametrize("array", [KERNEL, RNG.standard_normal(1000).astype(np.float32)], ids=["kernel", "vector"])
def test_int8_roundtrip_within_half_a_scale(array):
    wire, enc, back = roundtrip(array, "int8")
    assert wire.dtype == np.int8 and wire.shape == array.shape
    channels = array.shape[-1] if array.ndim >= 2 else 1
    assert len(enc.scale) == len(enc.zero_point) == channels
    # the stated bound, recomputed here from the data: (max(hi,0) - min(lo,0)) / 255 / 2 per channel
    flat = array.astype(np.float64).reshape(-1, channels)
    bound = (np.maximum(flat.max(0), 0) - np.minimum(flat.min(0), 0)) / 255 / 2
    err = np.abs(back.astype(np.float64) - array).reshape(-1, channels)
    assert np.all(err <= bound * (1 + 1e-6) + np.abs(flat) * 2**-24)


def test_int8_per_channel_keeps_small_channels():
    _, _, back = roundtrip(KERNEL, "int8")
    small = KERNEL[..., 0]  # the channel a thousand times smaller than the largest
    assert np.abs(back[..., 0] - small).max() < np.abs(small).max() / 100


def test_int8_constant_tensor_decodes_to_the_constant():
    x = np.full((4, 5), 0.731, np.float32)
    _, _, back = roundtrip(x, "int8")
    np.testing.assert_allclose(back, x, rtol=1e-6)


def test_int8_zeros_decode_exactly():
    x = np.zeros((8, 3), np.float32)
    _, enc, back = roundtrip(x, "int8")
    assert np.array_equal(back, x) and all(s > 0 for s in enc.scale)


def test_int8_one_huge_outlier_is_kept_and_the_rest_stay_within_the_bound():
    x = RNG.standard_normal(1000).astype(np.float32) * 0.01
    x[17] = 1e4
    _, enc, back = roundtrip(x, "int8")
    scale = enc.scale[0]
    assert scale == pytest.approx((1e4 - min(x.min(), 0)) / 255)
    assert abs(back[17] - 1e4) <= scale / 2
    assert np.all(np.abs(back - x) <= scale / 2 * (1 + 1e-6))


def test_int8_empty_tensor():
    x = np.zeros((0, 4), np.float32)
    wire, enc, back = roundtrip(x, "int8")
    assert wire.shape == (0, 4) and back.shape == (0, 4)
    check_spec(iter_chunks({"w": wire}, encodings={"w": enc}).__next__().spec)


def test_uncompressed_deltas_reconstruct_exactly():
    reference = RNG.standard_normal(10_000).astype(np.float32)
    trained = reference + (RNG.standard_normal(10_000) * 0.05).astype(np.float32)  # a training step's change
    wire, enc, back = roundtrip(trained, None, reference)
    assert enc == Encoding("none", "float32", delta=True)
    assert not np.array_equal(wire, trained)  # the change travels, not the weights
    assert np.array_equal(back, trained)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_compressed_deltas_err_by_the_codec_bound_of_the_change(codec):
    reference = RNG.standard_normal(5000).astype(np.float32)
    change = (RNG.standard_normal(5000) * 0.01).astype(np.float32)
    _, enc, back = roundtrip(reference + change, codec, reference)
    assert enc.delta
    err = np.abs(back.astype(np.float64) - (reference + change))
    assert err.max() < np.abs(change).max() * 0.01 + 1e-6  # tiny next to the change, let alone the weights


def test_integer_tensors_are_never_encoded():
    x = np.arange(10, dtype=np.int32)
    wire, enc = codecs.encode("step", x, "int8", np.zeros(10, np.int32))
    assert enc is None and wire is x


def test_non_finite_values_are_refused_naming_the_tensor():
    with pytest.raises(TensorError, match="'w'.*NaN"):
        codecs.encode("w", np.array([1.0, np.nan], np.float32), "int8")


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        codecs.encode("w", np.ones(3, np.float32), "zip")


@pytest.mark.parametrize("encoding, match", [
    (Encoding("int8", "float32", scale=(1.0,), zero_point=(0,)), "needs 32 scale"),
    (Encoding("int8", "float32", scale=(float("nan"),) * 32, zero_point=(0,) * 32), "finite and positive"),
    (Encoding("int8", "float32", scale=(1.0,) * 32, zero_point=(300,) * 32), r"\[-128, 127\]"),
    (Encoding("fp16", "float32"), "travels as float16"),
    (Encoding("gzip", "float32"), "unknown codec"),
    (Encoding("none", "float32"), "uncompressed deltas"),
    (Encoding("int8", "int32", scale=(1.0,) * 32, zero_point=(0,) * 32), "only float tensors"),
])
def test_bad_encodings_are_refused(encoding, match):
    wire = np.zeros((2, 32), np.int8)
    spec = next(iter_chunks({"w": wire})).spec
    with pytest.raises(TensorError, match=match):
        check_spec(type(spec)(spec.name, spec.dtype, spec.shape, encoding))


def test_encoded_tensors_survive_the_wire_and_the_model_file(tmp_path):
    wire, enc = codecs.encode("k", KERNEL, "int8")
    specs = {}
    arrays = assemble(iter_chunks({"k": wire}, chunk_bytes=1000, encodings={"k": enc}), specs)
    assert specs["k"].encoding == enc
    with ModelFileWriter(tmp_path / "m.fjm", expected={"k": next(iter_chunks({"k": KERNEL})).spec}) as writer:
        for chunk in iter_chunks({"k": arrays["k"]}, encodings={"k": enc}):
            writer.add_chunk(chunk)
        writer.commit()
    model = ModelFile(tmp_path / "m.fjm")
    assert model.spec("k").encoding == enc
    np.testing.assert_array_equal(codecs.decode(model.array("k"), enc), codecs.decode(wire, enc))


def test_writer_refuses_an_encoding_whose_model_dtype_is_not_the_models(tmp_path):
    wire, enc = codecs.encode("k", KERNEL.astype(np.float64), "int8")
    expected = {"k": next(iter_chunks({"k": KERNEL})).spec}  # the model says float32
    with ModelFileWriter(tmp_path / "m.fjm", expected=expected) as writer:
        with pytest.raises(TensorError, match="got float64"):
            writer.add_chunk(TensorChunk("k", 0, b"", next(iter_chunks({"k": wire}, encodings={"k": enc})).spec))


def test_encode_update_sends_the_named_tensors_as_deltas_that_decode_back():
    rng = np.random.default_rng(3)
    reference = {"params/w": rng.normal(size=(4, 3)).astype(np.float32), "step": np.array(2, np.int32)}
    trained = {"params/w": reference["params/w"] + np.float32(0.01), "step": np.array(3, np.int32),
               "params/not_sent": np.zeros(2, np.float32)}
    wire, encodings = codecs.encode_update(trained, ["params/w", "step"], "int8", reference)
    assert set(wire) == {"params/w", "step"} and set(encodings) == {"params/w"}  # integers travel as they are
    assert encodings["params/w"].delta and encodings["params/w"].codec == "int8"
    back = codecs.decode(wire["params/w"], encodings["params/w"], reference["params/w"])
    np.testing.assert_allclose(back, trained["params/w"], atol=0.01 / 255 + 1e-7)
    assert int(wire["step"]) == 3
    plain, none = codecs.encode_update(trained, ["params/w"], None)
    assert none == {} and plain["params/w"] is trained["params/w"]


def test_divergence_is_the_squared_distance_of_the_float_tensors_only():
    a = {"params/w": np.array([[1.0, 2.0]], np.float32), "step": np.array(7, np.int32)}
    b = {"params/w": np.array([[0.5, 4.0]], np.float32), "step": np.array(1, np.int32)}
    expected = np.linalg.norm(np.array([0.5, -2.0])) ** 2  # 4.25; the step counter does not count
    assert codecs.divergence(a, b, ["params/w", "step"]) == pytest.approx(expected)
