"""Metric sinks (fedjax_core.sinks): TensorBoard, MLflow (local file store), W&B (offline), failures, config."""
from __future__ import annotations

import json
import logging
import os
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

from fedjax_core import records as r
from fedjax_core.config import ConfigError, DirectorConfig, load_config
from fedjax_core.metrics_log import Loggers
from fedjax_core.sinks import GuardedSink, MetricSink, MLflowSink, TensorBoardSink, WandbSink, \
    factories_from_config, metric_key, open_runs_limit

M = r.Metric


def events() -> list[r.MetricEvent]:
    """Two rounds of one envoy and the aggregate, a round summary and a dropout note."""
    out = []
    for round_ in (0, 1):
        out += [
            r.MetricEvent(round_, "env1", r.Stage.AGGREGATED, (M("val", "acc", 0.1 + round_),), timestamp=1000.0 + round_),
            r.MetricEvent(round_, "env1", r.Stage.TRAIN, (M("train", "loss", 2.0 - round_),), timestamp=1000.5 + round_),
            r.MetricEvent(round_, "", r.Stage.AGGREGATED, (M("val", "acc", 0.2 + round_),), timestamp=1001.0 + round_),
            r.MetricEvent(round_, "", r.Stage.ROUND, (M("", "time_s", 3.0 + round_),), timestamp=1001.5 + round_,
                          participants=("env1",)),
        ]
    out.append(r.MetricEvent(1, "env2", r.Stage.DROPOUT, note="env2 left round 1", timestamp=1002.0))
    return out


EXPECTED = {  # key -> [(step, value)], as MLflow and W&B name them
    "aggregated_model_validation/acc": [(0, 0.2), (1, 1.2)],
    "round/time_s": [(0, 3.0), (1, 4.0)],
    "envoys/env1/aggregated_model_validation/acc": [(0, 0.1), (1, 1.1)],
    "envoys/env1/train/loss": [(0, 2.0), (1, 1.0)],
}


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------------ TensorBoard
def test_tensorboard_sink_writes_the_same_runs_and_tags_as_before(tmp_path):
    sink = TensorBoardSink(tmp_path / "exp")
    assert isinstance(sink, MetricSink)
    for event in events():
        sink.log(event)
    sink.close()
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["aggregated", "env1", "env2"]
    assert tensorboard_scalars(tmp_path / "exp" / "aggregated") == {
        "aggregated_model_validation/acc": [(0, 0.2), (1, 1.2)], "round/time_s": [(0, 3.0), (1, 4.0)]}
    assert tensorboard_scalars(tmp_path / "exp" / "env1") == {
        "aggregated_model_validation/acc": [(0, 0.1), (1, 1.1)], "train/loss": [(0, 2.0), (1, 1.0)]}


@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 3, b"\x18\x00\x00\x00\x00\x00\x00\x00"])
def test_the_record_checksum_is_tensorboardx_masked_crc32c(data):
    from tensorboardX.record_writer import masked_crc32c as reference

    from fedjax_core.sinks import masked_crc32c

    assert masked_crc32c(data) == reference(data)


def test_tensorboard_sink_keeps_few_files_open_and_continues_a_closed_run_in_order(tmp_path, monkeypatch):
    """With thousands of envoys (a simulation) only MAX_OPEN_RUNS event files stay open; a run whose file was
    closed continues in a new one, and TensorBoard reads every value of every run, in order."""
    monkeypatch.setattr(TensorBoardSink, "MAX_OPEN_RUNS", 2)
    sink = TensorBoardSink(tmp_path / "exp")
    envoys = [f"env{i}" for i in range(5)]
    for round_ in range(3):
        for i, envoy in enumerate(envoys):
            sink.log(r.MetricEvent(round_, envoy, r.Stage.TRAIN, (M("train", "loss", 10.0 * i + round_),),
                                   timestamp=1000.0 + round_))
            assert len(sink._writers) <= 2
    sink.close()
    for i, envoy in enumerate(envoys):
        assert len(list((tmp_path / "exp" / envoy).iterdir())) == 3  # one file per round: evicted in between
        assert tensorboard_scalars(tmp_path / "exp" / envoy) == {
            "train/loss": [(round_, 10.0 * i + round_) for round_ in range(3)]}


