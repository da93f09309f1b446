"""Named raw tensor buffers: the dtype allow-list, spec checks, and chunk streams.

A model is a flat mapping ``pytree path -> numpy array``. It travels as a stream of
:class:`TensorChunk` (:func:`iter_chunks` out, :func:`assemble` back) and rests on disk as a
model file (:mod:`fedjax_core.model_file`); nothing here ever unpickles.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from fedjax_core.errors import InvalidRequestError
from fedjax_core.records import Encoding, TensorChunk, TensorSpec

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)  # importing ml_dtypes registers it: np.dtype("bfloat16") works
FLOAT_DTYPES = frozenset(["float16", BFLOAT16.name, "float32", "float64"])
ALLOWED_DTYPES = frozenset(["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                            *FLOAT_DTYPES])
CHUNK_BYTES = 1 << 20
MAX_DIMS = 32
MAX_TENSOR_BYTES = 64 << 30
WIRE_DTYPES = {"fp16": "float16", "bf16": BFLOAT16.name, "int8": "int8"}  # codec -> dtype on the wire
MAX_CHANNELS = 4096  # int8 quantizes per output channel up to this many, per tensor beyond


class TensorError(InvalidRequestError, ValueError):
    """A tensor that does not match what the experiment's model says it must be."""


def is_float_dtype(dtype: str | np.dtype) -> bool:
    """Floating point, bfloat16 included (numpy does not count ml_dtypes' bfloat16 as np.floating)."""
    return np.dtype(dtype).name in FLOAT_DTYPES


def spec_of(name: str, array: np.ndarray, encoding: Encoding | None = None) -> TensorSpec:
    """The spec of ``array``; refuses dtypes outside the allow-list, naming the path."""
    dtype = np.dtype(array.dtype).name
    if dtype not in ALLOWED_DTYPES:
        raise TensorError(
            f"tensor {name!r} has dtype {dtype}, which cannot cross the wire; "
            f"allowed: {', '.join(sorted(ALLOWED_DTYPES))} (cast it, e.g. to float32)"
        )
    return TensorSpec(name=name, dtype=dtype, shape=tuple(int(d) for d in array.shape), encoding=encoding)


def quantization_channels(shape: tuple[int, ...]) -> int:
    """How many (scale, zero point) pairs int8 uses: one per output channel (the last axis, as in
    flax kernels) for tensors of two or more dimensions, else one for the whole tensor."""
    if len(shape) >= 2 and 0 < shape[-1] <= MAX_CHANNELS:
        return int(shape[-1])
    return 1


def decoded_dtype(spec: TensorSpec) -> str:
    """The model's dtype of a tensor: its encoding's, when it travels compressed."""
    return spec.encoding.dtype if spec.encoding is not None else spec.dtype


def check_encoding(spec: TensorSpec) -> None:
    """Refuse an encoding that does not fit its tensor: codec, dtypes, and int8's scales and zero points."""
    e = spec.encoding
    if e is None:
        return
    if e.dtype not in FLOAT_DTYPES:
        raise TensorError(f"tensor {spec.name!r}: only float tensors travel encoded, not {e.dtype!r}")
    if e.codec == "none":
        if not e.delta or spec.dtype != e.dtype:
            raise TensorError(f"tensor {spec.name!r}: codec 'none' is for uncompressed deltas in the model's dtype")
    elif e.codec not in WIRE_DTYPES:
        raise TensorError(f"tensor {spec.name!r}: unknown codec {e.codec!r}; known: none, {', '.join(WIRE_DTYPES)}")
    elif spec.dtype != WIRE_DTYPES[e.codec]:
        raise TensorError(f"tensor {spec.name!r}: codec {e.codec} travels as {WIRE_DTYPES[e.codec]}, not {spec.dtype}")
    if e.codec != "int8":
        if e.scale or e.zero_point:
            raise TensorError(f"tensor {spec.name!r}: only int8 carries scales and zero points")
        return
    channels = quantization_channels(spec.shape)
    if len(e.scale) != channels or len(e.zero_point) != channels:
        raise TensorError(f"tensor {spec.name!r}: int8 needs {channels} scale(s) and zero point(s) for shape "
                          f"{list(spec.shape)}, got {len(e.scale)} and {len(e.zero_point)}")
    if not all(math.isfinite(v) and v > 0 for v in e.scale):
        raise TensorError(f"tensor {spec.name!r}: int8 scales must be finite and positive")
    if not all(-128 <= z <= 127 for z in e.zero_point):
        raise TensorError(f"tensor {spec.name!r}: int8 zero points must lie in [-128, 127]")


