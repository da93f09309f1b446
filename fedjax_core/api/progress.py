"""What ``stream_metrics`` shows: a progress bar per round, a live table, and what goes to metric sinks."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from fedjax_core import records as r
from fedjax_core.sinks import GuardedSink, MetricSink, TensorBoardSink, guard

_SHORT = {r.Stage.AGGREGATED: "agg_val", r.Stage.TRAIN: "train", r.Stage.LOCAL: "local_val"}
CLOSE_WAIT_S = 60.0  # how long stream_metrics waits for background sinks (MLflow, W&B) to send what they hold
log = logging.getLogger("fedjax.sinks")


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


class MetricsView:
    def __init__(self, experiment, log_dir: Path | None, progress: bool, live_table: bool,
                 sinks: Sequence[MetricSink] = ()):
        status = experiment.get_experiment_status()
        self.experiment = experiment
        self.n_envoys = max(len(status.envoys), 1)
        self.rounds = status.rounds
        chosen = ([TensorBoardSink(log_dir)] if log_dir is not None else []) + list(sinks)
        self.sinks: list[GuardedSink] = [guard(s, f"{type(s).__name__} of experiment "
                                                  f"{getattr(experiment, 'experiment_name', '')!r}") for s in chosen]
        self.progress = progress
        self.live_table = live_table
        self.notebook = _in_notebook() and live_table
        self.rows: list[dict] = []
        self._bar = None
        self._bar_round = -1
        self._printed: set[int] = set()
        self._table = None

    def _row(self, round_: int) -> dict:
        while len(self.rows) <= round_:
            self.rows.append({"round": len(self.rows)})
        return self.rows[round_]

    def add(self, event: r.MetricEvent) -> None:
        for sink in self.sinks:
            sink.log(event)
        if event.stage == r.Stage.DROPOUT:
            row = self._row(event.round)
            row["dropped"] = ",".join(filter(None, [row.get("dropped", ""), event.envoy]))
            if self.progress or self.live_table:
                tqdm.write(event.note)
            return
        if event.envoy:
            if event.stage in r.STAGES:
                self._advance(event.round)
            return
        row = self._row(event.round)
        if event.stage == r.Stage.ROUND:
            row["round_time_s"] = round(event.round_time_s, 3)
            if event.participants and len(event.participants) < self.n_envoys:  # a sampled round: say who
                row["participants"] = ",".join(event.participants)
            privacy = {m.name: m.value for m in event.metrics if m.task == "privacy"}
            if "epsilon" in privacy:
                row["epsilon"] = privacy["epsilon"]
            if privacy.get("training_stopped"):  # max_epsilon: the final validation comes next
                self.rounds = event.round + 1
            if event.note and (self.progress or self.live_table):
                tqdm.write(event.note)
        else:
            names = [m.name for m in event.metrics]
            for m in event.metrics:  # two tasks reporting the same metric name keep apart
                key = m.name if names.count(m.name) == 1 else f"{m.task}.{m.name}"
                row[f"{_SHORT.get(event.stage, event.stage)}/{key}"] = m.value
        final_validation = event.stage == r.Stage.AGGREGATED and event.round >= self.rounds
        if event.stage == r.Stage.ROUND or final_validation:
            self._show(event.round)

    def _advance(self, round_: int) -> None:
        if not self.progress:
            return
        if round_ != self._bar_round:
            if self._bar is not None:
                self._bar.close()
            per_envoy = 3 if round_ < self.rounds else 1
            label = f"round {round_} ({round_ + 1} of {self.rounds})" if round_ < self.rounds else "final validation"
            self._bar = tqdm(total=self._participants(round_) * per_envoy, desc=label, unit="step", leave=False)
            self._bar_round = round_
        self._bar.update(1)

    def _participants(self, round_: int) -> int:
        """How many envoys report in ``round_``: its sampled participants, or every envoy."""
        if round_ >= self.rounds:
            return self.n_envoys
        chosen = getattr(self.experiment.get_experiment_status(), "participants", {})
        return len(chosen[round_]) if round_ in chosen else self.n_envoys

    def _show(self, round_: int) -> None:
        if self.notebook:
            from IPython.display import HTML, display

            html = HTML(self.html())
            if self._table is None:
                self._table = display(html, display_id=True)
            else:
                self._table.update(html)
        elif self.live_table and round_ not in self._printed:
            self._printed.add(round_)
            row = self.rows[round_]
            cells = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            tqdm.write(cells)

    def columns(self) -> list[str]:
        cols: list[str] = []
        for row in self.rows:
            cols += [k for k in row if k not in cols]
        return cols

    def html(self) -> str:
        cols = self.columns()
        head = "".join(f"<th>{c}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{row[c]:.4f}</td>" if isinstance(row.get(c), float) else f"<td>{row.get(c, '')}</td>"
                             for c in cols) + "</tr>"
            for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for sink in self.sinks:
            if not sink.close(timeout=CLOSE_WAIT_S):
                log.warning("metric sink %s: still sending after %.0fs; stopped waiting", sink.label, CLOSE_WAIT_S)
        self.sinks = []
