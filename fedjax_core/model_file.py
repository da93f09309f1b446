"""The model file format: a model as it rests on disk.

The tensors' raw bytes one after another, then a JSON footer listing each tensor's spec and
offset, then the footer's length (8 bytes, little endian). Writing streams front to back and
lands atomically (:class:`ModelFileWriter`); reading either maps a tensor lazily
(:meth:`ModelFile.array`) or reads it block by block into one reused buffer
(:meth:`ModelFile.blocks`), which leaves nothing of the file resident in the reader; nothing
here ever unpickles.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from fedjax_core.records import Encoding, TensorChunk, TensorSpec
from fedjax_core.tensors import (CHUNK_BYTES, TensorError, check_finite, check_spec, decoded_dtype, is_float_dtype,
                                 nbytes_of, spec_of)

BLOCK_ELEMENTS = 1 << 18  # elements per block read: 1 MiB of float32
WRITEBACK_BYTES = 16 << 20  # a writer has the disk writes of every 16 MiB begin at once, so commit's fsync waits less
_MAGIC = b"FJXMODEL1\n"
_FOOTER_LEN = struct.Struct("<Q")


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


def _filesystem_syncer():
    """``sync(fd)``: write back everything the filesystem holding ``fd`` has not yet made durable, in one journal
    commit (Linux ``syncfs``), raising OSError as fsync does; None where there is no such call."""
    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int]

    def sync(fd: int) -> None:
        if call(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    return sync


_sync_filesystem = _filesystem_syncer()


class ModelFileWriter:
    """Writes a model file front to back from whole arrays or streamed chunks, atomically.

    Chunks are checked against ``expected`` specs when given: unknown names, wrong dtype or
    shape, out-of-order offsets, overlong data and missing tensors all raise TensorError.
    ``finite_only``: float values must be finite, checked as they arrive (no second pass over
    the file); one NaN or infinity raises TensorError naming the tensor. ``reuse``: a file nothing else
    reads or links to (see ExperimentFiles.take_spare), written over instead of a new one: its pages in
    the page cache are reused, where a new file's are allocated afresh.
    """

    def __init__(self, path: Path, expected: Mapping[str, TensorSpec] | None = None, finite_only: bool = False,
                 reuse: Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._file = None
        if reuse is not None:  # written over from the start and cut to length at commit: its cached pages serve again
            try:
                os.replace(reuse, self._tmp)
                self._file = open(self._tmp, "r+b")
            except OSError:  # gone or unusable: a new file, as without it
                pass
        if self._file is None:
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
            "offset": self._position, "nbytes": nbytes_of(spec), "received": 0,
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

    def commit(self, sync_folder: bool = True, sync: bool = True) -> list[TensorSpec]:
        """Check completeness, write the footer and move the file into place. ``sync_folder=False`` leaves the
        new name's durability to the caller, who moves the file on and syncs the folder it ends up in;
        ``sync=False`` leaves the data's too (the caller :func:`fsync_file` s it, with others at once)."""
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
        self._file.truncate()  # a reused file may have been longer
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        if sync_folder:
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


def fsync_file(path: Path) -> None:
    """Make a file's data durable (written by a writer told not to sync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(paths: Sequence[Path]) -> list[OSError | None]:
    """Make several files' data durable at once; for each, None or the error that kept it from the disk.

    One ``syncfs`` of each folder's filesystem instead of a journal commit per file: 32 small files took 2 ms of
    CPU and 7 ms to sync one by one, 0.2 and 0.7 ms at once, on the 2-core VM of benchmarks/README.md. It also
    writes back whatever else that filesystem holds unsynced, so it waits on other writers' backlog (a large
    upload spooled meanwhile starts its writeback as it goes, which bounds it). Where there is no syncfs, or it
    fails, each file is synced on its own, so that an error names the file it kept from the disk."""
    if len(paths) > 1 and _sync_filesystem is not None:
        try:
            for folder in dict.fromkeys(path.parent for path in paths):
                fd = os.open(folder, os.O_RDONLY)
                try:
                    _sync_filesystem(fd)
                finally:
                    os.close(fd)
            return [None] * len(paths)
        except OSError:
            pass  # an error of this filesystem, perhaps another file's: each file's own sync tells
    errors: list[OSError | None] = []
    for path in paths:
        try:
            fsync_file(path)
            errors.append(None)
        except OSError as exc:
            errors.append(exc)
    return errors


def fsync_dir(path: Path) -> None:
    """Make a folder's new or renamed entries durable (a rename is only as safe as its folder)."""
    fsync_file(path)  # a folder opens read-only like a file, and syncs its entries


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


