"""fedjax_core.director.files: the best model is the round's model file under a second name."""
from __future__ import annotations

import errno
import os

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
