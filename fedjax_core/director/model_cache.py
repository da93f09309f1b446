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
        file = _identity(path)
        kept = self._lookup(experiment, file)
        if kept is not None:
            return kept[0]
        value, size = make(path)
        with self._lock:
            self._drop(experiment)
            if size <= self.max_bytes:
                self._kept[experiment] = (file, value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    self._drop(next(iter(self._kept)))
        return value

    def kept(self, experiment: str, path: Path) -> tuple[T] | None:
        """``(value,)`` when kept for ``experiment``'s ``path``; None when not (nothing is made: no file is read)."""
        try:
            return self._lookup(experiment, _identity(path))
        except FileNotFoundError:  # the round moved on and its file went: not kept
            return None

    def _lookup(self, experiment: str, file: tuple) -> tuple[T] | None:
        with self._lock:
            kept = self._kept.get(experiment)
            if kept is None or kept[0] != file:
                return None
            self._kept.move_to_end(experiment)
            return (kept[1],)

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


def _identity(path: Path) -> tuple:
    """A model file as the cache tells files apart: path, inode, size and modification time."""
    stat = os.stat(path)
    return path, stat.st_ino, stat.st_size, stat.st_mtime_ns
