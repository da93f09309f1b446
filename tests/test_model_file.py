"""fsync_files: several files' data made durable with one filesystem sync, each file's own error where that fails;
a writer that reuses a file."""
from __future__ import annotations

import errno

import numpy as np
import pytest

from fedjax_core import model_file
from fedjax_core.model_file import ModelFile, ModelFileWriter, fsync_files, write_model_file


def _written(folder, names):
    paths = []
    for name in names:
        with model_file.ModelFileWriter(folder / name) as writer:
            writer.add_array("w", np.full(3, len(paths), np.float32))
            writer.commit(sync_folder=False, sync=False)
        paths.append(folder / name)
    return paths


def _count_syncs(monkeypatch):
    calls = {"filesystem": 0, "file": 0}
    filesystem, file = model_file._sync_filesystem, model_file.fsync_file
    if filesystem is not None:
        monkeypatch.setattr(model_file, "_sync_filesystem", lambda fd: calls.update(filesystem=calls["filesystem"] + 1)
                            or filesystem(fd))
    monkeypatch.setattr(model_file, "fsync_file", lambda path: calls.update(file=calls["file"] + 1) or file(path))
    return calls


@pytest.mark.skipif(model_file._sync_filesystem is None, reason="no syncfs on this system")
def test_several_files_take_one_filesystem_sync(tmp_path, monkeypatch):
    paths = _written(tmp_path, ["a.fjm", "b.fjm", "c.fjm"])
    calls = _count_syncs(monkeypatch)
    assert fsync_files(paths) == [None, None, None]
    assert calls == {"filesystem": 1, "file": 0}
    assert [ModelFile(p)["w"][0] for p in paths] == [0.0, 1.0, 2.0]


def test_one_file_takes_its_own_sync(tmp_path, monkeypatch):
    (path,) = _written(tmp_path, ["a.fjm"])
    calls = _count_syncs(monkeypatch)
    assert fsync_files([path]) == [None] and calls == {"filesystem": 0, "file": 1}
    assert fsync_files([]) == []


def test_a_failed_filesystem_sync_falls_back_to_each_file_and_names_the_one_that_failed(tmp_path, monkeypatch):
    paths = _written(tmp_path, ["a.fjm", "b.fjm"])

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    def fsync_but_b(path):
        if path.name == "b.fjm":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_file, "_sync_filesystem", failing)
    monkeypatch.setattr(model_file, "fsync_file", fsync_but_b)
    a, b = fsync_files(paths)
    assert a is None and isinstance(b, OSError) and b.errno == errno.ENOSPC


def test_without_syncfs_each_file_is_synced(tmp_path, monkeypatch):
    paths = _written(tmp_path, ["a.fjm", "b.fjm"])
    monkeypatch.setattr(model_file, "_sync_filesystem", None)
    calls = _count_syncs(monkeypatch)
    assert fsync_files(paths) == [None, None] and calls == {"filesystem": 0, "file": 2}


def test_the_real_syncfs_reports_a_bad_descriptor():
    if model_file._sync_filesystem is None:
        pytest.skip("no syncfs on this system")
    with pytest.raises(OSError) as caught:
        model_file._sync_filesystem(-1)
    assert caught.value.errno == errno.EBADF


@pytest.mark.parametrize("old_elements", [1 << 20, 10])  # a longer file and a shorter one
def test_a_writer_reusing_a_file_writes_over_it_and_cuts_it_to_length(tmp_path, old_elements):
    old = tmp_path / "old.fjm"
    write_model_file(old, {"params/old": np.full(old_elements, 7.0, np.float32)})
    inode = old.stat().st_ino
    new = {"params/w": np.arange(1000, dtype=np.float32), "params/b": np.ones(3, np.float64)}
    with ModelFileWriter(tmp_path / "new.fjm", reuse=old) as writer:
        for name, array in new.items():
            writer.add_array(name, array)
        writer.commit()
    assert not old.exists() and (tmp_path / "new.fjm").stat().st_ino == inode  # the same file, its pages reused
    fresh = tmp_path / "fresh.fjm"
    write_model_file(fresh, new)
    assert (tmp_path / "new.fjm").read_bytes() == fresh.read_bytes()  # byte for byte what a new file holds
    model = ModelFile(tmp_path / "new.fjm")
    assert model.names() == ["params/w", "params/b"]
    np.testing.assert_array_equal(model.read("params/w"), new["params/w"])


def test_a_writer_whose_file_to_reuse_is_gone_writes_a_new_one(tmp_path):
    with ModelFileWriter(tmp_path / "new.fjm", reuse=tmp_path / "gone.fjm") as writer:
        writer.add_array("params/w", np.ones(4, np.float32))
        writer.commit()
    np.testing.assert_array_equal(ModelFile(tmp_path / "new.fjm").read("params/w"), np.ones(4, np.float32))
