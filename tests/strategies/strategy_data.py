"""Shared by tests/strategies: uploads of every leaf kind, rounds through the engine, and references."""
from __future__ import annotations

import numpy as np

from fedjax_core import strategies as s
from fedjax_core.aggregation import ArraySource, RoundUpdates, Upload, aggregate, init_state
from fedjax_core.tensors import spec_of
from fedjax_core.model_file import ModelFile, write_model_file

WEIGHTS = (10, 37, 1000, 5, 64)
PARAMS = {"params/conv/kernel": (3, 3, 3, 8), "params/conv/bias": (8,), "params/dense/kernel": (17, 5),
          "params/scalar": ()}
PARAM_NAMES = list(PARAMS) + ["params/half"]
STRATEGIES = [s.FedAvg(), s.FedAvgM(), s.FedAdam(), s.FedYogi(), s.FedAdagrad(), s.FedMedian(),
              s.FedTrimmedAvg(beta=0.2), s.Krum(num_malicious_clients=1, num_clients_to_keep=2)]


def make_updates(n: int = len(WEIGHTS), seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        u = {name: (rng.standard_normal(shape) * (k + 1)).astype(np.float32) for name, shape in PARAMS.items()}
        u["params/half"] = (rng.standard_normal((4, 6)) * 3).astype(np.float16)
        u["opt_state/trace"] = rng.standard_normal((7,)).astype(np.float32)  # float, but not params
        u["opt_state/step"] = np.asarray(rng.integers(0, 100), dtype=np.int32)
        u["opt_state/counts"] = rng.integers(-(2**40), 2**40, size=(5,), dtype=np.int64)
        u["opt_state/flags"] = rng.random((3, 2)) > 0.5
        out.append(u)
    return out


def make_global(seed: int = 99) -> dict[str, np.ndarray]:
    return {name: (a * 0.5).astype(a.dtype) for name, a in make_updates(1, seed)[0].items()}


def source(tensors):
    """A model file stays one; arrays become an ArraySource."""
    return tensors if isinstance(tensors, ModelFile) else ArraySource(tensors)


def specs_of(update):
    return update.specs if isinstance(update, ModelFile) else [spec_of(name, a) for name, a in update.items()]


def round_updates(uploads, weights=WEIGHTS, envoys=None) -> RoundUpdates:
    updates = RoundUpdates(specs_of(uploads[0]))
    for k, (u, w) in enumerate(zip(uploads, weights)):
        updates.add(Upload(envoys[k] if envoys else f"envoy{k}", float(w), source(u)))
    return updates


def run_round(strategy, uploads, weights=WEIGHTS, global_model=None, state=None):
    """One round through the engine, in memory: fold the uploads, then aggregate."""
    global_model = global_model if global_model is not None else make_global()
    state = init_state(strategy, specs_of(uploads[0])) if state is None else state
    return aggregate(strategy, source(state), source(global_model), round_updates(uploads, weights))


def run_rounds(strategy, n_rounds=3, weights=WEIGHTS):
    """Several rounds, each starting from the last round's model: returns [x_0, x_1, ...]."""
    x, state, models = make_global(), None, []
    models.append(x)
    for t in range(n_rounds):
        x, state = run_round(strategy, make_updates(len(weights), seed=t), weights, x, state)
        models.append(x)
    return models


def as_files(tmp_path, tensors_list, prefix) -> list[ModelFile]:
    paths = []
    for k, tensors in enumerate(tensors_list):
        write_model_file(tmp_path / f"{prefix}{k}.fjm", tensors)
        paths.append(ModelFile(tmp_path / f"{prefix}{k}.fjm"))
    return paths


def stack(updates, name):
    return np.stack([np.asarray(u[name], np.float64) for u in updates])


def weighted_mean(updates, name, weights=WEIGHTS):
    return np.average(stack(updates, name), axis=0, weights=np.asarray(weights[:len(updates)], np.float64))


def tolerance(name):
    return dict(rtol=2e-3, atol=2e-3) if name == "params/half" else dict(rtol=2e-5, atol=1e-6)


def assert_params(got, want):
    for name in PARAM_NAMES:
        np.testing.assert_allclose(np.asarray(got[name], np.float64), want[name], err_msg=name, **tolerance(name))


def assert_same_bytes(got, want, what=""):
    assert list(got) == list(want), what
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), f"{what} {name}"
