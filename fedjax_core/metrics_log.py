"""TensorBoard curves for one experiment, written with tensorboardX.

Layout: ``<log_dir>/<experiment>/aggregated`` and ``<log_dir>/<experiment>/<envoy>`` are
separate runs sharing the tags ``<stage>/<metric>`` (and ``round/...`` for timings and
bytes), so TensorBoard draws each envoy and the aggregate as overlaid curves per chart.
"""
from __future__ import annotations

import threading
from pathlib import Path

from tensorboardX import SummaryWriter

from fedjax_core import records as r

AGGREGATED_RUN = "aggregated"


def scalar_tag(event: r.MetricEvent, metric: r.Metric) -> str:
    if event.stage == r.STAGE_ROUND:
        return f"round/{metric.name}"
    return f"{event.stage}/{metric.name}"


class ExperimentLogger:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writers: dict[str, SummaryWriter] = {}

    def log(self, event: r.MetricEvent) -> None:
        run = event.envoy or AGGREGATED_RUN
        if run not in self._writers:
            self._writers[run] = SummaryWriter(logdir=str(self.log_dir / run), flush_secs=5)
        writer = self._writers[run]
        for metric in event.metrics:
            writer.add_scalar(scalar_tag(event, metric), metric.value, global_step=event.round,
                              walltime=event.timestamp or None)
        if event.note:
            writer.add_text(event.stage, event.note, global_step=event.round, walltime=event.timestamp or None)
        if event.participants:
            writer.add_text("round/participants", ", ".join(event.participants), global_step=event.round,
                            walltime=event.timestamp or None)
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class Loggers:
    """One ExperimentLogger per experiment under ``log_dir``, safe to use from any thread."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._lock = threading.Lock()
        self._loggers: dict[str, ExperimentLogger] = {}
        self._ended: set[str] = set()

    def log(self, experiment: str, event: r.MetricEvent) -> None:
        """Write ``event``; a late event of an experiment whose writers were closed is dropped."""
        with self._lock:
            if experiment in self._ended:
                return
            if experiment not in self._loggers:
                self._loggers[experiment] = ExperimentLogger(self.log_dir / experiment)
            self._loggers[experiment].log(event)

    def close(self, experiment: str | None = None) -> None:
        """Close one experiment's writers, or every one."""
        with self._lock:
            if experiment is not None:
                self._ended.add(experiment)
            names = [experiment] if experiment is not None else list(self._loggers)
            for name in names:
                logger = self._loggers.pop(name, None)
                if logger is not None:
                    logger.close()
