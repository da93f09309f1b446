"""Metric sinks: where an experiment's metric events go besides the director's database.

A sink is anything with ``log(event)`` and ``close()`` (:class:`MetricSink`), one instance per
federated experiment. Three ship here:

- :class:`TensorBoardSink` (the default): ``<log_dir>/aggregated`` and ``<log_dir>/<envoy>`` are
  separate runs sharing the tags ``<stage>/<metric>`` (``round/...`` for timings and bytes), so
  TensorBoard overlays each envoy and the aggregate per chart; notes and participants as text.
- :class:`MLflowSink` (``pip install 'fedjax-core[mlflow]'``): one MLflow run per federated
  experiment, named after it, in the MLflow experiment ``experiment_name``. Aggregated metrics
  keep the TensorBoard names (``<stage>/<metric>``); each envoy's are prefixed
  ``envoys/<envoy>/``. The step is the round.
- :class:`WandbSink` (``pip install 'fedjax-core[wandb]'``): one W&B run per federated
  experiment, the same keys, plotted against ``round``.

Sinks are a view: :class:`GuardedSink` runs one so that its failures (a full disk, an
unreachable server) are logged once and never stop the director or the notebook, and, for
network sinks, in a background thread so a slow server never holds up a round.
"""
from __future__ import annotations

import logging
import os
import resource
import queue
import re
import socket
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import google_crc32c
from tensorboardX import summary as tb_summary
from tensorboardX.proto import event_pb2, summary_pb2

from fedjax_core import records as r

AGGREGATED_RUN = "aggregated"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- ]")  # what MLflow refuses in a metric key
log = logging.getLogger("fedjax.sinks")


@runtime_checkable
class MetricSink(Protocol):
    """Receives one experiment's metric events in order; ``close()`` once at the end."""

    def log(self, event: r.MetricEvent) -> None: ...

    def close(self) -> None: ...


SinkFactory = Callable[[str], MetricSink]  # experiment name -> that experiment's sink


class MissingExtra(ImportError):
    """An optional sink's package is not installed; the message names the install command."""


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"the {extra} metric sink needs the {module} package: "
                           f"pip install 'fedjax-core[{extra}]'") from None


def scalar_tag(event: r.MetricEvent, metric: r.Metric) -> str:
    """``<stage>/<metric>``: the name a metric has in every sink (``round/...`` for ROUND events)."""
    if event.stage == r.Stage.ROUND:
        return f"round/{metric.name}"
    return f"{event.stage}/{metric.name}"


_TB_INVALID = re.compile(r"[^-/\w.]")  # what tensorboardX's scalar() replaces by _ in a tag


def _tb_tag(tag: str) -> str:
    return _TB_INVALID.sub("_", tag).lstrip("/")


def metric_key(event: r.MetricEvent, metric: r.Metric) -> str:
    """The tag, prefixed ``envoys/<envoy>/`` for an envoy's event (one run holds every envoy)."""
    tag = scalar_tag(event, metric)
    if not event.envoy:
        return tag
    return f"envoys/{_UNSAFE.sub('_', event.envoy)}/{tag}"