def test_tensorboard_sink_keeps_every_envoys_file_open_under_the_default_limit(tmp_path):
    """300 envoys reporting three stages a round for two rounds: one event file each (the old fixed limit of 128
    closed and reopened a file at nearly every report, a new file and an fsync each time)."""
    assert open_runs_limit() >= 301 or pytest.skip("this process may open too few files")
    sink = TensorBoardSink(tmp_path / "exp")
    envoys = [f"env{i:03d}" for i in range(300)]
    for round_ in range(2):
        for envoy in envoys:
            for stage in r.STAGES:
                sink.log(r.MetricEvent(round_, envoy, stage, (M("t", "m", 1.0 * round_),), timestamp=1000.0 + round_))
    sink.close()
    assert [len(list((tmp_path / "exp" / envoy).iterdir())) for envoy in envoys] == [1] * len(envoys)
    assert tensorboard_scalars(tmp_path / "exp" / "env299")["train/m"] == [(0, 0.0), (1, 1.0)]


@pytest.mark.parametrize("soft, limit", [(1024, 256), (20000, 4096), (256, 128)])
def test_open_runs_follow_the_open_files_limit(monkeypatch, soft, limit):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, 1 << 20))
    assert open_runs_limit() == limit


def test_tensorboard_sink_keeps_notes_participants_and_wall_times(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "exp")
    for event in events():
        sink.log(event)
    sink.close()
    aggregated = EventAccumulator(str(tmp_path / "exp" / "aggregated"))
    aggregated.Reload()
    assert [s.wall_time for s in aggregated.Scalars("round/time_s")] == [1001.5, 1002.5]
    participants = aggregated.Tensors("round/participants/text_summary")
    assert [(t.step, t.tensor_proto.string_val) for t in participants] == [(0, [b"env1"]), (1, [b"env1"])]
    dropout = EventAccumulator(str(tmp_path / "exp" / "env2"))
    dropout.Reload()
    assert dropout.Tensors("dropout/text_summary")[0].tensor_proto.string_val == [b"env2 left round 1"]


def test_tensorboard_sink_writes_on_the_callers_thread_and_each_event_is_on_disk_at_once(tmp_path):
    before = threading.active_count()
    sink = TensorBoardSink(tmp_path / "exp")
    for i in range(50):  # one run per envoy
        sink.log(r.MetricEvent(0, f"env{i}", r.Stage.TRAIN, (M("train", "loss", float(i)),), timestamp=1000.0))
    assert threading.active_count() <= before  # none started (an earlier test's may have ended meanwhile)
    assert tensorboard_scalars(tmp_path / "exp" / "env7") == {"train/loss": [(0, 7.0)]}  # not closed yet
    sink.close()


