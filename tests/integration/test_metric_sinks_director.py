"""A real director whose only metric sink is MLflow (a local file store): the aggregate lands there."""
from __future__ import annotations

import pytest

from fedjax_core import FLExperiment, ModelInterface
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import Stack


def test_a_director_with_an_mlflow_sink_and_no_tensorboard_records_the_aggregate(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install 'fedjax-core[mlflow]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # inherited by the director: MLflow 3's file-store opt-in
    store = (tmp_path / "mlruns").as_uri()
    stack = Stack(tmp_path, director_settings={
        "metric_sinks": [{"type": "mlflow", "tracking_uri": store, "experiment_name": "lab"}]})
    try:
        stack.start()
        federation = stack.federation()
        try:
            exp = FLExperiment(federation=federation, experiment_name="sinks")
            exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
                      data_loader=SubsetDataset(limit=128), rounds_to_train=1, opt_treatment="CONTINUE_GLOBAL")
            rows = exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        finally:
            federation.close()
        stack.stop()  # a graceful stop waits for the sink's sender: no polling of the store
        assert stack.director.proc.returncode == 0
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
    assert run.info.run_name == "sinks" and run.info.status == "FINISHED"
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in run.data.metrics}
    accuracy = "aggregated_model_validation/validation_accuracy"
    assert history[accuracy] == {step: pytest.approx(rows[step]["agg_val/validation_accuracy"]) for step in (0, 1)}
    assert set(history["round/time_s"]) == {0}
    for envoy in ("env1", "env2"):
        assert set(history[f"envoys/{envoy}/train/train_acc"]) == {0}
    assert not (tmp_path / "logs").exists()  # TensorBoard is off: metric_sinks does not list it
