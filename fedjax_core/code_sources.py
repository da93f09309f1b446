"""Tracebacks of shipped code that name the user's file and line, with the source line.

cloudpickle writes ``<dynamic-code>`` as the file name of every code object it pickles by value (the notebook's
functions, the user's modules), so a task that raised on an envoy showed ``File "<dynamic-code>", line 12``.
:func:`dumps` pickles as cloudpickle does but keeps each code object's file name and collects the source text
of those files (a notebook cell's too: IPython keeps it in ``linecache``); the bundle carries that text and
the worker hands it to ``linecache`` (:func:`install`), so its tracebacks show the user's file, line and code.
"""
from __future__ import annotations

import io
import linecache
import pickle
import types
from collections import ChainMap
from collections.abc import Mapping

import cloudpickle
from cloudpickle import cloudpickle as _cloudpickle

MAX_SOURCE_CHARS = 4 << 20  # source text a bundle carries at most; files beyond it travel without their text
_DYNAMIC = "<dynamic-code>"


class _Pickler(cloudpickle.Pickler):
    def __init__(self, file):
        self.sources: dict[str, str] = {}
        self._size = 0
        # before the base __init__, which reads the table once
        self.dispatch_table = ChainMap({types.CodeType: self._reduce_code}, cloudpickle.Pickler.dispatch_table)
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)

    def _reduce_code(self, code: types.CodeType):
        rebuild, args = _cloudpickle._code_reduce(code)
        filename = code.co_filename
        self._keep_source(filename)
        return rebuild, tuple(filename if isinstance(a, str) and a == _DYNAMIC else a for a in args)

    def _keep_source(self, filename: str) -> None:
        if filename in self.sources or self._size >= MAX_SOURCE_CHARS:
            return
        text = "".join(linecache.getlines(filename))
        if text and self._size + len(text) <= MAX_SOURCE_CHARS:
            self.sources[filename] = text
            self._size += len(text)


def dumps(obj: object) -> tuple[bytes, dict[str, str]]:
    """``cloudpickle.dumps(obj)`` keeping the code's file names; also the source text of those files. With a
    cloudpickle whose internals differ (no ``_code_reduce``), plain ``cloudpickle.dumps`` and no sources."""
    if not hasattr(_cloudpickle, "_code_reduce"):
        return cloudpickle.dumps(obj), {}
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.sources


def install(sources: Mapping[str, str]) -> None:
    """Make ``linecache`` (and so every traceback) read the shipped files' text: the code that runs is the
    shipped code, even where this machine has a file of the same name."""
    for filename, text in sources.items():
        if isinstance(filename, str) and isinstance(text, str):
            linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
