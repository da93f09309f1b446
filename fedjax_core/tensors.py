"""Named raw tensor buffers: dtype allow-list, chunking and the model file format.

A model is a flat mapping ``pytree path -> numpy array``. It travels as a stream of
:class:`TensorChunk` and rests on disk as a *model file*: the tensors' raw bytes one
after another, then a JSON footer listing each tensor's spec and offset, then the
footer's length (8 bytes, little endian). Writing streams front to back; reading either
maps a tensor lazily (:meth:`ModelFile.array`) or reads it block by block into one reused
buffer (:meth:`ModelFile.blocks`), which leaves nothing of the file resident in the reader;
nothing here ever unpickles.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

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
BLOCK_ELEMENTS = 1 << 18  # elements per block read: 1 MiB of float32
WRITEBACK_BYTES = 16 << 20  # a writer has the disk writes of every 16 MiB begin at once, so commit's fsync waits less
_MAGIC = b"FJXMODEL1\n"
_FOOTER_LEN = struct.Struct("<Q")


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


def _writeback_starter():
    """``start(fd, offset, nbytes)``: have the kernel begin writing a file range to disk without waiting for it
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); a no-op where there is no such call. Durability
    still comes from the fsync that follows."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, nbytes: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, nbytes: call(fd, offset, nbytes, 2)


_start_writeback = _writeback_starter()