def test_tensorboard_files_are_synced_once_at_close_not_at_each_flush(tmp_path, monkeypatch):
    """The database holds the metrics; an fsync per report (tensorboardX's flush) cost each upload a disk sync."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    monkeypatch.setattr(TensorBoardSink, "FLUSH_S", 0.0)  # flush at every event
    sink = TensorBoardSink(tmp_path / "exp")
    for round_ in range(3):
        for i in range(4):
            sink.log(r.MetricEvent(round_, f"env{i}", r.Stage.TRAIN, (M("train", "loss", float(i)),), timestamp=1000.0))
    assert synced == [] and tensorboard_scalars(tmp_path / "exp" / "env2") == {"train/loss": [(0, 2.0), (1, 2.0),
                                                                                             (2, 2.0)]}
    sink.close()
    assert len(synced) == 4


def test_two_tensorboard_sinks_on_one_folder_keep_both_files(tmp_path):
    # e.g. a notebook streaming an experiment's metrics twice: event files are named by the second
    first, second = TensorBoardSink(tmp_path / "exp"), TensorBoardSink(tmp_path / "exp")
    first.log(r.MetricEvent(0, "env1", r.Stage.TRAIN, (M("train", "loss", 1.0),), timestamp=1000.0))
    first.close()
    second.log(r.MetricEvent(1, "env1", r.Stage.TRAIN, (M("train", "loss", 0.5),), timestamp=1001.0))
    second.close()
    assert len(list((tmp_path / "exp" / "env1").iterdir())) == 2
    assert sorted(tensorboard_scalars(tmp_path / "exp" / "env1")["train/loss"]) == [(0, 1.0), (1, 0.5)]


def test_a_closed_tensorboard_sink_refuses_events(tmp_path):
    sink = TensorBoardSink(tmp_path / "exp")
    sink.close()
    with pytest.raises(RuntimeError, match="is closed"):
        sink.log(events()[0])
    assert not (tmp_path / "exp").exists()


def test_loggers_default_to_tensorboard_and_an_empty_list_writes_nothing(tmp_path):
    default = Loggers(tmp_path / "tb")
    off = Loggers(tmp_path / "off", [])
    for event in events():
        default.log("exp", event)
        off.log("exp", event)
    default.close("exp")
    off.close("exp")
    default.log("exp", events()[0])  # late: dropped
    default.close()
    assert "aggregated_model_validation/acc" in tensorboard_scalars(tmp_path / "tb" / "exp" / "aggregated")
    assert not (tmp_path / "off").exists()


# ----------------------------------------------------------------- failures
class Recording:
    def __init__(self):
        self.events, self.closed = [], False

    def log(self, event):
        self.events.append(event)

    def close(self):
        self.closed = True


class Broken:
    def log(self, event):
        raise ConnectionError("mlflow.example:5000 unreachable")

    def close(self):
        raise OSError(28, "No space left on device")


def test_a_failing_sink_does_not_stop_the_others_and_warns_once(tmp_path, caplog):
    recording = Recording()
    loggers = Loggers(tmp_path, [lambda name: Broken(), lambda name: recording])
    with caplog.at_level(logging.WARNING, logger="fedjax.sinks"):
        for event in events():
            loggers.log("exp", event)
        loggers.close()
    assert recording.events == events() and recording.closed
    warnings = [rec.getMessage() for rec in caplog.records if "Broken" in rec.getMessage()]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "still stored" in warnings[0]


def test_a_sink_that_cannot_start_is_skipped(tmp_path, caplog):
    def cannot_start(name):
        raise RuntimeError("no credentials")

    recording = Recording()
    loggers = Loggers(tmp_path, [cannot_start, lambda name: recording])
    with caplog.at_level(logging.WARNING):
        loggers.log("exp", events()[0])
        loggers.close()
    assert recording.events == events()[:1] and "no credentials" in caplog.text


def test_a_background_sink_keeps_order_and_closes_after_its_queue(tmp_path):
    recording = Recording()
    guarded = GuardedSink(recording, "recording", background=True)
    for event in events():
        guarded.log(event)
    assert guarded.close(timeout=30) and guarded.close(timeout=0)  # idempotent
    assert recording.events == events() and recording.closed
    guarded.log(events()[0])  # after close: dropped
    assert len(recording.events) == len(events())


def test_stream_metrics_feeds_extra_sinks_and_survives_a_broken_one(tmp_path):
    from types import SimpleNamespace

    from fedjax_core import FLExperiment

    done = r.MetricEvent(2, "", r.Stage.AGGREGATED, experiment_done=True, state="finished")
    exp = FLExperiment(federation=SimpleNamespace(), experiment_name="exp")
    exp._events = lambda: iter([*events(), done])
    exp.get_experiment_status = lambda: r.ExperimentStatus("exp", "running", 0, 2, ("env1",))
    recording = Recording()
    exp.stream_metrics(log_dir=tmp_path, progress=False, live_table=False, sinks=[Broken(), recording])
    assert recording.events == events() and recording.closed
    assert (tmp_path / "exp" / "aggregated").is_dir()  # TensorBoard too (tensorboard_logs=True)
    with pytest.raises(TypeError, match="sinks must be a list"):
        exp.stream_metrics(sinks=recording)
    with pytest.raises(TypeError, match="needs log\\(event\\) and close\\(\\)"):
        exp.stream_metrics(sinks=[object()])


# ------------------------------------------------------------------- MLflow
def mlflow_history(uri: str, experiment_name: str, run_name: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no MLflow experiment {experiment_name!r} in {uri}"
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    assert len(runs) == 1, runs
    run = runs[0]
    assert run.info.status == "FINISHED"
    return {key: sorted((m.step, pytest.approx(m.value)) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install 'fedjax-core[mlflow]'")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in to a file store
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_sink_writes_one_run_with_every_value_per_round(file_store):
    sink = MLflowSink(file_store, experiment_name="fedjax-tests", run_name="exp")
    for event in events():
        sink.log(event)
    sink.close()
    assert mlflow_history(file_store, "fedjax-tests", "exp") == EXPECTED


def test_mlflow_through_the_director_fan_out_from_config(file_store, tmp_path):
    config = tmp_path / "director.yaml"
    config.write_text(f"settings:\n  sample_shape: ['1']\n  target_shape: ['1']\n"
                      f"  metric_sinks: [{{type: mlflow, tracking_uri: '{file_store}', experiment_name: lab}}]\n")
    specs = load_config(config, DirectorConfig).settings.metric_sinks
    loggers = Loggers(tmp_path / "logs", factories_from_config(specs, tmp_path / "logs", tmp_path))
    for event in events():
        loggers.log("exp", event)
    loggers.close()  # waits for the background sender
    assert mlflow_history(file_store, "lab", "exp") == EXPECTED
    assert not (tmp_path / "logs").exists()  # TensorBoard is off: it is not in the list


def test_an_unreachable_mlflow_server_does_not_hold_up_logging(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    from processes import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    loggers = Loggers(tmp_path, [lambda name: MLflowSink(f"http://127.0.0.1:{free_port()}", run_name=name)])
    with caplog.at_level(logging.WARNING, logger="fedjax.sinks"):
        for event in events():
            loggers.log("exp", event)  # returns at once: the sender thread meets the refusals
        loggers.close()
    assert "MLflowSink of experiment 'exp'" in caplog.text and "warned once" in caplog.text


# ---------------------------------------------------------------------- W&B
def wandb_records(path: Path):
    """The protobuf records of a .wandb file: W&B's header, then LevelDB-log blocks of 32 KiB."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, out, pending = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B", data[:7]
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wandb_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    (path,) = run_dir.glob("offline-run-*/run-*.wandb")
    history: dict[str, list] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for key, value in row.items():
            if not key.startswith("_") and key != "round":
                history.setdefault(key, []).append((row["round"], pytest.approx(value)))
    return history


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed: pip install 'fedjax-core[wandb]'")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                       "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                       "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}.items():
        monkeypatch.setenv(key, value)
    return tmp_path / "runs"