def check_spec(spec: TensorSpec) -> None:
    """Refuse specs with unknown dtypes, negative or absurd dimensions, or too many bytes."""
    if spec.dtype not in ALLOWED_DTYPES:
        raise TensorError(f"tensor {spec.name!r}: dtype {spec.dtype!r} is not allowed")
    if len(spec.shape) > MAX_DIMS or any(not 0 <= d < 2**31 for d in spec.shape):
        raise TensorError(f"tensor {spec.name!r}: shape {list(spec.shape)} is not valid "
                          f"(at most {MAX_DIMS} dimensions, each from 0 to 2**31 - 1)")
    if math.prod(max(d, 1) for d in spec.shape) * np.dtype(spec.dtype).itemsize > MAX_TENSOR_BYTES:
        raise TensorError(f"tensor {spec.name!r}: shape {list(spec.shape)} is larger than "
                          f"{MAX_TENSOR_BYTES >> 30} GiB")
    check_encoding(spec)


def check_finite(name: str, values: np.ndarray) -> None:
    """Refuse NaN or infinite values in a float tensor (or a slice of one), naming the tensor."""
    if values.dtype.itemsize < 4:  # float16 and bfloat16: numpy's isfinite wants a native float
        values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise TensorError(f"non-finite values in {name!r} (NaN or infinity): training diverged")


def nbytes_of(spec: TensorSpec) -> int:
    return math.prod(spec.shape) * np.dtype(spec.dtype).itemsize


def iter_chunks(tensors: Mapping[str, np.ndarray], chunk_bytes: int = CHUNK_BYTES,
                encodings: Mapping[str, Encoding] | None = None) -> Iterator[TensorChunk]:
    """Split named arrays into chunks of at most ``chunk_bytes``; every tensor gets one or more.

    ``encodings``: how the tensors that travel compressed were encoded (their first chunk says)."""
    for chunk in chunk_views(tensors, chunk_bytes, encodings):
        yield dataclasses.replace(chunk, data=bytes(chunk.data))  # each chunk is the only copy


def chunk_views(tensors: Mapping[str, np.ndarray], chunk_bytes: int = CHUNK_BYTES,
                encodings: Mapping[str, Encoding] | None = None) -> Iterator[TensorChunk]:
    """:func:`iter_chunks` without the copy: each chunk's ``data`` is a read-only memoryview into its array
    (little-endian, contiguous), for a sender that serializes each chunk before the arrays change."""
    for name, array in tensors.items():
        spec = spec_of(name, array, (encodings or {}).get(name))
        data = memoryview(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1)
                          .view(np.uint8)).toreadonly()
        yield TensorChunk(name=spec.name, offset=0, data=data[:chunk_bytes], spec=spec)
        for offset in range(chunk_bytes, len(data), chunk_bytes):
            yield TensorChunk(name=spec.name, offset=offset, data=data[offset:offset + chunk_bytes])


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | str, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an ``alignment``-byte boundary: JAX on CPU then takes
    it without a copy (``jax.device_put``), where numpy's own buffers (16-byte aligned) are copied."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def assemble(chunks: Iterable[TensorChunk], specs: dict[str, TensorSpec] | None = None) -> dict[str, np.ndarray]:
    """Rebuild named arrays from a chunk stream (client side, where the model fits in memory).

    Each tensor is filled in place in one 64-byte aligned buffer: one copy of the data, which JAX on CPU
    can then take as it is. ``specs``, when given, receives each tensor's spec (which says how an encoded
    one decodes)."""
    buffers: dict[str, np.ndarray] = {}  # flat uint8 views of the arrays being filled
    arrays: dict[str, np.ndarray] = {}
    filled: dict[str, int] = {}
    specs = {} if specs is None else specs
    for chunk in chunks:
        if chunk.spec is not None:
            check_spec(chunk.spec)
            if chunk.name in buffers:
                raise TensorError(f"tensor {chunk.name!r} sent twice")
            specs[chunk.name] = chunk.spec
            arrays[chunk.name] = aligned_empty(tuple(chunk.spec.shape), np.dtype(chunk.spec.dtype).newbyteorder("<"))
            buffers[chunk.name] = arrays[chunk.name].reshape(-1).view(np.uint8)
            filled[chunk.name] = 0
        if chunk.name not in buffers or chunk.offset != filled[chunk.name]:
            raise TensorError(f"tensor {chunk.name!r}: chunk out of order")
        end = chunk.offset + len(chunk.data)
        if end > buffers[chunk.name].size:
            raise TensorError(f"tensor {chunk.name!r}: more data than its shape holds")
        buffers[chunk.name][chunk.offset:end] = np.frombuffer(chunk.data, np.uint8)
        filled[chunk.name] = end
    for name in arrays:
        if filled[name] != buffers[name].size:
            raise TensorError(f"tensor {name!r}: got {filled[name]} of {buffers[name].size} bytes")
    return arrays
