"""fedjax_core.tensors and fedjax_core.model_file: chunking, the dtype allow-list and the model file format."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from fedjax_core.records import TensorChunk, TensorSpec
from fedjax_core.tensors import TensorError, assemble, chunk_views, iter_chunks, nbytes_of, spec_of
from fedjax_core.model_file import ModelFile, ModelFileWriter, write_model_file


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "params/conv/kernel": rng.standard_normal((3, 3, 3, 16)).astype(np.float32),
        "params/conv/bias": rng.standard_normal(16).astype(np.float32),
        "params/half": rng.standard_normal((5, 7)).astype(np.float16),
        "params/double": rng.standard_normal((2, 3, 4)),
        "opt_state/step": np.asarray(42, dtype=np.int32),
        "opt_state/count": np.asarray(-(2**40), dtype=np.int64),
        "opt_state/mask": rng.random((4, 4)) > 0.5,
        "opt_state/u8": rng.integers(0, 255, size=(9,), dtype=np.uint8),
        "opt_state/u64": np.array([0, 2**63 + 5], dtype=np.uint64),
        "opt_state/i16": rng.integers(-1000, 1000, size=(2, 2), dtype=np.int16),
        "empty/rows": np.zeros((0, 3), np.float32),
        "empty/vec": np.zeros((0,), np.int64),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype.newbyteorder("<"), name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


# ----------------------------------------------------------------------- chunks
@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_iter_chunks_assemble_round_trip(chunk_bytes):
    model = _model()
    _assert_same(assemble(iter_chunks(model, chunk_bytes=chunk_bytes)), model)


def test_chunk_views_are_the_chunks_without_copies():
    model = _model()
    views = list(chunk_views(model, chunk_bytes=64))
    assert [(c.name, c.offset, c.spec, bytes(c.data)) for c in views] == \
        [(c.name, c.offset, c.spec, c.data) for c in iter_chunks(model, chunk_bytes=64)]
    kernel = next(c for c in views if c.name == "params/conv/kernel")
    assert isinstance(kernel.data, memoryview) and kernel.data.readonly
    assert np.shares_memory(np.frombuffer(kernel.data, np.uint8), model["params/conv/kernel"])


def test_assemble_fills_64_byte_aligned_writable_arrays():
    model = _model()
    got = assemble(iter_chunks(model, chunk_bytes=100))
    _assert_same(got, model)
    for name, array in got.items():
        assert array.flags.c_contiguous and array.flags.writeable, name
        assert array.size == 0 or array.ctypes.data % 64 == 0, name


def test_assemble_refuses_a_tensor_sent_twice():
    chunks = list(iter_chunks({"w": np.ones(4, np.float32)}))
    with pytest.raises(TensorError, match="'w' sent twice"):
        assemble(chunks + chunks)


def test_chunks_respect_the_size_limit_and_carry_the_spec_first():
    model = _model()
    chunks = list(iter_chunks(model, chunk_bytes=64))
    by_name: dict[str, list[TensorChunk]] = {}
    for c in chunks:
        assert len(c.data) <= 64
        by_name.setdefault(c.name, []).append(c)
    assert list(by_name) == list(model)
    for name, array in model.items():
        cs = by_name[name]
        # One chunk per 64 bytes, and at least one (carrying the spec) for 0-d and empty tensors.
        assert len(cs) == max(1, math.ceil(array.nbytes / 64)), name
        assert cs[0].spec == TensorSpec(name, array.dtype.name, array.shape)
        assert all(c.spec is None for c in cs[1:])
        assert [c.offset for c in cs] == [64 * i for i in range(len(cs))]
        assert b"".join(c.data for c in cs) == array.astype(array.dtype.newbyteorder("<")).tobytes()
    # The conv kernel really is split (> 1 chunk).
    assert len(by_name["params/conv/kernel"]) > 1


def test_zero_d_and_empty_tensors_get_exactly_one_chunk():
    chunks = list(iter_chunks({"s": np.float32(3.5), "e": np.zeros((0, 4), np.int32)}))
    assert [(c.name, c.offset, len(c.data)) for c in chunks] == [("s", 0, 4), ("e", 0, 0)]
    out = assemble(chunks)
    assert out["s"].shape == () and float(out["s"]) == 3.5
    assert out["e"].shape == (0, 4) and out["e"].dtype == np.int32


def test_non_contiguous_and_fortran_arrays_round_trip():
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    model = {"t": base.T, "s": base[::2, 1::3], "f": np.asfortranarray(base)}
    _assert_same(assemble(iter_chunks(model, chunk_bytes=16)), model)


@pytest.mark.parametrize("dtype", ["complex64", object, "<U5"])
def test_dtype_outside_allow_list_is_refused_naming_the_tensor(dtype):
    bad = np.zeros((2,), dtype=dtype)
    with pytest.raises(TensorError) as info:
        list(iter_chunks({"params/bad_leaf": bad}))
    assert "params/bad_leaf" in str(info.value)
    with pytest.raises(TensorError, match="params/bad_leaf"):
        spec_of("params/bad_leaf", bad)


def test_assemble_refuses_missing_spec_out_of_order_and_short_streams():
    chunks = list(iter_chunks({"w": np.arange(10, dtype=np.float32)}, chunk_bytes=8))
    with pytest.raises(TensorError, match="'w'"):
        assemble(chunks[1:])  # no spec first
    with pytest.raises(TensorError, match="'w'"):
        assemble([chunks[0], chunks[2], chunks[1], *chunks[3:]])
    with pytest.raises(TensorError, match="'w'"):
        assemble(chunks[:-1])
    bad_spec = TensorChunk("x", 0, b"\0" * 8, TensorSpec("x", "complex64", (1,)))
    with pytest.raises(TensorError, match="'x'"):
        assemble([bad_spec])


def test_big_endian_arrays_are_sent_little_endian_and_read_back_equal():
    values = np.array([[1.5, -2.25, 3e10], [0.0, 1e-3, -7.0]])
    big = {"f32": values.astype(">f4"), "f64": values.astype(">f8"), "i32": np.arange(6, dtype=">i4").reshape(2, 3)}
    chunks = list(iter_chunks(big))
    for c in chunks:
        assert c.data == big[c.name].astype(big[c.name].dtype.newbyteorder("<")).tobytes()
        assert c.spec.dtype in ("float32", "float64", "int32")
    out = assemble(chunks)
    for name, array in big.items():
        assert out[name].dtype.byteorder in ("<", "=")
        np.testing.assert_array_equal(out[name], array)


# ------------------------------------------------------------------ model files
def test_model_file_round_trip(tmp_path):
    model = _model(1)
    path = tmp_path / "m.fjm"
    write_model_file(path, model)
    mf = ModelFile(path)
    assert mf.names() == list(model)
    assert mf.specs == [TensorSpec(n, a.dtype.name, a.shape) for n, a in model.items()]
    assert mf.nbytes == sum(a.nbytes for a in model.values())
    _assert_same(mf.arrays(), model)
    for name, array in model.items():
        np.testing.assert_array_equal(mf[name], array, err_msg=name)
        assert mf[name].shape == array.shape
    _assert_same(assemble(mf.iter_chunks(chunk_bytes=10)), model)
    # A subset, in the order asked for.
    names = ["opt_state/step", "params/conv/bias"]
    _assert_same(assemble(mf.iter_chunks(names, chunk_bytes=5)), {n: model[n] for n in names})


def test_model_file_arrays_are_read_only_maps(tmp_path):
    path = tmp_path / "m.fjm"
    write_model_file(path, {"w": np.arange(1000, dtype=np.float32)})
    array = ModelFile(path).array("w")
    assert isinstance(array, np.memmap)
    with pytest.raises(ValueError):
        array[0] = 1.0


def test_writer_streams_chunks_from_another_file(tmp_path):
    model = _model(2)
    src = tmp_path / "src.fjm"
    write_model_file(src, model)
    expected = {s.name: s for s in ModelFile(src).specs}
    dst = tmp_path / "dst.fjm"
    writer = ModelFileWriter(dst, expected)
    for chunk in ModelFile(src).iter_chunks(chunk_bytes=33):
        writer.add_chunk(chunk)
    specs = writer.commit()
    assert specs == list(expected.values())
    assert writer.bytes_written == sum(nbytes_of(s) for s in specs)
    _assert_same(ModelFile(dst).arrays(), model)


def test_writer_is_atomic_partial_until_commit(tmp_path):
    path = tmp_path / "sub" / "m.fjm"
    partial = path.with_name(path.name + ".partial")
    writer = ModelFileWriter(path)
    writer.add_array("a", np.ones(3, np.float32))
    assert partial.exists()
    assert not path.exists()
    writer.add_array("b", np.zeros((2, 2), np.int32))
    assert not path.exists()
    writer.commit()
    assert path.exists()
    assert not partial.exists()
    np.testing.assert_array_equal(ModelFile(path)["a"], np.ones(3, np.float32))


def test_aborted_writer_leaves_no_file(tmp_path):
    path = tmp_path / "m.fjm"
    writer = ModelFileWriter(path)
    writer.add_array("a", np.ones(3, np.float32))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_context_aborts_on_error(tmp_path):
    path = tmp_path / "m.fjm"
    with pytest.raises(TensorError):
        with ModelFileWriter(path, {"a": TensorSpec("a", "float32", (3,))}) as writer:
            writer.add_array("a", np.ones(4, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_big_endian_arrays_are_stored_little_endian(tmp_path):
    values = np.linspace(-5, 5, 12).reshape(3, 4)
    big = {"f": values.astype(">f4"), "d": values.astype(">f8"), "i": np.arange(-6, 6, dtype=">i8")}
    path = tmp_path / "m.fjm"
    write_model_file(path, big)
    mf = ModelFile(path)
    raw = path.read_bytes()
    for name, array in big.items():
        little = array.astype(array.dtype.newbyteorder("<")).tobytes()
        assert little in raw, name
        assert array.tobytes() not in raw, name  # the big-endian bytes are not what is stored
        got = mf.array(name)
        assert got.dtype.byteorder in ("<", "=")
        np.testing.assert_array_equal(got, array, err_msg=name)


@pytest.mark.parametrize("keep", [len(b"FJXMODEL1\n") + 2, -3])
def test_truncated_model_file_is_refused_naming_the_path(tmp_path, keep):
    good = tmp_path / "good.fjm"
    write_model_file(good, {"w": np.ones(8, np.float32)})
    raw = good.read_bytes()
    path = tmp_path / "truncated.fjm"
    path.write_bytes(raw[:keep])
    with pytest.raises(TensorError) as info:
        ModelFile(path)
    assert str(path) in str(info.value)


def test_a_footer_that_points_outside_the_data_is_refused(tmp_path):
    import json
    import struct

    good = tmp_path / "good.fjm"
    write_model_file(good, {"w": np.ones(8, np.float32)})
    raw = good.read_bytes()
    (footer_len,) = struct.unpack("<Q", raw[-8:])
    entries = json.loads(raw[-8 - footer_len:-8])
    for change in ({"offset": len(raw)}, {"nbytes": 64}, {"shape": [9]}):
        footer = json.dumps([{**entries[0], **change}]).encode()
        path = tmp_path / "bad.fjm"
        path.write_bytes(raw[:-8 - footer_len] + footer + struct.pack("<Q", len(footer)))
        with pytest.raises(TensorError, match="truncated or damaged"):
            ModelFile(path)


def test_block_reads_match_the_mapped_arrays_and_map_nothing(tmp_path, monkeypatch):
    model = _model()
    write_model_file(tmp_path / "m.fjm", model)
    mf = ModelFile(tmp_path / "m.fjm")

    def mapped(*args, **kwargs):
        raise AssertionError("mapped")
    monkeypatch.setattr(np, "memmap", mapped)
    _assert_same(mf.arrays(), model)
    for name, array in model.items():
        flat = array.reshape(-1)
        assert mf.read(name).shape == array.shape
        seen = [(b, v.copy()) for b, v in mf.blocks(name, 5)]
        assert [b for b, _ in seen] == [slice(i, min(i + 5, flat.size)) for i in range(0, flat.size, 5)]
        np.testing.assert_array_equal(np.concatenate([v for _, v in seen]) if seen else flat[:0], flat, err_msg=name)
        if flat.size >= 4:
            got = [(b, v.copy()) for b, v in mf.blocks(name, 2, 1, flat.size - 1)]
            assert got[0][0] == slice(1, 3) and got[-1][0].stop == flat.size - 1
            np.testing.assert_array_equal(np.concatenate([v for _, v in got]), flat[1:-1], err_msg=name)
            out = np.empty(2, flat.dtype.newbyteorder("<"))
            np.testing.assert_array_equal(mf.read_into(name, 2, out), flat[2:4], err_msg=name)
    with pytest.raises(ValueError, match="cannot read"):
        mf.read_into("params/conv/bias", 10, np.empty(7, np.float32))  # past the end
    with pytest.raises(ValueError, match="cannot read"):
        mf.read_into("params/conv/bias", 0, np.empty(2, np.float64))  # not the tensor's dtype


def test_a_file_cut_short_while_being_read_is_an_io_error(tmp_path):
    path = tmp_path / "m.fjm"
    write_model_file(path, {"w": np.ones(1000, np.float32)})
    mf = ModelFile(path)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(OSError, match="ended early"):
        mf.read("w")


def test_add_blocks_writes_a_tensor_from_reused_block_buffers(tmp_path):
    values = np.arange(23, dtype=np.float32).reshape(23, 1)
    buffer = np.empty(5, np.float32)

    def blocks():
        for start in range(0, 23, 5):
            out = buffer[:min(5, 23 - start)]
            out[...] = values.reshape(-1)[start:start + out.size]
            yield slice(start, start + out.size), out
    with ModelFileWriter(tmp_path / "m.fjm") as writer:
        writer.add_blocks("w", "float32", (23, 1), blocks())
        writer.commit()
    _assert_same(ModelFile(tmp_path / "m.fjm").arrays(), {"w": values})
    with ModelFileWriter(tmp_path / "bad.fjm") as writer:
        with pytest.raises(TensorError, match="block 5:10"):
            writer.add_blocks("w", "float32", (23,), iter([(slice(5, 10), np.zeros(5, np.float32))]))
    with ModelFileWriter(tmp_path / "short.fjm") as writer:
        writer.add_blocks("w", "float32", (23,), iter([(slice(0, 5), np.zeros(5, np.float32))]))
        with pytest.raises(TensorError, match="got 20 of 92 bytes"):
            writer.commit()


def test_a_writer_starts_the_disk_writes_of_every_writeback_range_it_wrote(tmp_path, monkeypatch):
    import fedjax_core.model_file as model_file

    monkeypatch.setattr(model_file, "WRITEBACK_BYTES", 4096)
    started = []
    monkeypatch.setattr(model_file, "_start_writeback", lambda fd, offset, nbytes: started.append((offset, nbytes)))
    model = {"a": np.arange(3000, dtype=np.float32), "b": np.ones(5000, np.float64)}
    with ModelFileWriter(tmp_path / "m.fjm") as writer:
        writer.add_array("a", model["a"])  # 12000 bytes: written in 4096-byte slices
        for chunk in iter_chunks({"b": model["b"]}, chunk_bytes=1000):
            writer.add_chunk(chunk)
        writer.commit()
    _assert_same(ModelFile(tmp_path / "m.fjm").arrays(), model)
    assert started[0][0] == len(b"FJXMODEL1\n") and all(n >= 4096 for _, n in started)
    assert all(a + n == b for (a, n), (b, _) in zip(started, started[1:]))  # consecutive ranges, none twice
    assert started[-1][0] + started[-1][1] > 12000 + 40000 - 4096


def test_copy_tensor_copies_bytes_and_encoding_from_another_file(tmp_path):
    from fedjax_core.records import Encoding

    model = _model()
    encoding = Encoding("fp16", "float32", False)
    with ModelFileWriter(tmp_path / "src.fjm") as writer:
        for name, array in model.items():
            writer.add_array(name, array, encoding if name == "params/half" else None)
        writer.commit()
    src = ModelFile(tmp_path / "src.fjm")
    with ModelFileWriter(tmp_path / "dst.fjm") as writer:
        for name in model:
            writer.copy_tensor(src, name)
        writer.commit()
    dst = ModelFile(tmp_path / "dst.fjm")
    assert dst.specs == src.specs and dst.spec("params/half").encoding == encoding
    _assert_same(dst.arrays(), model)


def test_not_a_model_file_is_refused(tmp_path):
    path = tmp_path / "x.fjm"
    path.write_bytes(b"something else entirely, not a model")
    with pytest.raises(TensorError, match="not a model file"):
        ModelFile(path)


# -------------------------------------------------------- expected-spec checks
EXPECTED = {
    "params/w": TensorSpec("params/w", "float32", (4, 3)),
    "params/b": TensorSpec("params/b", "float32", (3,)),
}


def _writer(tmp_path) -> ModelFileWriter:
    return ModelFileWriter(tmp_path / "u.fjm", EXPECTED)


def _raises_naming(name: str):
    return pytest.raises(TensorError, match=re.escape(repr(name)))


def test_expected_unknown_name(tmp_path):
    w = _writer(tmp_path)
    with _raises_naming("params/extra"):
        w.add_array("params/extra", np.zeros(3, np.float32))
    w.abort()


def test_expected_wrong_dtype(tmp_path):
    w = _writer(tmp_path)
    with _raises_naming("params/w") as info:
        w.add_array("params/w", np.zeros((4, 3), np.float64))
    assert "float64" in str(info.value) and "float32" in str(info.value)
    w.abort()


def test_expected_wrong_shape(tmp_path):
    w = _writer(tmp_path)
    with _raises_naming("params/w") as info:
        w.add_array("params/w", np.zeros((3, 4), np.float32))
    assert "[3, 4]" in str(info.value) and "[4, 3]" in str(info.value)
    w.abort()


def test_expected_out_of_order_offset(tmp_path):
    w = _writer(tmp_path)
    chunks = list(iter_chunks({"params/w": np.zeros((4, 3), np.float32)}, chunk_bytes=16))
    w.add_chunk(chunks[0])
    with _raises_naming("params/w") as info:
        w.add_chunk(chunks[2])
    assert "offset 32" in str(info.value)
    w.abort()


def test_expected_too_much_data(tmp_path):
    w = _writer(tmp_path)
    spec = EXPECTED["params/b"]
    with _raises_naming("params/b"):
        w.add_chunk(TensorChunk("params/b", 0, b"\0" * 16, spec))  # 3 float32 are 12 bytes
    w.abort()
    w = _writer(tmp_path)
    w.add_chunk(TensorChunk("params/b", 0, b"\0" * 8, spec))
    with _raises_naming("params/b"):
        w.add_chunk(TensorChunk("params/b", 8, b"\0" * 8))
    w.abort()


def test_expected_missing_tensor_at_commit(tmp_path):
    w = _writer(tmp_path)
    w.add_array("params/w", np.zeros((4, 3), np.float32))
    with _raises_naming("params/b"):
        w.commit()
    w.abort()
    assert not (tmp_path / "u.fjm").exists()


def test_expected_incomplete_tensor(tmp_path):
    w = _writer(tmp_path)
    w.add_chunk(TensorChunk("params/b", 0, b"\0" * 8, EXPECTED["params/b"]))
    with _raises_naming("params/b"):
        w.add_array("params/w", np.zeros((4, 3), np.float32))
    w.abort()
    w = _writer(tmp_path)
    w.add_array("params/w", np.zeros((4, 3), np.float32))
    w.add_chunk(TensorChunk("params/b", 0, b"\0" * 8, EXPECTED["params/b"]))
    with _raises_naming("params/b"):
        w.commit()
    w.abort()


def test_expected_tensor_sent_twice(tmp_path):
    w = _writer(tmp_path)
    w.add_array("params/b", np.zeros(3, np.float32))
    w.add_array("params/w", np.zeros((4, 3), np.float32))
    with _raises_naming("params/b") as info:
        w.add_array("params/b", np.ones(3, np.float32))
    assert "twice" in str(info.value)
    w.abort()


def test_chunk_of_another_tensor_without_spec_is_refused(tmp_path):
    w = _writer(tmp_path)
    w.add_array("params/b", np.zeros(3, np.float32))
    with _raises_naming("params/w"):
        w.add_chunk(TensorChunk("params/w", 0, b"\0" * 4))
    w.abort()


def test_expected_specs_accept_the_right_update(tmp_path):
    w = _writer(tmp_path)
    w.add_array("params/b", np.arange(3, dtype=np.float32))
    w.add_array("params/w", np.arange(12, dtype=np.float32).reshape(4, 3))
    specs = w.commit()
    assert sorted(specs, key=lambda s: s.name) == sorted(EXPECTED.values(), key=lambda s: s.name)
    np.testing.assert_array_equal(ModelFile(tmp_path / "u.fjm")["params/w"], np.arange(12).reshape(4, 3))


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 1 << 20])
def test_non_finite_values_are_caught_as_chunks_arrive_whatever_their_size(tmp_path, chunk_bytes):
    import ml_dtypes

    good = {"w": np.linspace(-1, 1, 50, dtype=np.float32), "h": np.ones(9, dtype=ml_dtypes.bfloat16),
            "n": np.arange(5, dtype=np.int32)}
    with ModelFileWriter(tmp_path / "good.fjm", finite_only=True) as writer:
        for chunk in iter_chunks(good, chunk_bytes=chunk_bytes):
            writer.add_chunk(chunk)
        writer.commit()
    for name, position in (("w", 33), ("h", 8)):
        bad = {k: v.copy() for k, v in good.items()}
        bad[name][position] = np.nan  # its bytes straddle a chunk boundary for the odd sizes
        with ModelFileWriter(tmp_path / "bad.fjm", finite_only=True) as writer:
            with pytest.raises(TensorError, match=f"non-finite values in '{name}'"):
                for chunk in iter_chunks(bad, chunk_bytes=chunk_bytes):
                    writer.add_chunk(chunk)
                writer.commit()
        assert not (tmp_path / "bad.fjm").exists()
