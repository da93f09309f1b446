"""The round-model cache: made once per file, made again for a new file at the same path, bounded in bytes."""
from __future__ import annotations

import os

from fedjax_core.director.model_cache import RoundModelCache


def test_made_once_per_file_and_again_when_the_file_is_replaced(tmp_path):
    cache, made = RoundModelCache(1000), []
    path = tmp_path / "model_round_0.fjm"
    path.write_bytes(b"first")

    def make(p):
        made.append(p.read_bytes())
        return p.read_bytes(), 10

    assert cache.get("exp", path, make) == b"first"
    assert cache.get("exp", path, make) == b"first" and made == [b"first"]
    replacement = tmp_path / "new.fjm"  # an experiment submitted again under the name: a new file, same path
    replacement.write_bytes(b"second")
    os.replace(replacement, path)
    assert cache.get("exp", path, make) == b"second" and made == [b"first", b"second"]
    assert cache.nbytes == 10


def test_bounded_in_bytes_least_recently_used_first_out(tmp_path):
    cache = RoundModelCache(25)
    paths = {}
    for name in "abc":
        paths[name] = tmp_path / f"{name}.fjm"
        paths[name].write_bytes(name.encode())
    made = []

    def make(p):
        made.append(p.name)
        return p.read_bytes(), 10

    cache.get("a", paths["a"], make)
    cache.get("b", paths["b"], make)
    cache.get("a", paths["a"], make)  # a used last: b goes first
    cache.get("c", paths["c"], make)
    assert cache.nbytes == 20
    cache.get("a", paths["a"], make)
    cache.get("b", paths["b"], make)
    assert made == ["a.fjm", "b.fjm", "c.fjm", "b.fjm"]
    too_big = RoundModelCache(5)
    assert too_big.get("a", paths["a"], make) == b"a" and too_big.nbytes == 0  # returned, not kept
    cache.drop("a")
    assert cache.nbytes <= 20


def test_kept_reads_nothing_and_tells_only_what_is_kept_for_that_file(tmp_path):
    cache, path = RoundModelCache(1000), tmp_path / "model_round_0.fjm"
    path.write_bytes(b"first")
    assert cache.kept("exp", path) is None  # not made yet, and kept() makes nothing
    cache.get("exp", path, lambda p: (p.read_bytes(), 5))
    assert cache.kept("exp", path) == (b"first",) and cache.kept("other", path) is None
    replacement = tmp_path / "new.fjm"
    replacement.write_bytes(b"second")
    os.replace(replacement, path)
    assert cache.kept("exp", path) is None  # another file at the same path
    path.unlink()
    assert cache.kept("exp", path) is None  # the round moved on and its file went