class ModelFileWriter:
    """Writes a model file front to back from whole arrays or streamed chunks, atomically.

    Chunks are checked against ``expected`` specs when given: unknown names, wrong dtype or
    shape, out-of-order offsets, overlong data and missing tensors all raise TensorError.
    ``finite_only``: float values must be finite, checked as they arrive (no second pass over
    the file); one NaN or infinity raises TensorError naming the tensor.
    """

    def __init__(self, path: Path, expected: Mapping[str, TensorSpec] | None = None, finite_only: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._file = open(self._tmp, "wb")
        self._file.write(_MAGIC)
        self._position = self._written_back = len(_MAGIC)
        self._expected = dict(expected) if expected is not None else None
        self._entries: dict[str, dict] = {}
        self._current: str | None = None
        self._finite_only = finite_only
        self.bytes_written = 0

    def add_array(self, name: str, array: np.ndarray, encoding: Encoding | None = None) -> None:
        """Write a whole tensor straight from its buffer (no chunk copies)."""
        array = np.asarray(array)
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        spec = spec_of(name, array, encoding)
        if self._finite_only and is_float_dtype(spec.dtype):
            check_finite(name, data.reshape(-1))
        self.add_chunk(TensorChunk(name=name, offset=0, data=b"", spec=spec))
        flat = data.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, WRITEBACK_BYTES):
            self._write(flat[start:start + WRITEBACK_BYTES])
        self._entries[name]["received"] = nbytes_of(spec)
        self.bytes_written += nbytes_of(spec)

    def add_blocks(self, name: str, dtype: np.dtype | str, shape: tuple[int, ...],
                   blocks: Iterable[tuple[slice, np.ndarray]]) -> None:
        """Write a tensor from ``(slice, values)`` blocks of its flattened values, in order (each written at
        once, so a producer may reuse one buffer): the tensor is never whole in memory."""
        spec = TensorSpec(name, np.dtype(dtype).name, tuple(int(d) for d in shape))
        self.add_chunk(TensorChunk(name=name, offset=0, data=b"", spec=spec))
        entry, itemsize = self._entries[name], np.dtype(dtype).itemsize
        for block, values in blocks:
            values = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<")).reshape(-1)
            if block.start * itemsize != entry["received"] or values.size != block.stop - block.start:
                raise TensorError(f"tensor {name!r}: block {block.start}:{block.stop} of {values.size} values "
                                  f"arrived after {entry['received'] // itemsize} values")
            self.add_chunk(TensorChunk(name=name, offset=entry["received"], data=values.view(np.uint8)))

    def copy_tensor(self, source: ModelFile, name: str) -> None:
        """Copy tensor ``name`` of another model file block by block (read, not mapped: nothing of the
        source stays resident), encoding included."""
        spec = source.spec(name)
        self.add_chunk(TensorChunk(name=name, offset=0, data=b"", spec=spec))
        for _, block in source.blocks(name):
            self._write(block.view(np.uint8))
        self._entries[name]["received"] = nbytes_of(spec)
        self.bytes_written += nbytes_of(spec)

    def add_chunk(self, chunk: TensorChunk) -> None:
        if chunk.spec is not None:
            self._start_tensor(chunk)
        entry = self._entries.get(chunk.name)
        if entry is None or chunk.name != self._current:
            raise TensorError(
                f"chunk for tensor {chunk.name!r} arrived out of order: a tensor's first chunk "
                "carries its spec and its chunks come together"
            )
        if chunk.offset != entry["received"]:
            raise TensorError(
                f"tensor {chunk.name!r}: chunk at offset {chunk.offset}, expected {entry['received']}"
            )
        if entry["received"] + len(chunk.data) > entry["nbytes"]:
            raise TensorError(
                f"tensor {chunk.name!r}: more data than its shape {tuple(entry['shape'])} "
                f"of {entry['dtype']} holds ({entry['nbytes']} bytes)"
            )
        if self._finite_only and chunk.data and is_float_dtype(entry["dtype"]):
            self._check_chunk(entry, chunk.data)
        self._write(chunk.data)
        entry["received"] += len(chunk.data)
        self.bytes_written += len(chunk.data)

    def _write(self, data) -> None:
        self._file.write(data)
        self._position += len(data)
        if self._position - self._written_back >= WRITEBACK_BYTES:
            self._file.flush()
            _start_writeback(self._file.fileno(), self._written_back, self._position - self._written_back)
            self._written_back = self._position

    @staticmethod
    def _check_chunk(entry: dict, data: bytes) -> None:
        """Check a chunk's whole elements; bytes of an element split across chunks wait for the next one."""
        dtype = np.dtype(entry["dtype"]).newbyteorder("<")
        pending = entry.get("partial", b"") + data if entry.get("partial") else data
        whole = len(pending) - len(pending) % dtype.itemsize
        entry["partial"] = bytes(pending[whole:])
        if whole:
            check_finite(entry["name"], np.frombuffer(memoryview(pending)[:whole], dtype=dtype))

    def _start_tensor(self, chunk: TensorChunk) -> None:
        spec = chunk.spec
        assert spec is not None
        if spec.name != chunk.name:
            raise TensorError(f"chunk names {chunk.name!r} but its spec names {spec.name!r}")
        check_spec(spec)
        if self._expected is not None:
            want = self._expected.get(spec.name)
            if want is None:
                raise TensorError(
                    f"tensor {spec.name!r} is not part of this model's update "
                    f"(expected {len(self._expected)} tensors such as {next(iter(self._expected), '-')!r})"
                )
            if (want.dtype, tuple(want.shape)) != (decoded_dtype(spec), tuple(spec.shape)):
                raise TensorError(
                    f"tensor {spec.name!r}: got {decoded_dtype(spec)}{list(spec.shape)}, "
                    f"the model has {want.dtype}{list(want.shape)}"
                )
        if spec.name in self._entries:
            raise TensorError(f"tensor {spec.name!r} sent twice")
        self._close_current()
        self._entries[spec.name] = {
            "name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape),
            "offset": self._file.tell(), "nbytes": nbytes_of(spec), "received": 0,
            "encoding": dataclasses.asdict(spec.encoding) if spec.encoding is not None else None,
        }
        self._current = spec.name

    def _close_current(self) -> None:
        if self._current is not None:
            entry = self._entries[self._current]
            if entry["received"] != entry["nbytes"]:
                raise TensorError(
                    f"tensor {self._current!r}: got {entry['received']} of {entry['nbytes']} bytes"
                )

    def commit(self) -> list[TensorSpec]:
        """Check completeness, write the footer and move the file into place."""
        self._close_current()
        if self._expected is not None:
            missing = sorted(set(self._expected) - set(self._entries))
            if missing:
                raise TensorError(f"update is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        footer = json.dumps(
            [{k: e[k] for k in ("name", "dtype", "shape", "offset", "nbytes", "encoding")}
             for e in self._entries.values()]
        ).encode()
        self._file.write(footer)
        self._file.write(_FOOTER_LEN.pack(len(footer)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return [_spec_of_entry(e) for e in self._entries.values()]

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ModelFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def fsync_dir(path: Path) -> None:
    """Make a folder's new or renamed entries durable (a rename is only as safe as its folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_file(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    with ModelFileWriter(path) as writer:
        for name, array in tensors.items():
            writer.add_array(name, array)
        writer.commit()


class ModelFile:
    """Read access to a model file: specs, lazily mapped arrays, and chunk streams."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC or size < len(_MAGIC) + _FOOTER_LEN.size:
                raise TensorError(f"{self.path} is not a model file")
            f.seek(-_FOOTER_LEN.size, os.SEEK_END)
            (footer_len,) = _FOOTER_LEN.unpack(f.read(_FOOTER_LEN.size))
            if footer_len > size - len(_MAGIC) - _FOOTER_LEN.size:
                raise TensorError(f"{self.path} is truncated or damaged (its footer does not fit)")
            f.seek(-_FOOTER_LEN.size - footer_len, os.SEEK_END)
            try:
                self._entries = {e["name"]: e for e in json.loads(f.read(footer_len))}
                data_end = size - _FOOTER_LEN.size - footer_len
                fits = all(len(_MAGIC) <= e["offset"] and e["offset"] + e["nbytes"] <= data_end
                           and e["nbytes"] == nbytes_of(_spec_of_entry(e)) for e in self._entries.values())
            except (ValueError, KeyError, TypeError):
                raise TensorError(f"{self.path} is truncated or damaged (unreadable footer)") from None
            if not fits:
                raise TensorError(f"{self.path} is truncated or damaged (a tensor lies outside its data)")

    @property
    def specs(self) -> list[TensorSpec]:
        return [_spec_of_entry(e) for e in self._entries.values()]

    def spec(self, name: str) -> TensorSpec:
        return _spec_of_entry(self._entries[name])

    def names(self) -> list[str]:
        return list(self._entries)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.array(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def nbytes(self) -> int:
        return sum(e["nbytes"] for e in self._entries.values())

    def array(self, name: str) -> np.ndarray:
        """One tensor, memory-mapped (read-only) rather than loaded."""
        e = self._entries[name]
        dtype = np.dtype(e["dtype"]).newbyteorder("<")
        if e["nbytes"] == 0:
            return np.zeros(e["shape"], dtype=dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=e["offset"], shape=tuple(e["shape"]))

    def arrays(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Tensors read into memory (plain reads: no mapping stays behind)."""
        return {n: self.read(n) for n in (names if names is not None else self._entries)}

    def read(self, name: str) -> np.ndarray:
        """One tensor read into a new array."""
        e = self._entries[name]
        out = np.empty(e["shape"], np.dtype(e["dtype"]).newbyteorder("<"))
        return self.read_into(name, 0, out.reshape(-1)).reshape(e["shape"])

    def read_into(self, name: str, start: int, out: np.ndarray) -> np.ndarray:
        """Elements ``[start, start + out.size)`` of the flattened tensor ``name`` read into ``out`` (contiguous,
        of the tensor's dtype), which is returned. The file is opened for this read only."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return self._read_into(fd, name, start, out)
        finally:
            os.close(fd)

    def blocks(self, name: str, block_elements: int = BLOCK_ELEMENTS, start: int = 0,
               stop: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """``(slice, block)`` over elements ``[start, stop)`` of the flattened tensor ``name``, read block by
        block into one buffer that is reused: a block is valid until the next one is read. Unlike
        :meth:`array`, nothing is mapped, so the file's pages never count in this process's memory."""
        e = self._entries[name]
        dtype = np.dtype(e["dtype"]).newbyteorder("<")
        stop = e["nbytes"] // dtype.itemsize if stop is None else stop
        if stop <= start:
            return
        buffer = np.empty(min(block_elements, stop - start), dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for first in range(start, stop, block_elements):
                block = slice(first, min(first + block_elements, stop))
                yield block, self._read_into(fd, name, first, buffer[:block.stop - first])
        finally:
            os.close(fd)

    def _read_into(self, fd: int, name: str, start: int, out: np.ndarray) -> np.ndarray:
        e = self._entries[name]
        dtype = np.dtype(e["dtype"]).newbyteorder("<")
        if out.dtype != dtype or not out.flags.c_contiguous or not 0 <= start <= start + out.size <= \
                e["nbytes"] // dtype.itemsize:
            raise ValueError(f"{self.path}: cannot read {out.size} {out.dtype} elements of {name!r} from {start}")
        view = memoryview(out.reshape(-1).view(np.uint8)).cast("B")
        offset, done = e["offset"] + start * dtype.itemsize, 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:  # the footer said the data is there: the file changed under this reader
                raise OSError(errno.EIO, f"{self.path} ended early at byte {offset + done}: it changed while read")
            done += n
        return out

    def iter_chunks(self, names: Iterable[str] | None = None, chunk_bytes: int = CHUNK_BYTES) -> Iterator[TensorChunk]:
        """Stream tensors straight from disk, one chunk in memory at a time.

        The file is opened now, not at the first chunk, so the stream survives the file
        being replaced or removed afterwards.
        """
        return self._chunks(open(self.path, "rb"), list(names) if names is not None else list(self._entries),
                            chunk_bytes)

    def _chunks(self, f, names: list[str], chunk_bytes: int) -> Iterator[TensorChunk]:
        with f:
            for name in names:
                e = self._entries[name]
                spec = _spec_of_entry(e)
                f.seek(e["offset"])
                first = True
                offset = 0
                while first or offset < e["nbytes"]:
                    data = f.read(min(chunk_bytes, e["nbytes"] - offset))
                    yield TensorChunk(name=name, offset=offset, data=data, spec=spec if first else None)
                    offset += len(data)
                    first = False


def _spec_of_entry(entry: dict) -> TensorSpec:
    """A model file footer entry's spec (files written before encodings existed have none)."""
    e = entry.get("encoding")
    encoding = None if e is None else Encoding(e["codec"], e["dtype"], bool(e["delta"]), tuple(e["scale"]),
                                               tuple(e["zero_point"]))
    return TensorSpec(entry["name"], entry["dtype"], tuple(entry["shape"]), encoding)


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
