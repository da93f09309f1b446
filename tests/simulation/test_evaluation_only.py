"""rounds_to_train=0: every envoy validates the given model, the metrics are aggregated, nothing trains or uploads."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_core import FLExperiment, ModelInterface, Periodic, partition
from fedjax_core.privacy import CentralDP
from fedjax_core.records import Stage
from fedjax_core.simulation import SimulatedFederation
from fedjax_core.spec import SpecError
from linear_federation import Arrays, data, linear_state, tasks


@pytest.fixture
def fed():
    federation = SimulatedFederation.from_arrays(train=data(300, 0), valid=data(150, 1),
                                                 partition=partition.dirichlet(n_envoys=3, alpha=1.0, seed=0))
    yield federation
    federation.close()


def trained_elsewhere():
    """A model 'trained outside the federation': fixed weights that beat chance on the data."""
    state = linear_state()
    rng = np.random.default_rng(7)
    return state.replace(params={"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                                 "b": jnp.asarray([0.1, -0.2, 0.05], jnp.float32)})


def start(fed, name, model, **kwargs) -> FLExperiment:
    exp = FLExperiment(federation=fed, experiment_name=name)
    exp.start(model_provider=ModelInterface(model=model), task_keeper=tasks(), data_loader=Arrays(),
              rounds_to_train=0, **kwargs)
    return exp


def test_every_envoy_validates_the_given_model_and_the_metrics_are_their_sample_weighted_mean(fed):
    model = trained_elsewhere()
    exp = start(fed, "external", model)
    exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    status = exp.get_experiment_status()
    assert (status.state, status.rounds, status.best_round) == ("finished", 0, 0)

    w, b = (np.asarray(model.params[k], np.float64) for k in ("w", "b"))
    expected, sizes = {}, {}
    for envoy, shard in fed.client.shards.items():
        split = shard.get_split("valid")
        expected[envoy] = float(np.mean((split["image"] @ w + b).argmax(1) == split["label"]))
        sizes[envoy] = len(split["label"])
    events = list(fed.client.events("external"))
    per_envoy = {e.envoy: e.metrics[0].value for e in events if e.envoy and e.stage == Stage.AGGREGATED}
    assert per_envoy == pytest.approx(expected, abs=1e-6)
    [aggregated] = [e for e in events if not e.envoy and e.stage == Stage.AGGREGATED]
    mean = sum(expected[e] * sizes[e] for e in expected) / sum(sizes.values())
    assert aggregated.metrics[0].value == pytest.approx(mean, abs=1e-6)
    assert status.best_value == pytest.approx(mean, abs=1e-6)
    # nothing trained, nothing uploaded: only the validation stage and no round summary with traffic
    assert {e.stage for e in events if e.stage} == {Stage.AGGREGATED}
    for which in (exp.get_best_model(), exp.get_last_model()):
        for got, want in zip(jax.tree_util.tree_leaves(which.params), jax.tree_util.tree_leaves(model.params)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("kwargs, named", [
    ({"privacy": CentralDP(noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)}, "privacy"),
    ({"sync": Periodic(every=1)}, "sync"),
    ({"compression": "int8"}, "compression"),
    ({"envoys_per_round": 2}, "envoys_per_round"),
])
def test_training_settings_are_refused_with_the_fix(fed, kwargs, named):
    with pytest.raises(SpecError, match=rf"rounds_to_train=0 only validates .*{named}.*train for at least one round"):
        start(fed, "refused", linear_state(), **kwargs)
