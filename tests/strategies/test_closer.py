"""fedjax_core.director.closer: the next model and state files of a round, against the in-memory aggregate."""
from __future__ import annotations

import numpy as np
import pytest
from strategy_data import assert_same_bytes, make_global, make_updates, round_updates, specs_of

from fedjax_core import strategies as s
from fedjax_core.aggregation import ArraySource, RoundUpdates, Upload, aggregate, init_state
from fedjax_core.director import closer
from fedjax_core.director.files import ExperimentFiles
from fedjax_core.director.round_models import FileRoundModels
from fedjax_core.errors import PreconditionError
from fedjax_core.model_file import ModelFile, write_model_file

FROZEN = {"batch_stats/mean": np.arange(6, dtype=np.float32)}  # a tensor that does not travel


def setup_experiment(tmp_path, round_=0):
    files = ExperimentFiles(tmp_path / "state")
    files.exp_dir("exp").mkdir(parents=True)
    model = {**make_global(), **FROZEN}
    write_model_file(files.model("exp", round_), model)
    return files, model


def spooled(files, round_, seed):
    """The round's uploads as the director keeps them: spooled model files, folded into RoundUpdates."""
    uploads = make_updates(seed=seed)
    updates = RoundUpdates(specs_of(uploads[0]))
    for k, (u, w) in enumerate(zip(uploads, (3, 1, 4, 1, 5))):
        path = files.update("exp", round_, f"envoy{k}")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_model_file(path, u)
        updates.add(Upload(f"envoy{k}", float(w), ModelFile(path)))
    return uploads, updates


@pytest.mark.parametrize("strategy", [s.FedMedian(), s.FedAdam(eta=0.05), s.Krum(num_malicious_clients=1)],
                         ids=lambda x: x.name)
def test_two_rounds_write_the_models_and_states_the_in_memory_aggregate_gives(strategy, tmp_path):
    files, x = setup_experiment(tmp_path)
    state = init_state(strategy, specs_of(make_updates(1)[0]))
    for t in range(2):
        uploads, updates = spooled(files, t, seed=t)
        closer.write_next_model(FileRoundModels(files), "exp", t, strategy, updates)
        want_model, state = aggregate(strategy, ArraySource(state), ArraySource(x),
                                      round_updates(uploads, (3, 1, 4, 1, 5)))
        got = ModelFile(files.model("exp", t + 1)).arrays()
        assert_same_bytes({name: got[name] for name in want_model}, want_model)
        np.testing.assert_array_equal(got["batch_stats/mean"], FROZEN["batch_stats/mean"])  # copied as it was
        assert list(got) == list(x)  # in model_r's order
        assert_same_bytes(ModelFile(files.server_state("exp", t + 1)).arrays(), state)
        x = got
    assert bool(state) == strategy.stateful


def test_a_stateful_strategy_without_its_state_file_fails_clearly(tmp_path):
    files, _ = setup_experiment(tmp_path, round_=1)
    _, updates = spooled(files, 1, seed=1)
    with pytest.raises(PreconditionError, match="the strategy state of round 1 is missing .*server_state_round_0001"):
        closer.write_next_model(FileRoundModels(files), "exp", 1, s.FedAvgM(), updates)
    assert not files.model("exp", 2).exists()


def test_a_stateless_strategy_needs_no_state_file(tmp_path):
    files, x = setup_experiment(tmp_path, round_=1)
    uploads, updates = spooled(files, 1, seed=1)
    closer.write_next_model(FileRoundModels(files), "exp", 1, s.FedAvg(), updates)
    want, _ = aggregate(s.FedAvg(), ArraySource({}), ArraySource(x), round_updates(uploads, (3, 1, 4, 1, 5)))
    got = ModelFile(files.model("exp", 2)).arrays()
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    assert ModelFile(files.server_state("exp", 2)).names() == []


def test_the_initial_state_is_zeros_beside_the_params_only(tmp_path):
    files, _ = setup_experiment(tmp_path)
    specs = specs_of(make_updates(1)[0])
    closer.write_initial_state(FileRoundModels(files), "exp", 1, s.FedAdam(), specs)
    state = ModelFile(files.server_state("exp", 1)).arrays()
    params = [spec.name for spec in specs if spec.name.startswith("params/")]
    assert sorted(state) == sorted(f"{slot}/{name}" for slot in ("m", "v") for name in params)
    assert all(not a.any() for a in state.values())
    closer.write_initial_state(FileRoundModels(files), "exp", 2, s.FedMedian(), specs)
    assert ModelFile(files.server_state("exp", 2)).names() == []