def test_wandb_sink_offline_writes_every_value_per_round(offline_wandb):
    sink = WandbSink(project="fedjax-tests", mode="offline", dir=offline_wandb, name="exp")
    for event in events():
        sink.log(event)
    sink.close()
    deadline = time.monotonic() + 30  # wandb-core may still be writing the file when finish() returns
    while (history := wandb_history(offline_wandb / "wandb")) != EXPECTED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert history == EXPECTED


# -------------------------------------------------------------- director config
def director_yaml(tmp_path: Path, sinks: str) -> Path:
    path = tmp_path / "director.yaml"
    path.write_text(f"settings:\n  sample_shape: ['1']\n  target_shape: ['1']\n  metric_sinks: {sinks}\n")
    return path


def test_metric_sinks_default_to_tensorboard_and_accept_a_short_form(tmp_path):
    settings = DirectorConfig.model_validate({"settings": {"sample_shape": ["1"], "target_shape": ["1"]}}).settings
    assert [s.type for s in settings.metric_sinks] == ["tensorboard"]
    sinks = load_config(director_yaml(tmp_path, "[tensorboard, {type: wandb, dir: runs}]"), DirectorConfig)
    assert [s.type for s in sinks.settings.metric_sinks] == ["tensorboard", "wandb"]
    assert sinks.settings.metric_sinks[1].mode == "offline"
    assert load_config(director_yaml(tmp_path, "[]"), DirectorConfig).settings.metric_sinks == []


