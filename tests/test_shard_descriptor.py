"""Tests for fedjax_core.shard_descriptor: datasets, the dummy shard and config loading."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedjax_core.shard_descriptor import (
    ArrayDataset,
    DummyShardDescriptor,
    ShardDescriptor,
    load_shard_descriptor,
    normalize_split_name,
)


# --- ArrayDataset ---------------------------------------------------------------


def test_array_dataset_len_and_items():
    samples = np.arange(12, dtype=np.float32).reshape(4, 3)
    targets = np.array([7, 8, 9, 10], dtype=np.int32)
    dataset = ArrayDataset(samples, targets)

    assert len(dataset) == 4
    sample, target = dataset[1]
    np.testing.assert_array_equal(sample, [3.0, 4.0, 5.0])
    # A scalar label comes back as a 1-element array, matching target_shape ['1'].
    assert target.shape == (1,)
    assert target.dtype == np.int32
    assert int(target[0]) == 8


def test_array_dataset_negative_index_and_iteration():
    dataset = ArrayDataset(np.arange(3), np.array([10, 11, 12]))
    sample, target = dataset[-1]
    assert int(sample) == 2 and int(target[0]) == 12
    assert [int(t[0]) for _, t in dataset] == [10, 11, 12]


def test_array_dataset_keeps_non_scalar_targets():
    dataset = ArrayDataset(np.zeros((2, 5)), np.ones((2, 1), dtype=np.int32))
    assert dataset[0][1].shape == (1,)


@pytest.mark.parametrize("index", [3, -4, 100])
def test_array_dataset_index_out_of_range(index):
    dataset = ArrayDataset(np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(IndexError, match="out of range"):
        dataset[index]


def test_array_dataset_rejects_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        ArrayDataset(np.zeros((3, 2)), np.zeros(2))


# --- split names ----------------------------------------------------------------


def test_normalize_split_name():
    assert normalize_split_name("train") == "train"
    assert normalize_split_name("valid") == "valid"
    assert normalize_split_name("val") == "valid"
    with pytest.raises(ValueError, match="'train' and 'valid'"):
        normalize_split_name("test")


# --- DummyShardDescriptor ---------------------------------------------------------


def test_dummy_shard_descriptor_from_string_shapes():
    descriptor = DummyShardDescriptor(["32", "32", "3"], ["1"], size=10)

    assert isinstance(descriptor, ShardDescriptor)
    assert descriptor.sample_shape == ["32", "32", "3"]
    assert descriptor.target_shape == ["1"]
    assert descriptor.split_sizes() == {"train": 10, "valid": 10}

    split = descriptor.get_split("train")
    assert split["image"].shape == (10, 32, 32, 3) and split["image"].dtype == np.float32
    assert split["label"].shape == (10, 1) and split["label"].dtype == np.int32
    assert not split["image"].any()

    sample, target = descriptor.get_dataset("train")[0]
    assert sample.shape == (32, 32, 3)
    assert target.shape == (1,)


def test_dummy_shard_descriptor_int_shapes_and_val_alias():
    descriptor = DummyShardDescriptor([28, 28], [1], size=4)
    assert descriptor.sample_shape == ["28", "28"]
    assert len(descriptor.get_dataset("val")) == 4
    assert descriptor.get_split("val")["image"].shape == (4, 28, 28)


def test_dummy_shard_descriptor_rejects_unknown_split():
    descriptor = DummyShardDescriptor(["2"], ["1"], size=1)
    with pytest.raises(ValueError, match="accepted names"):
        descriptor.get_split("test")


@pytest.mark.parametrize("shape", [["a"], ["0"], "32", [-1]])
def test_dummy_shard_descriptor_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="sample_shape"):
        DummyShardDescriptor(shape, ["1"], size=1)


def test_default_split_sizes_uses_get_split():
    class Tiny(ShardDescriptor):
        def get_split(self, name):
            n = {"train": 5, "valid": 2}[normalize_split_name(name)]
            return {"image": np.zeros((n, 2)), "label": np.zeros(n)}

        sample_shape = property(lambda self: ["2"])
        target_shape = property(lambda self: ["1"])
        dataset_description = property(lambda self: "tiny")

    assert Tiny().split_sizes() == {"train": 5, "valid": 2}


# --- load_shard_descriptor ------------------------------------------------------


@pytest.fixture
def isolated_imports(monkeypatch):
    """Restore sys.path and forget the tiny_* test modules afterwards, so tests don't leak."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [name for name in sys.modules if name.startswith("tiny_")]:
        del sys.modules[name]


GOOD_MODULE = """
    import numpy as np
    from fedjax_core.shard_descriptor import ShardDescriptor

    class TinyShard(ShardDescriptor):
        def __init__(self, size, base_dir=None):
            self.size = size
            self.base_dir = base_dir

        def get_split(self, name):
            return {"image": np.zeros((self.size, 2), np.float32),
                    "label": np.zeros(self.size, np.int32)}

        @property
        def sample_shape(self):
            return ["2"]

        @property
        def target_shape(self):
            return ["1"]

        @property
        def dataset_description(self):
            return "tiny"

    class NoBaseDir(TinyShard):
        def __init__(self, size):
            super().__init__(size)

    class NotADescriptor:
        pass
"""


def _write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


def test_load_shard_descriptor_happy_path(tmp_path, isolated_imports):
    _write_module(tmp_path, "tiny_shard_ok", GOOD_MODULE)

    descriptor = load_shard_descriptor("tiny_shard_ok.TinyShard", {"size": 3}, tmp_path)

    assert isinstance(descriptor, ShardDescriptor)
    assert descriptor.split_sizes() == {"train": 3, "valid": 3}
    # The constructor accepts base_dir, so it gets the config folder.
    assert descriptor.base_dir == tmp_path.resolve()


