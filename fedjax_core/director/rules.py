"""Pure rules of a federation round: who takes part, what travels, how metrics combine, what is best."""
from __future__ import annotations

import math
import random
import time
from enum import StrEnum

from fedjax_core import personal
from fedjax_core import records as r
from fedjax_core.spec import ExperimentSpec, SyncMode


def upload_names(spec: ExperimentSpec) -> tuple[str, ...]:
    """The tensors that travel each round: params always, optimizer state only for CONTINUE_GLOBAL; never the
    personal ones (``spec.personal``), which stay with each envoy."""
    if spec.opt_treatment == r.OptTreatment.CONTINUE_GLOBAL:
        names = [t.name for t in spec.model_spec]
    else:
        names = [t.name for t in spec.model_spec if t.name.startswith("params/")]
    return personal.split(names, spec.personal)[0] if spec.personal else tuple(names)


class Averaging(StrEnum):
    """Whether a training round averages the envoys' models (see :func:`round_averaging`)."""

    ALWAYS = "always"    # every participant uploads its model after training
    NEVER = "never"      # participants check in and keep training locally (periodic, between averagings)
    DYNAMIC = "dynamic"  # participants check in their divergence; one over the threshold makes all upload


def round_averaging(spec: ExperimentSpec, round_: int) -> Averaging:
    """Periodic(k) averages after every k-th round, dynamic when a divergence crosses the threshold;
    the last training round always averages, so the final model is an average of everyone's training."""
    last = round_ >= spec.rounds - 1
    if spec.communication.sync == SyncMode.PERIODIC:
        return Averaging.ALWAYS if last or (round_ + 1) % spec.communication.sync_every == 0 else Averaging.NEVER
    if spec.communication.sync == SyncMode.DYNAMIC:
        return Averaging.ALWAYS if last else Averaging.DYNAMIC
    return Averaging.ALWAYS


def participants_per_round(spec: ExperimentSpec, n_envoys: int) -> int:
    """How many envoys train each round: ``envoys_per_round``, or ``floor(fraction x n)`` (at least 1), or all."""
    if spec.sampling.envoys_per_round:
        return spec.sampling.envoys_per_round
    if spec.sampling.fraction:
        return max(1, math.floor(spec.sampling.fraction * n_envoys))
    return n_envoys


def select_participants(envoys: tuple[str, ...], k: int, seed: int, round_: int) -> tuple[str, ...]:
    """The ``k`` envoys that train in ``round_``: a seeded sample, the same for the same seed and round.

    ``random.Random(f"{seed}/{round_}").sample(sorted(envoys), k)``, returned in name order.
    """
    ordered = sorted(envoys)
    if k >= len(ordered):
        return tuple(ordered)
    return tuple(sorted(random.Random(f"{seed}/{round_}").sample(ordered, k)))


def round_size_floor(spec: ExperimentSpec, k: int) -> int:
    """The fewest uploads a training round can close with: every participant, or min_envoys at a deadline."""
    if spec.deadline.round_timeout_s and spec.deadline.min_envoys:
        return min(spec.deadline.min_envoys, k)
    return k


def aggregate_metrics(round_: int, events: list[tuple[r.MetricEvent, float]]) -> list[r.MetricEvent]:
    """Per stage, each metric's mean over envoys weighted by their sample counts."""
    out = []
    for stage in r.STAGES:
        sums: dict[tuple[str, str], list[float]] = {}
        for event, weight in events:
            if event.stage != stage:
                continue
            for m in event.metrics:
                acc = sums.setdefault((m.task, m.name), [0.0, 0.0, 0.0, 0])
                acc[0] += m.value * weight
                acc[1] += weight
                acc[2] += m.value
                acc[3] += 1
        if sums:
            metrics = tuple(
                r.Metric(task, metric, s / w if w > 0 else plain / n)
                for (task, metric), (s, w, plain, n) in sums.items()
            )
            out.append(r.MetricEvent(round=round_, envoy="", stage=stage, metrics=metrics, timestamp=time.time()))
    return out


def metrics_everyone_reported(reports: list[r.MetricEvent]) -> set[str]:
    """The metric names that every one of ``reports`` (one per envoy) holds."""
    names = [{m.name for m in event.metrics} for event in reports]
    return set.intersection(*names) if names else set()


def default_best_metric(metrics: tuple[r.Metric, ...]) -> str:
    """The first metric with 'acc' in its name, else the alphabetically first."""
    names = [m.name for m in metrics]
    return next((n for n in names if "acc" in n.lower()), sorted(names)[0])


def metric_value(metrics: tuple[r.Metric, ...], name: str) -> float | None:
    """The value of ``name`` (a metric name or ``task/metric``), or None."""
    return next((m.value for m in metrics if m.name == name or f"{m.task}/{m.name}" == name), None)


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    """Whether ``value`` beats ``best``; a non-finite value (one envoy's inf or NaN) never does."""
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best if higher_is_better else value < best
