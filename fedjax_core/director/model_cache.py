"""A round's model as participants fetch it, made once and kept while that file is the round's model.

Every participant of a round fetches the same tensors, so the director reads (and packs, and
serializes) them once instead of once per envoy. Bounded in bytes over all experiments, least
recently used first out, so the director's memory stays within a model's worth plus this bound.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class RoundModelCache(Generic[T]):
    """One value per experiment, made by ``make(path)`` from its round's model file, kept while the experiment
    asks for that same file (its path, inode, size and modification time: an experiment submitted again under
    a name writes new files at the same paths); at most ``max_bytes`` over all experiments (``make`` says a
    value's size)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._kept: OrderedDict[str, tuple[tuple, T, int]] = OrderedDict()  # experiment: (file, value, bytes)
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, experiment: str, path: Path, make: Callable[[Path], tuple[T, int]]) -> T:
        """The value for ``experiment``'s ``path``: kept, or made now (outside the lock: it reads the file)."""
        stat = os.stat(path)
        file = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            kept = self._kept.get(experiment)
            if kept is not None and kept[0] == file:
                self._kept.move_to_end(experiment)
                return kept[1]
        value, size = make(path)
        with self._lock:
            self._drop(experiment)
            if size <= self.max_bytes:
                self._kept[experiment] = (file, value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    self._drop(next(iter(self._kept)))
        return value

    def drop(self, experiment: str) -> None:
        with self._lock:
            self._drop(experiment)

    def _drop(self, experiment: str) -> None:
        kept = self._kept.pop(experiment, None)
        if kept is not None:
            self._bytes -= kept[2]

    @property
    def nbytes(self) -> int:
        return self._bytes
