"""Compression and sync modes with real processes: a director and two envoys on loopback."""
from __future__ import annotations

import jax
import numpy as np

from fedjax_core import Dynamic, FLExperiment, ModelInterface, Periodic
from fedjax_core import records as r
from fl_experiment import SubsetDataset, create_train_state, make_tasks


def run(federation, name, **kwargs) -> FLExperiment:
    exp = FLExperiment(federation=federation, experiment_name=name)
    exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
              data_loader=SubsetDataset(limit=192), device_assignment_policy="CPU_ONLY", **kwargs)
    exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    assert exp.get_experiment_status().state == "finished"
    return exp


def per_round(exp: FLExperiment, name: str) -> list[float]:
    return [v for e in exp.history if e.stage == r.Stage.ROUND for m in e.metrics if m.name == name for v in [m.value]]


def test_int8_deltas_with_compressed_downloads_move_a_quarter_of_the_bytes(stack):
    fed = stack.federation()
    plain = run(fed, "plain", rounds_to_train=2)
    small = run(fed, "int8", rounds_to_train=2, compression="int8", send_deltas=True, compress_downloads=True)
    param_elements = sum(np.size(x) for x in jax.tree_util.tree_leaves(create_train_state().params))
    for exp, width in ((plain, 4), (small, 1)):
        for e in exp.history:
            if e.stage == r.Stage.COMM:  # each envoy downloads and uploads every parameter once a round
                values = {m.name: m.value for m in e.metrics}
                assert values == {"bytes_uploaded": param_elements * width, "bytes_downloaded": param_elements * width,
                                  "model_messages": 2}, e
    assert sum(per_round(small, "bytes_received")) == sum(per_round(plain, "bytes_received")) / 4
    small.set_model_template(create_train_state())
    plain.set_model_template(create_train_state())
    for a, b in zip(*(jax.tree_util.tree_leaves(x.get_last_model().params) for x in (small, plain))):
        assert np.all(np.isfinite(a)) and np.abs(np.asarray(a) - np.asarray(b)).max() < 0.05  # near the exact run


def test_periodic_and_dynamic_averaging_skip_the_rounds_they_should(stack):
    fed = stack.federation()
    periodic = run(fed, "periodic", rounds_to_train=4, sync=Periodic(every=2))
    assert per_round(periodic, "averaged") == [0, 1, 0, 1]
    assert per_round(periodic, "model_messages") == [2, 2, 2, 2]  # downloads after an average, uploads at one
    starts = sorted({e.round for e in periodic.history if e.envoy and e.stage == r.Stage.AGGREGATED})
    assert starts == [0, 2, 4]  # envoys validate the global model only when it changed (4: the final model)

    lazy = run(fed, "dynamic-lazy", rounds_to_train=3, sync=Dynamic(delta_threshold=1e9))
    assert per_round(lazy, "averaged") == [0, 0, 1]  # nobody drifted that far; the last round always averages
    assert per_round(lazy, "check_ins") == [2, 2, 0]
    checks = [e for e in lazy.history if e.stage == r.Stage.SYNC_CHECK]
    by_round = {}
    for e in checks:
        by_round.setdefault(e.envoy, []).append(e.metrics[0].value)
    assert all(0 < d[0] < d[1] for d in by_round.values())  # the local models drift further each round

    eager = run(fed, "dynamic-eager", rounds_to_train=2, sync=Dynamic(delta_threshold=1e-12))
    assert per_round(eager, "averaged") == [1, 1]
    assert per_round(eager, "model_messages") == [4, 4]
