"""The director's fan-out of metric events to sinks: one set of sink instances per experiment.

What each sink writes is in :mod:`fedjax_core.sinks`; the default is TensorBoard under
``<log_dir>/<experiment>`` (runs ``aggregated`` and one per envoy, tags ``<stage>/<metric>``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from fedjax_core import records as r
from fedjax_core.sinks import AGGREGATED_RUN, GuardedSink, SinkFactory, TensorBoardSink, guard, scalar_tag, \
    tensorboard_factory

__all__ = ["AGGREGATED_RUN", "ExperimentLogger", "Loggers", "scalar_tag"]

ExperimentLogger = TensorBoardSink  # the name this class had before sinks
CLOSE_WAIT_S = 10.0  # at shutdown, how long background sinks get to send what they hold
log = logging.getLogger("fedjax.director")


class Loggers:
    """Each experiment's events to one instance of every sink, safe to use from any thread.

    ``sinks``: factories (experiment name -> sink); None: TensorBoard under ``log_dir``; an empty
    list: no sink (the events stay in the director's database). A sink that fails is logged once
    per experiment and skipped; late events of a closed experiment are dropped.
    """

    def __init__(self, log_dir: Path, sinks: Sequence[SinkFactory] | None = None):
        self.log_dir = Path(log_dir)
        self.factories = list(sinks) if sinks is not None else [tensorboard_factory(self.log_dir)]
        self._lock = threading.Lock()
        self._sinks: dict[str, list[GuardedSink]] = {}
        self._closing: list[GuardedSink] = []
        self._ended: set[str] = set()

    def _open(self, experiment: str) -> list[GuardedSink]:
        sinks = []
        for factory in self.factories:
            try:
                sink = factory(experiment)
            except Exception as exc:  # a sink that cannot start is a sink that failed: warn, go on
                log.warning("metric sink for experiment %r cannot start (%s: %s); its metrics are still stored",
                            experiment, type(exc).__name__, exc)
                continue
            sinks.append(guard(sink, f"{type(sink).__name__} of experiment {experiment!r}"))
        return sinks

    def log(self, experiment: str, event: r.MetricEvent) -> None:
        """Hand ``event`` to the experiment's sinks; a late event of a closed experiment is dropped."""
        with self._lock:
            if experiment in self._ended:
                return
            if experiment not in self._sinks:
                self._sinks[experiment] = self._open(experiment)
            for sink in self._sinks[experiment]:
                sink.log(event)

    def close(self, experiment: str | None = None) -> None:
        """Close one experiment's sinks (background ones finish on their own), or every one (waiting a while)."""
        with self._lock:
            if experiment is not None:
                self._ended.add(experiment)
            names = [experiment] if experiment is not None else list(self._sinks)
            for name in names:
                for sink in self._sinks.pop(name, []):
                    sink.close(timeout=0)
                    self._closing.append(sink)
            self._closing = [s for s in self._closing if not s.close(timeout=0)]
            if experiment is None:
                deadline = time.monotonic() + CLOSE_WAIT_S
                for sink in self._closing:
                    if not sink.close(timeout=max(0.0, deadline - time.monotonic())):
                        log.warning("metric sink %s: still sending at shutdown; what it holds is dropped", sink.label)
                self._closing = []
