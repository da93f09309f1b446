"""Keeping the director's resident memory near one model's worth (glibc only; a no-op elsewhere).

Uploads arrive on many gRPC threads; glibc gives each thread its own malloc arena and keeps
what is freed there, so without these the resident size grows with the number of envoys
even though no update is held (see benchmarks/README.md). And glibc raises its mmap threshold
each time a large block is freed (up to 32 MiB), after which messages of a few MiB are carved
from the heap and their holes stay resident: `make fuzz` grew the director by 70 MiB of such
holes while Python's own objects stayed flat (tracemalloc). A fixed threshold keeps every block
of 1 MiB or more mapped on its own and unmapped when freed.

Python's cycle collector is tuned too (:func:`tune_gc`): with its defaults it ran every 700
allocations and took 5% of the director's busy time with 256 envoys (py-spy, native frames).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 1 << 20
GC_THRESHOLDS = (20_000, 20, 20)  # allocations before a young collection; young, then middle, collections per older


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _load_libc()


def tune_allocator(arenas: int = 2) -> None:
    """Cap malloc arenas and fix the mmap threshold, before the server starts its threads."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, arenas)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Hand freed heap back to the OS, e.g. after a round's updates were read and dropped."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def tune_gc() -> None:
    """Once the server is up: move what start-up made (modules, protobuf descriptors, the server) out of the
    collector's sight for good, and collect young objects every GC_THRESHOLDS[0] allocations instead of 700.
    A call's short-lived objects are freed by reference counting; only cycles wait for a collection, and
    20,000 allocations' worth of them is a few MiB at most."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
