"""Shipped code keeps its file names and source lines, so a remote traceback points at the user's code."""
from __future__ import annotations

import linecache
import subprocess
import sys
import textwrap

import cloudpickle

from fedjax_core import code_sources

CELL = "/tmp/ipykernel_4242/cell_7.py"  # a notebook cell: its text lives only in the notebook's linecache
SOURCE = textwrap.dedent("""\
    def train(batch):
        scale = 2
        return len(batch) / (scale - 2)
""")

LOAD_AND_CALL = textwrap.dedent("""\
    import json, sys, traceback
    import cloudpickle
    from fedjax_core import code_sources
    payload, sources = bytes.fromhex(sys.argv[1]), json.loads(sys.argv[2])
    code_sources.install(sources)
    try:
        cloudpickle.loads(payload)([1.0])
    except ZeroDivisionError:
        print(traceback.format_exc())
""")


def cell_function():
    linecache.cache[CELL] = (len(SOURCE), None, SOURCE.splitlines(True), CELL)  # as IPython registers a cell
    namespace: dict = {"__name__": "__main__"}
    exec(compile(SOURCE, CELL, "exec"), namespace)
    return namespace["train"]


def traceback_elsewhere(payload: bytes, sources: dict[str, str]) -> str:
    import json

    return subprocess.run([sys.executable, "-c", LOAD_AND_CALL, payload.hex(), json.dumps(sources)],
                          capture_output=True, text=True, check=True, timeout=60).stdout


def test_a_traceback_in_another_process_names_the_cell_and_shows_its_line():
    payload, sources = code_sources.dumps(cell_function())
    assert sources == {CELL: SOURCE}
    text = traceback_elsewhere(payload, sources)
    assert f'File "{CELL}", line 3, in train' in text
    assert "return len(batch) / (scale - 2)" in text


def test_plain_cloudpickle_loses_both():
    """What this module fixes: cloudpickle alone names no file and shows no line."""
    text = traceback_elsewhere(cloudpickle.dumps(cell_function()), {})
    assert 'File "<dynamic-code>", line 3, in train' in text and "return len(batch)" not in text


def test_the_shipped_text_wins_over_a_stale_local_file_and_sources_are_bounded(tmp_path, monkeypatch):
    stale = tmp_path / "stale.py"
    stale.write_text("x = 1\n")
    linecache.getlines(str(stale))  # read (and cached) before the shipped text arrives
    code_sources.install({str(stale): "what ran\n", 3: "ignored"})
    assert linecache.getlines(str(stale)) == ["what ran\n"]
    monkeypatch.setattr(code_sources, "MAX_SOURCE_CHARS", 10)
    _, sources = code_sources.dumps(cell_function())
    assert sources == {}  # the cell's text is longer than the bound: the names travel, the text does not
