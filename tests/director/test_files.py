"""fedjax_core.director.files: the best model is the round's model file under a second name; a closed round's large
update files are kept as spares for the next round's spools, never more than one round's."""
from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fedjax_core.director.files import ExperimentFiles
from fedjax_core.model_file import ModelFile, write_model_file


@pytest.fixture
def files(tmp_path):
    f = ExperimentFiles(tmp_path / "state")
    f.exp_dir("exp").mkdir(parents=True)
    for round_ in (1, 2):
        write_model_file(f.model("exp", round_), {"params/w": np.full(1000, round_, np.float32)})
    return f


def test_best_model_links_the_rounds_file_and_outlives_it(files):
    files.copy_best("exp", 1)
    assert os.path.samefile(files.best("exp"), files.model("exp", 1))  # no bytes copied
    files.copy_best("exp", 2)  # a better round replaces it
    assert os.path.samefile(files.best("exp"), files.model("exp", 2))
    files.drop_superseded("exp", 2)
    np.testing.assert_array_equal(ModelFile(files.best("exp")).read("params/w"), np.full(1000, 2, np.float32))
    assert not files.best("exp").with_suffix(".partial").exists()


def test_best_model_is_copied_where_the_filesystem_has_no_hard_links(files, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    files.copy_best("exp", 1)
    assert not os.path.samefile(files.best("exp"), files.model("exp", 1))
    np.testing.assert_array_equal(ModelFile(files.best("exp")).read("params/w"), np.full(1000, 1, np.float32))


def _update(files, round_, envoy, nbytes):
    path = files.update("exp", round_, envoy)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"u" * nbytes)
    return path


def test_a_closed_rounds_large_updates_become_spares_and_the_rest_is_deleted(files):
    big = [_update(files, 3, f"e{i}", 1 << 20) for i in range(3)]
    inodes = {p.stat().st_ino for p in big}
    _update(files, 3, "small", 1000)
    linked = _update(files, 3, "linked", 1 << 20)
    os.link(linked, files.exp_dir("exp") / "elsewhere.fjm")  # a file with a second name is never written over
    _update(files, 3, ".download-zstd", 1 << 20)
    files.retire_round("exp", 3)
    assert not files.round_dir("exp", 3).exists()
    taken = [files.take_spare("exp") for _ in range(4)]
    assert taken[3] is None and {p.stat().st_ino for p in taken[:3]} == inodes
    assert all(p.parent == files.incoming for p in taken[:3])  # each under a name of its own
    assert (files.exp_dir("exp") / "elsewhere.fjm").read_bytes() == b"u" * (1 << 20)


def test_spares_never_outlive_the_next_round_and_go_with_the_experiment(files):
    _update(files, 3, "a", 1 << 20)
    _update(files, 3, "b", 1 << 20)
    files.retire_round("exp", 3)
    assert files.take_spare("exp") is not None  # round 4 took one of the two
    _update(files, 4, "a", 2 << 20)
    files.retire_round("exp", 4)  # the one round 4 left is deleted, round 4's own file kept
    assert [p.stat().st_size for p in files.spare_dir("exp").iterdir()] == [2 << 20]
    files.drop_spares("exp")
    assert not files.spare_dir("exp").exists() and files.take_spare("exp") is None


def test_concurrent_spools_never_take_the_same_spare(files):
    for i in range(32):
        _update(files, 5, f"e{i}", 1 << 20)
    files.retire_round("exp", 5)
    with ThreadPoolExecutor(8) as pool:
        taken = list(pool.map(lambda _: files.take_spare("exp"), range(40)))
    got = [p for p in taken if p is not None]
    assert len(got) == 32 and len({p.stat().st_ino for p in got}) == 32


def test_spares_that_cannot_be_kept_are_deleted_and_the_round_closes_as_before(files, monkeypatch):
    _update(files, 6, "a", 1 << 20)
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    files.retire_round("exp", 6)  # no error: the files are deleted instead
    assert not files.round_dir("exp", 6).exists()
    monkeypatch.setattr(os, "replace", real)
    assert files.take_spare("exp") is None