def open_runs_limit() -> int:
    """Event files a TensorBoard sink keeps open: a quarter of the open-files limit, within 128..4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 4096 if soft == resource.RLIM_INFINITY else max(128, min(4096, soft // 4))


class EventFile:
    """One TensorBoard event file (``events.out.tfevents.<seconds>.<host><suffix>`` in ``folder``, as
    tensorboardX names them), appended to in TFRecord framing. ``flush`` hands what was written to the operating
    system without an fsync; ``close`` syncs the file."""

    def __init__(self, folder: Path, suffix: str):
        self.path = folder / f"events.out.tfevents.{str(time.time())[:10]}.{socket.gethostname()}{suffix}"
        self._lock = threading.Lock()
        self._file = open(self.path, "wb")
        self.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write(self, event: event_pb2.Event) -> None:
        data = event.SerializeToString()
        header = _RECORD_LENGTH.pack(len(data))
        with self._lock:
            self._file.write(b"".join((header, _RECORD_CRC.pack(masked_crc32c(header)), data,
                                       _RECORD_CRC.pack(masked_crc32c(data)))))

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file.closed:
                return
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


_RECORD_LENGTH, _RECORD_CRC = struct.Struct("<Q"), struct.Struct("<I")


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``, computed natively (tensorboardX's is pure Python unless the LGPL
    ``crc32c`` package is installed: 20 us for a report's record)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TensorBoardSink:
    """TensorBoard runs under ``log_dir``: ``aggregated`` and one per envoy.

    Each run's event file is written as events come, on the caller's thread (:class:`EventFile`).
    tensorboardX's ``SummaryWriter`` would keep two threads and a multiprocessing queue per run (512 threads
    in a director with 256 envoys), and its writers' ``flush()`` is an fsync, which a director logging
    every envoy's reports as they arrive paid once per report. A run is flushed to the operating system
    (where TensorBoard reads it) at its first event, then at most every FLUSH_S; its file is synced at
    ``close()``: the metrics themselves are in the director's database. At most MAX_OPEN_RUNS event files
    are open at once (a simulation of 10,000 envoys would otherwise hold 10,000; by default a quarter of
    the process's open-files limit, within 128..4096, so that a director's envoys each keep theirs open):
    the run least recently written is closed, and a new event file in its folder continues it when it gets
    events again (TensorBoard reads a run's files in name order, and the names keep them in the order
    written)."""

    FLUSH_S = 2.0
    MAX_OPEN_RUNS: int | None = None  # None: open_runs_limit()

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self._writers: OrderedDict[str, EventFile] = OrderedDict()  # least recently written first
        self._flushed: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closed = False
        # files are named by the second; the pid and a random part keep two sinks' files of one run apart, and
        # a counter keeps one sink's successive files of a run in order within a second
        self._suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._files = 0

    def _writer(self, run: str) -> EventFile:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the TensorBoard sink for {self.log_dir} is closed")
            if run in self._writers:
                self._writers.move_to_end(run)
                return self._writers[run]
            while len(self._writers) >= (self.MAX_OPEN_RUNS or open_runs_limit()):
                _, oldest = self._writers.popitem(last=False)
                oldest.close()
            (self.log_dir / run).mkdir(parents=True, exist_ok=True)
            self._files += 1
            self._writers[run] = EventFile(self.log_dir / run, f"{self._suffix}.{self._files:08d}")
            self._flushed[run] = 0.0
            return self._writers[run]

    def log(self, event: r.MetricEvent) -> None:
        run = event.envoy or AGGREGATED_RUN
        writer = self._writer(run)
        walltime = event.timestamp or time.time()

        def write(summary) -> None:
            writer.write(event_pb2.Event(summary=summary, step=event.round, wall_time=walltime))

        if event.metrics:  # one event for all of them, made directly (tensorboardX's scalar() is numpy work per value)
            write(summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=_tb_tag(scalar_tag(event, m)),
                                                                       simple_value=m.value) for m in event.metrics]))
        if event.note:
            write(tb_summary.text(event.stage, event.note))
        if event.participants:
            write(tb_summary.text("round/participants", ", ".join(event.participants)))
        now = time.monotonic()
        if now - self._flushed[run] >= self.FLUSH_S:
            writer.flush()
            self._flushed[run] = now

    def close(self) -> None:
        with self._lock:
            self._closed = True
            writers, self._writers = list(self._writers.values()), {}
        for writer in writers:
            writer.close()


class MLflowSink:
    """One MLflow run (``run_name``) in the MLflow experiment ``experiment_name``; scalars only.

    ``tracking_uri``: an MLflow server (``http://host:5000``), a database (``sqlite:///mlflow.db``,
    needs the full ``mlflow`` package) or a file store (``file:///path/mlruns``; MLflow 3 asks for
    ``MLFLOW_ALLOW_FILE_STORE=true`` in the environment); None: MLflow's default. The run is made
    at the first event and marked finished by ``close()``.
    """

    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "fedjax", run_name: str | None = None,
                 tags: dict[str, str] | None = None):
        mlflow = _require("mlflow", "mlflow")
        self._mlflow = mlflow
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tags = dict(tags or {})
        self._client: Any = None
        self.run_id: str | None = None

    def _start(self) -> str:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self._client.get_experiment_by_name(self.experiment_name)
        experiment_id = found.experiment_id if found else self._client.create_experiment(self.experiment_name)
        tags = {"fedjax.experiment": self.run_name or "", **self.tags}
        run = self._client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        return run.info.run_id

    def log(self, event: r.MetricEvent) -> None:
        if not event.metrics:
            return
        if self.run_id is None:
            self.run_id = self._start()
        millis = int((event.timestamp or time.time()) * 1000)
        metrics = [self._mlflow.entities.Metric(metric_key(event, m), float(m.value), millis, event.round)
                   for m in event.metrics]
        self._client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if self.run_id is not None:
            self._client.set_terminated(self.run_id)
            self.run_id = None


class WandbSink:
    """One Weights & Biases run (``name``) in ``project``, metrics plotted against ``round``; scalars only.

    ``mode="offline"`` writes the run under ``dir`` (``wandb sync`` uploads it later); ``"online"``
    needs ``wandb login`` (or WANDB_API_KEY) on this machine.
    """

    def __init__(self, project: str = "fedjax", mode: str = "offline", dir: str | Path | None = None,
                 entity: str | None = None, name: str | None = None, group: str | None = None):
        if mode not in ("offline", "online"):
            raise ValueError(f"WandbSink mode must be 'offline' or 'online', got {mode!r}")
        self._wandb = _require("wandb", "wandb")
        self.project, self.mode, self.entity, self.name, self.group = project, mode, entity, name, group
        self.dir = None if dir is None else Path(dir)
        self._run: Any = None

    def _start(self) -> Any:
        wandb = self._wandb
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        major, minor = (int(p) for p in wandb.__version__.split(".")[:2])
        reinit: Any = "create_new" if (major, minor) >= (0, 19) else True  # never finish another sink's run
        run = wandb.init(project=self.project, entity=self.entity, name=self.name, group=self.group, mode=self.mode,
                         dir=None if self.dir is None else str(self.dir), reinit=reinit,
                         config={"fedjax_experiment": self.name or ""})
        run.define_metric("round")
        run.define_metric("*", step_metric="round")
        return run

    def log(self, event: r.MetricEvent) -> None:
        if not event.metrics:
            return
        if self._run is None:
            self._run = self._start()
        self._run.log({"round": event.round, **{metric_key(event, m): float(m.value) for m in event.metrics}})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


_STOP = object()


class GuardedSink:
    """Runs ``sink`` so that it cannot fail its caller: the first error is logged (once), later ones dropped.

    ``background=True`` hands events to a thread (at most ``max_queue`` waiting; more are dropped
    with a warning), for sinks that talk to a server.
    """

    def __init__(self, sink: MetricSink, label: str, background: bool = False, max_queue: int = 10_000):
        self.sink = sink
        self.label = label
        self.max_queue = max_queue
        self._warned = False
        self._closed = False
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._drain, daemon=True, name=f"sink {label}")
            self._thread.start()

    def _warn(self, what: str, exc: BaseException | None = None) -> None:
        if not self._warned:
            self._warned = True
            log.warning("metric sink %s: %s%s; metrics are still stored by the director and streamed (warned once)",
                        self.label, what, f" ({type(exc).__name__}: {exc})" if exc else "")

    def _call(self, method: Callable, *args: Any) -> None:
        try:
            method(*args)
        except Exception as exc:  # a sink is a view: nothing it raises may stop a round
            self._warn(f"{method.__name__} failed", exc)

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            event = self._queue.get()
            if event is _STOP:
                self._call(self.sink.close)
                return
            self._call(self.sink.log, event)

    def log(self, event: r.MetricEvent) -> None:
        if self._closed:
            return
        if self._queue is None:
            self._call(self.sink.log, event)
        elif self._queue.qsize() >= self.max_queue:
            self._warn(f"{self.max_queue} events wait to be sent; dropping new ones")
        else:
            self._queue.put(event)

    def close(self, timeout: float | None = None) -> bool:
        """Close the sink after its queued events, waiting at most ``timeout`` s; True once it is closed.

        Safe to call again (to wait longer)."""
        first, self._closed = not self._closed, True
        if self._queue is None:
            if first:
                self._call(self.sink.close)
            return True
        assert self._thread is not None
        if first:
            self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()


def guard(sink: MetricSink, label: str) -> GuardedSink:
    """``sink`` guarded; MLflow and W&B (anything but TensorBoard) run in a background thread."""
    return GuardedSink(sink, label, background=not isinstance(sink, TensorBoardSink))


def tensorboard_factory(log_dir: str | Path) -> SinkFactory:
    """TensorBoard runs under ``<log_dir>/<experiment>``."""
    return lambda experiment: TensorBoardSink(Path(log_dir) / experiment)


def mlflow_factory(tracking_uri: str | None = None, experiment_name: str = "fedjax") -> SinkFactory:
    """One MLflow run per experiment, named after it, in the MLflow experiment ``experiment_name``."""
    _require("mlflow", "mlflow")  # now, not at the first event
    return lambda experiment: MLflowSink(tracking_uri, experiment_name, run_name=experiment)


def wandb_factory(project: str = "fedjax", mode: str = "offline", dir: str | Path | None = None,
                  entity: str | None = None) -> SinkFactory:
    """One W&B run per experiment, named after it (and grouped by it)."""
    _require("wandb", "wandb")
    return lambda experiment: WandbSink(project, mode, dir, entity, name=experiment, group=experiment)


def _probe_local_mlflow(uri: str, key: str) -> None:
    """Open a local MLflow store now, so that one MLflow refuses is a start-up error, not a warning later."""
    from mlflow.tracking import MlflowClient

    from fedjax_core.config import ConfigError

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:
        raise ConfigError(f"{key}: MLflow cannot open {uri}: {exc} (for a file store with MLflow 3, set "
                          "MLFLOW_ALLOW_FILE_STORE=true in the director's environment; or use an MLflow server)") from None


def factories_from_config(specs: Any, log_dir: Path, base: Path) -> list[SinkFactory]:
    """Factories for ``settings.metric_sinks`` (config models); relative paths resolve against ``base``.

    Raises MissingExtra naming the key and the install command when a sink's package is missing."""
    from fedjax_core.config import ConfigError, resolve_path

    out: list[SinkFactory] = []
    for index, spec in enumerate(specs):
        try:
            if spec.type == "tensorboard":
                out.append(tensorboard_factory(resolve_path(spec.log_dir, base) if spec.log_dir else log_dir))
            elif spec.type == "mlflow":
                uri = spec.tracking_uri
                if uri is not None and "://" not in uri and not uri.startswith(("sqlite:", "databricks")):
                    uri = resolve_path(uri, base).as_uri()  # a plain path: a file store beside the config
                out.append(mlflow_factory(uri, spec.experiment_name))
                if uri is not None and uri.startswith(("file:", "sqlite:")):
                    _probe_local_mlflow(uri, f"settings.metric_sinks.{index}.tracking_uri")
            elif spec.type == "wandb":
                out.append(wandb_factory(spec.project, spec.mode, resolve_path(spec.dir, base) if spec.dir else None,
                                         spec.entity))
        except MissingExtra as exc:
            raise ConfigError(f"settings.metric_sinks.{index} (type: {spec.type}): {exc}") from None
    return out