def test_load_shard_descriptor_without_base_dir_param(tmp_path, isolated_imports):
    _write_module(tmp_path, "tiny_shard_nobase", GOOD_MODULE)
    descriptor = load_shard_descriptor("tiny_shard_nobase.NoBaseDir", {"size": 2}, tmp_path)
    assert descriptor.base_dir is None


def test_load_shard_descriptor_dotted_module(tmp_path, isolated_imports):
    package = tmp_path / "tiny_pkg_dotted"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _write_module(package, "shards", GOOD_MODULE)

    descriptor = load_shard_descriptor("tiny_pkg_dotted.shards.TinyShard", {"size": 1}, tmp_path)
    assert len(descriptor.get_dataset("train")) == 1


def test_load_shard_descriptor_missing_module(tmp_path, isolated_imports):
    with pytest.raises(ImportError) as info:
        load_shard_descriptor("no_such_shard_module.Foo", {}, tmp_path)
    message = str(info.value)
    assert "shard_descriptor.template 'no_such_shard_module.Foo'" in message
    assert "no module named 'no_such_shard_module'" in message
    assert str(tmp_path.resolve()) in message


def test_load_shard_descriptor_module_with_missing_dependency(tmp_path, isolated_imports):
    _write_module(tmp_path, "tiny_shard_dep", "import no_such_dependency_xyz\n")
    with pytest.raises(ImportError, match="no_such_dependency_xyz"):
        load_shard_descriptor("tiny_shard_dep.Foo", {}, tmp_path)


def test_load_shard_descriptor_missing_class(tmp_path, isolated_imports):
    _write_module(tmp_path, "tiny_shard_noclass", GOOD_MODULE)
    with pytest.raises(ValueError, match="has no class 'Missing'") as info:
        load_shard_descriptor("tiny_shard_noclass.Missing", {}, tmp_path)
    assert "'tiny_shard_noclass.Missing'" in str(info.value)


def test_load_shard_descriptor_not_a_subclass(tmp_path, isolated_imports):
    _write_module(tmp_path, "tiny_shard_notsub", GOOD_MODULE)
    with pytest.raises(ValueError, match="is not a ShardDescriptor subclass"):
        load_shard_descriptor("tiny_shard_notsub.NotADescriptor", {}, tmp_path)


def test_load_shard_descriptor_bad_params(tmp_path, isolated_imports):
    _write_module(tmp_path, "tiny_shard_params", GOOD_MODULE)
    with pytest.raises(ValueError) as info:
        load_shard_descriptor("tiny_shard_params.TinyShard", {"sise": 3}, tmp_path)
    message = str(info.value)
    assert message.startswith("shard_descriptor.params do not fit TinyShard(")
    assert "sise" in message  # the original TypeError text is kept


@pytest.mark.parametrize("template", ["NoDot", ".Foo", "module.", ""])
def test_load_shard_descriptor_bad_template(tmp_path, template):
    with pytest.raises(ValueError, match="module.ClassName"):
        load_shard_descriptor(template, {}, tmp_path)


def test_shard_descriptor_module_imports_only_stdlib_and_numpy():
    """The envoy daemon loads descriptors without JAX; keep this module light."""
    import ast
    import fedjax_core.shard_descriptor as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"numpy"}
    assert imported <= allowed, f"non-stdlib imports: {sorted(imported - allowed)}"


# --- what an envoy registers -------------------------------------------------------


class Described(ShardDescriptor):
    def __init__(self, **values):
        self.values = values

    def get_split(self, name):
        return {"image": np.zeros((2, 2)), "label": np.zeros(2)}

    sample_shape = property(lambda self: self.values.get("sample_shape", ["32", "32", "3"]))
    target_shape = property(lambda self: self.values.get("target_shape", ["1"]))
    dataset_description = property(lambda self: self.values.get("description", "a shard"))

    def split_sizes(self):
        return self.values.get("sizes", {"train": 10, "valid": 2})

    def label_counts(self):
        return self.values.get("counts", [6, 4])


def test_checked_description_takes_numpy_counts_and_int_shapes():
    from fedjax_core.shard_descriptor import checked_description

    described = checked_description(Described(sample_shape=[32, 32, np.int64(3)], counts=np.array([6, 4]),
                                              sizes={"train": np.int64(10), "valid": 2}))
    assert described == {"description": "a shard", "sample_shape": ("32", "32", "3"), "target_shape": ("1",),
                         "train_size": 10, "valid_size": 2, "label_counts": (6, 4)}


@pytest.mark.parametrize("values, message", [
    ({"counts": {0: 6, 1: 4}}, r"Described.label_counts\(\) returned \{0: 6, 1: 4\} \(dict\)"),
    ({"counts": [6.5, 4]}, r"label_counts\(\) returned \[6.5, 4\]"),
    ({"counts": [True, 4]}, r"label_counts\(\) returned \[True, 4\]"),
    ({"sample_shape": "32,32,3"}, r"Described.sample_shape returned '32,32,3' \(str\); it must return a list of "
                                  r"positive sizes as strings"),
    ({"target_shape": ["1.5"]}, r"Described.target_shape returned \['1.5'\]"),
    ({"sizes": {"train": 10}}, r"Described.split_sizes\(\) returned \{'train': 10\} \(dict\)"),
    ({"sizes": {"train": -1, "valid": 2}}, r"split_sizes\(\) returned"),
    ({"description": None}, r"Described.dataset_description returned None \(NoneType\); it must return a str"),
])
def test_checked_description_names_the_method_that_returned_a_value_it_cannot_use(values, message):
    from fedjax_core.shard_descriptor import checked_description

    with pytest.raises(ValueError, match=message):
        checked_description(Described(**values))