@pytest.mark.parametrize("sinks, message", [
    ("[{type: neptune}]", "settings.metric_sinks.0.type: 'neptune' is not a metric sink; use one of tensorboard, "
                          "mlflow, wandb"),
    ("[tensorboard, {project: x}]", "settings.metric_sinks.1.type: required key is missing"),
    ("[{type: mlflow, tracking_url: http://x}]", "settings.metric_sinks.0.tracking_url: unknown key; allowed here: "
                                                 "experiment_name, tracking_uri, type"),
    ("[{type: wandb, mode: onlin}]", "settings.metric_sinks.0.mode: Input should be 'offline' or 'online'"),
    ("tensorboard", "settings.metric_sinks: Input should be a valid list"),
])
def test_bad_metric_sinks_are_refused_naming_the_key(tmp_path, sinks, message):
    with pytest.raises(ConfigError) as info:
        load_config(director_yaml(tmp_path, sinks), DirectorConfig)
    assert message in str(info.value)


@pytest.mark.parametrize("module, extra", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_missing_optional_package_stops_the_director_before_it_serves(tmp_path, monkeypatch, module, extra):
    from fedjax_core.director.server import run_director

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    config = load_config(director_yaml(tmp_path, f"[tensorboard, {{type: {extra}}}]"), DirectorConfig)
    with pytest.raises(ConfigError) as info:
        run_director(config, None, tmp_path)
    assert str(info.value) == (f"settings.metric_sinks.1 (type: {extra}): the {extra} metric sink needs the {module} "
                               f"package: pip install 'fedjax-core[{extra}]'")
    assert not (tmp_path / "director_state").exists()  # nothing started
    with pytest.raises(ImportError, match=rf"pip install 'fedjax-core\[{extra}\]'"):
        (MLflowSink if extra == "mlflow" else WandbSink)()


def test_metric_keys_keep_envoys_apart_from_stages():
    event = r.MetricEvent(0, "train", r.Stage.TRAIN, (M("t", "loss", 1.0),))
    assert metric_key(event, event.metrics[0]) == "envoys/train/train/loss"
    odd = r.MetricEvent(0, "env:1", r.Stage.ROUND, (M("", "time_s", 1.0),))
    assert metric_key(odd, odd.metrics[0]) == "envoys/env_1/round/time_s"


def test_a_file_store_mlflow_refuses_is_a_start_up_error_naming_the_key(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    if int(mlflow.__version__.split(".")[0]) < 3:
        pytest.skip("MLflow 2 opens file stores without an opt-in")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    config = load_config(director_yaml(tmp_path, "[{type: mlflow, tracking_uri: mlruns}]"), DirectorConfig)
    with pytest.raises(ConfigError, match=r"settings.metric_sinks.0.tracking_uri: MLflow cannot open file://.*"
                                          r"MLFLOW_ALLOW_FILE_STORE=true"):
        factories_from_config(config.settings.metric_sinks, tmp_path / "logs", tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert len(factories_from_config(config.settings.metric_sinks, tmp_path / "logs", tmp_path)) == 1
    assert (tmp_path / "mlruns").is_dir()  # the plain path resolved against the config's folder
