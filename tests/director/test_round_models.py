"""fedjax_core.director.round_models: a round closed on the model files and in memory gives the same arrays, equal
to numpy references (FedAvg's weighted mean, FedAdam's step over two rounds), and the memory writer keeps the file
writer's checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedjax_core import strategies as s
from fedjax_core.aggregation import ArraySource, RoundUpdates, Upload
from fedjax_core.director import closer
from fedjax_core.director.files import ExperimentFiles
from fedjax_core.director.round_models import FileRoundModels, MemoryRoundModels, RoundModels
from fedjax_core.errors import PreconditionError
from fedjax_core.tensors import TensorError, spec_of
from fedjax_core.model_file import ModelFile, write_model_file

WEIGHTS = {"cat": 3.0, "amy": 10.0, "bob": 1.0}  # arrival order differs from name order on purpose
FROZEN = "batch_stats/mean"  # in the model, never uploaded: copied as it is


def initial_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"params/w": rng.standard_normal((3, 4)).astype(np.float32),
            "params/b": rng.standard_normal(5).astype(np.float32),
            "opt_state/trace": rng.standard_normal(6).astype(np.float32),  # float, not params: the weighted mean
            "step": np.array(4, np.int32),  # an integer: the maximum
            FROZEN: np.arange(6, dtype=np.float32)}


def uploads(round_: int) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for k, envoy in enumerate(WEIGHTS):
        rng = np.random.default_rng([k, round_])
        out[envoy] = {name: (rng.standard_normal(a.shape) * (k + 1)).astype(a.dtype) if a.dtype.kind == "f"
                      else np.array(round_ * 10 + k, a.dtype)
                      for name, a in initial_model().items() if name != FROZEN}
    return out


def round_updates(round_: int) -> RoundUpdates:
    ups = uploads(round_)
    updates = RoundUpdates([spec_of(name, a) for name, a in next(iter(ups.values())).items()])
    for envoy, tensors in ups.items():
        updates.add(Upload(envoy, WEIGHTS[envoy], ArraySource(tensors)))
    return updates


def mean_reference(round_: int, name: str) -> np.ndarray:
    """Σ w·x / Σ w in float64, summed in envoy-name order as the engine does."""
    ups = uploads(round_)
    acc = None
    for envoy in sorted(ups):
        term = ups[envoy][name].astype(np.float64) * WEIGHTS[envoy]
        acc = term if acc is None else acc + term
    return acc / sum(WEIGHTS.values())


def arrays(source) -> dict[str, np.ndarray]:
    """Every tensor of a model source, read whole, in its order."""
    out = {}
    for spec in source.specs:
        flat = np.empty(math.prod(spec.shape), np.dtype(spec.dtype).newbyteorder("<"))
        out[spec.name] = source.read_into(spec.name, 0, flat).reshape(spec.shape)
    return out


@pytest.fixture
def both(tmp_path) -> dict[str, RoundModels]:
    """The file-backed and the in-memory models, each holding the same round-0 model."""
    files = ExperimentFiles(tmp_path / "state")
    models: dict[str, RoundModels] = {"files": FileRoundModels(files), "memory": MemoryRoundModels()}
    for shelf in models.values():
        with shelf.model_writer("exp", 0) as writer:
            for name, a in initial_model().items():
                writer.add_array(name, a)
            writer.commit()
    return models


def close_round(models: RoundModels, round_: int, strategy: s.Strategy) -> tuple[dict, dict]:
    closer.write_next_model(models, "exp", round_, strategy, round_updates(round_))
    return arrays(models.model("exp", round_ + 1)), arrays(models.state("exp", round_ + 1))


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def test_a_fedavg_round_is_the_weighted_mean_on_files_and_in_memory(both):
    results = {kind: close_round(models, 0, s.FedAvg()) for kind, models in both.items()}
    (model, state), (model_in_memory, state_in_memory) = results["files"], results["memory"]
    assert_same(model, model_in_memory)
    assert state == state_in_memory == {}  # FedAvg keeps no state
    assert list(model) == list(initial_model())  # model_r's order
    for name in ("params/w", "params/b", "opt_state/trace"):
        np.testing.assert_array_equal(model[name], mean_reference(0, name).astype(np.float32))
    assert model["step"] == max(u["step"] for u in uploads(0).values())
    np.testing.assert_array_equal(model[FROZEN], initial_model()[FROZEN])


def test_the_file_backed_models_are_the_bytes_a_plain_model_file_holds(both, tmp_path):
    model, _ = close_round(both["files"], 0, s.FedAvg())
    write_model_file(tmp_path / "reference.fjm", model)
    written = both["files"].files.model("exp", 1)
    assert written.read_bytes() == (tmp_path / "reference.fjm").read_bytes()
    assert not list(written.parent.glob("*.partial"))  # written aside, then renamed


def fedadam_reference(x: dict, m: dict, v: dict, round_: int, opt: s.FedAdam) -> tuple[dict, dict, dict]:
    """One FedAdam step on the params in float64 (Reddi et al., no bias correction); m and v kept in float32."""
    x_new, m_new, v_new = {}, {}, {}
    for name in ("params/w", "params/b"):
        x64 = x[name].astype(np.float64)
        delta = mean_reference(round_, name) - x64
        m64 = opt.beta_1 * m[name].astype(np.float64) + (1 - opt.beta_1) * delta
        v64 = opt.beta_2 * v[name].astype(np.float64) + (1 - opt.beta_2) * delta ** 2
        x_new[name] = (x64 + opt.eta * m64 / (np.sqrt(v64) + opt.tau)).astype(np.float32)
        m_new[name], v_new[name] = m64.astype(np.float32), v64.astype(np.float32)
    return x_new, m_new, v_new


def test_fedadam_over_two_rounds_keeps_the_same_state_on_files_and_in_memory(both):
    opt = s.FedAdam(eta=0.05)
    x = initial_model()
    m = {name: np.zeros_like(x[name]) for name in ("params/w", "params/b")}
    v = dict(m)
    for round_ in range(2):
        results = {kind: close_round(models, round_, opt) for kind, models in both.items()}
        (model, state), (model_in_memory, state_in_memory) = results["files"], results["memory"]
        assert_same(model, model_in_memory)
        assert_same(state, state_in_memory)
        assert sorted(state) == sorted(f"{slot}/params/{leaf}" for slot in ("m", "v") for leaf in ("w", "b"))
        x_want, m, v = fedadam_reference(x, m, v, round_, opt)
        for name in x_want:
            np.testing.assert_allclose(model[name], x_want[name], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(state[f"m/{name}"], m[name], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(state[f"v/{name}"], v[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(model["opt_state/trace"], mean_reference(round_, "opt_state/trace")
                                      .astype(np.float32))
        x = model
    assert not np.allclose(x["params/w"], initial_model()["params/w"])  # the step moved the params


def test_the_initial_state_is_the_same_zeros_on_both(both):
    specs = [spec_of(name, a) for name, a in initial_model().items()]
    for models in both.values():
        closer.write_initial_state(models, "exp", 1, s.FedAdam(), specs)
    on_files, in_memory = (arrays(models.state("exp", 1)) for models in both.values())
    assert_same(on_files, in_memory)
    assert sorted(in_memory) == ["m/params/b", "m/params/w", "v/params/b", "v/params/w"]
    assert not any(a.any() for a in in_memory.values())


@pytest.mark.parametrize("kind", ["files", "memory"])
def test_a_missing_state_is_none_and_fails_a_stateful_strategy_only(both, kind):
    models = both[kind]
    with models.model_writer("exp", 1) as writer:  # round 1 without a state
        for name, a in initial_model().items():
            writer.add_array(name, a)
        writer.commit()
    assert models.state("exp", 1) is None
    where = "server_state_round_0001.fjm" if kind == "files" else "in memory: experiment 'exp', round 1"
    with pytest.raises(PreconditionError, match=f"the strategy state of round 1 is missing \\(.*{where}"):
        closer.write_next_model(models, "exp", 1, s.FedAvgM(), round_updates(1))
    with pytest.raises(FileNotFoundError):
        models.model("exp", 2)  # nothing was put in place
    closer.write_next_model(models, "exp", 1, s.FedAvg(), round_updates(1))  # a stateless one needs none
    np.testing.assert_array_equal(arrays(models.model("exp", 2))["params/b"],
                                  mean_reference(1, "params/b").astype(np.float32))


@pytest.mark.parametrize("kind", ["files", "memory"])
def test_a_writer_refuses_what_the_file_format_refuses(both, kind):
    models = both[kind]
    with pytest.raises(TensorError, match="sent twice"):
        with models.model_writer("exp", 1) as writer:
            writer.add_array("a", np.zeros(3, np.float32))
            writer.add_array("a", np.zeros(3, np.float32))
    with pytest.raises(TensorError, match="block 2:4"):
        with models.model_writer("exp", 1) as writer:
            writer.add_blocks("a", "float32", (4,), iter([(slice(2, 4), np.ones(2, np.float32))]))
    with pytest.raises(TensorError):
        with models.model_writer("exp", 1) as writer:
            writer.add_blocks("a", "float32", (4,), iter([(slice(0, 2), np.ones(2, np.float32))]))
            writer.commit()  # two of four values
    with pytest.raises(FileNotFoundError):
        models.model("exp", 1)  # an aborted writer leaves nothing behind


def test_memory_keeps_its_own_copy_of_what_it_was_given():
    models = MemoryRoundModels()
    given = np.arange(4, dtype=np.float32)
    buffer = np.zeros(2, np.float32)

    def reused():  # a producer that reuses one buffer, as the closer's blocks do
        for start in (0, 2):
            buffer[...] = given[start:start + 2]
            yield slice(start, start + 2), buffer

    with models.model_writer("exp", 0) as writer:
        writer.add_array("a", given)
        writer.add_blocks("b", "float32", (2, 2), reused())
        writer.copy_tensor(ArraySource({"c": given}), "c")
        assert writer.commit() == [spec_of("a", given), spec_of("b", given.reshape(2, 2)), spec_of("c", given)]
    given[...] = -1
    got = arrays(models.model("exp", 0))
    np.testing.assert_array_equal(got["a"], [0, 1, 2, 3])
    np.testing.assert_array_equal(got["b"], [[0, 1], [2, 3]])
    np.testing.assert_array_equal(got["c"], [0, 1, 2, 3])


def test_file_backed_models_read_what_the_director_wrote(tmp_path):
    files = ExperimentFiles(tmp_path / "state")
    write_model_file(files.model("exp", 3), initial_model())
    models = FileRoundModels(files)
    assert isinstance(models.model("exp", 3), ModelFile)
    assert_same(arrays(models.model("exp", 3)), initial_model())
