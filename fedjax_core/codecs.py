"""Compressed tensors for the wire: fp16, bf16 and int8, of weights or of their change.

``encode(array, codec, reference)`` returns what travels and its :class:`Encoding`;
``decode(wire, encoding, reference)`` gives the model's values back in the model's dtype.
Only float tensors are encoded; integer and bool leaves always travel as they are.

Round-trip error, per element ``x`` (deltas: of the change ``x - reference``):

- ``fp16``: at most ``|x| * 2**-11`` in float16's normal range (``|x| >= 2**-14``), at most
  ``2**-25`` below it. A tensor with values beyond float16's range (±65504) travels
  uncompressed instead of turning into infinities.
- ``bf16``: at most ``|x| * 2**-8`` (float32's range; bfloat16 only drops mantissa bits).
- ``int8``: at most ``scale / 2``, where ``scale = (max(hi, 0) - min(lo, 0)) / 255`` over the
  tensor, or over each output channel (the last axis) for tensors of two or more dimensions
  with at most :data:`~fedjax_core.tensors.MAX_CHANNELS` channels. Per channel because the
  channels of a kernel differ in range by orders of magnitude: one scale for all would round
  the small channels to nothing. The range always includes 0, so zeros decode exactly, and
  so does a constant tensor (up to float rounding).
- ``none`` (uncompressed deltas): ``reference + (x - reference)`` computed in float64 is
  exactly ``x`` whenever ``x - reference`` is exact in the model's dtype, which holds when a
  weight changes by at most its own magnitude (Sterbenz); otherwise within one unit in the
  last place of ``x``.

Decoding computes in float64 and casts back once, the same on envoy and director.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from fedjax_core.records import Encoding, TensorSpec
from fedjax_core.tensors import WIRE_DTYPES, TensorError, is_float_dtype, quantization_channels
from fedjax_core.model_file import ModelFile, ModelFileWriter

CODECS = tuple(WIRE_DTYPES)  # fp16, bf16, int8
FP16_MAX = float(np.finfo(np.float16).max)


def encode(name: str, array: np.ndarray, codec: str | None,
           reference: np.ndarray | None = None) -> tuple[np.ndarray, Encoding | None]:
    """What travels for ``array`` under ``codec`` (None: uncompressed), as a change from ``reference``
    when one is given. Non-float tensors, and uncompressed weights, travel as they are (encoding None)."""
    array = np.asarray(array)
    if not is_float_dtype(array.dtype) or (codec is None and reference is None):
        return array, None
    if codec is not None and codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)} or None")
    dtype = array.dtype.name
    delta = reference is not None
    values = _delta(array, reference) if delta else array
    peak = _max_abs(values) if codec is not None else 0.0
    if codec == "fp16" and peak > FP16_MAX:
        codec = None  # float16 would turn these into infinities: send this tensor uncompressed
    if codec is None:
        return (values, Encoding("none", dtype, delta=True)) if delta else (array, None)
    if not np.isfinite(peak):
        raise TensorError(f"tensor {name!r} has NaN or infinite values: training diverged")
    if codec == "int8":
        wire, scale, zero_point = _quantize(values)
        return wire, Encoding("int8", dtype, delta, tuple(float(s) for s in scale), tuple(int(z) for z in zero_point))
    return values.astype(WIRE_DTYPES[codec]), Encoding(codec, dtype, delta)


def encode_update(tensors: Mapping[str, np.ndarray], names: Iterable[str], codec: str | None,
                  reference: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Encoding]]:
    """A worker's upload: the tensors ``names`` (every one must be in ``tensors``) as :func:`encode` makes
    them, as changes from ``reference`` when one is given; returns ``(wire arrays, their encodings)``."""
    wire, encodings = {}, {}
    for name in names:
        wire[name], encoding = encode(name, tensors[name], codec, reference[name] if reference is not None else None)
        if encoding is not None:
            encodings[name] = encoding
    return wire, encodings


def divergence(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], names: Iterable[str]) -> float:
    """Squared L2 distance of the float tensors ``names`` from ``reference`` (dynamic averaging's check-in)."""
    return float(sum(np.sum(np.square(tensors[n].astype(np.float64) - reference[n].astype(np.float64)))
                     for n in names if is_float_dtype(tensors[n].dtype)))


def decode(wire: np.ndarray, encoding: Encoding | None, reference: np.ndarray | None = None) -> np.ndarray:
    """The model's values of a tensor that travelled as ``wire`` (``reference``: the model deltas apply to)."""
    if encoding is None:
        return np.asarray(wire)
    if encoding.codec == "int8":
        scale, zero_point = _per_channel(wire.shape, encoding)
        values = (wire.astype(np.float64) - zero_point) * scale
    else:
        values = wire.astype(np.float64)
    if encoding.delta:
        if reference is None:
            raise TensorError("a delta arrived without the model it applies to")
        values += np.asarray(reference, dtype=np.float64)
    return values.astype(encoding.dtype)


def _delta(array: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``array - reference`` in the model's dtype (wider than the wire for every lossy codec)."""
    if reference.shape != array.shape:
        raise TensorError(f"a delta needs the global model's shape {list(array.shape)}, got {list(reference.shape)}")
    return (array.astype(np.float64) - reference.astype(np.float64)).astype(array.dtype)


def _max_abs(values: np.ndarray) -> float:
    return float(np.max(np.abs(values.astype(np.float32)))) if values.size else 0.0


def _quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear int8 quantization per tensor or per output channel: q = round(x / scale) + zero_point."""
    channels = quantization_channels(values.shape)
    x = values.astype(np.float64).reshape(-1, channels) if values.size else np.zeros((0, channels))
    lo = np.minimum(x.min(axis=0, initial=0.0), 0.0)
    hi = np.maximum(x.max(axis=0, initial=0.0), 0.0)
    scale = (hi - lo) / 255.0
    scale[scale == 0] = 1.0  # an all-zero channel: any scale decodes its zeros exactly
    zero_point = np.clip(np.round(-128.0 - lo / scale), -128, 127)
    q = np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)
    return q.reshape(values.shape), scale, zero_point.astype(np.int64)


def _per_channel(shape: tuple[int, ...], encoding: Encoding) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point arrays that broadcast against a tensor of ``shape``."""
    scale = np.asarray(encoding.scale, dtype=np.float64)
    zero_point = np.asarray(encoding.zero_point, dtype=np.float64)
    if quantization_channels(shape) == 1:
        return scale.reshape(()), zero_point.reshape(())
    return scale, zero_point


def check_update_encodings(specs: Iterable[TensorSpec], compression: str, send_deltas: bool) -> None:
    """Refuse an upload encoded otherwise than its experiment says: the codec (or none, the
    fallback for values beyond float16), and deltas for every float tensor exactly when asked."""
    for spec in specs:
        e = spec.encoding
        if e is None:
            if send_deltas and is_float_dtype(spec.dtype):
                raise TensorError(f"tensor {spec.name!r} arrived as weights; this experiment sends deltas")
            continue
        if e.codec not in ("none", compression):
            raise TensorError(f"tensor {spec.name!r} arrived as {e.codec}; this experiment's codec is "
                              f"{compression or 'none'}")
        if e.delta != send_deltas:
            raise TensorError(f"tensor {spec.name!r} arrived as {'a delta' if e.delta else 'weights'}; this "
                              f"experiment sends {'deltas' if send_deltas else 'weights'}")


def decode_model(encoded: ModelFile, out: Path, reference: ModelFile, finite_only: bool = False) -> None:
    """Write ``encoded``'s tensors decoded into the model's dtypes at ``out``, deltas applied to ``reference``
    (one tensor in memory at a time); ``finite_only`` refuses NaN or infinite decoded values."""
    with ModelFileWriter(out, finite_only=finite_only) as writer:
        for spec in encoded.specs:
            wire = encoded.array(spec.name)
            delta = spec.encoding is not None and spec.encoding.delta
            writer.add_array(spec.name, decode(wire, spec.encoding, reference.array(spec.name) if delta else None))
        writer.commit()


def encode_model(model: ModelFile, out: Path, codec: str, names: Iterable[str]) -> None:
    """Write the tensors ``names`` of ``model`` encoded under ``codec`` at ``out`` (for compressed downloads)."""
    with ModelFileWriter(out) as writer:
        for name in names:
            wire, encoding = encode(name, model.array(name), codec)
            writer.add_array(name, wire, encoding)
        writer.commit()
