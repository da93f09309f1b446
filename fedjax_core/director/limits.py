"""Bounds on what envoys and clients send: nothing they send is trusted to be small or sane.

Checked where it arrives, before it is stored; every refusal names the field, its size and
the limit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from fedjax_core import records as r
from fedjax_core.errors import InvalidRequestError

MAX_DESCRIPTION_CHARS = 4096
MAX_SHORT_TEXT_CHARS = 256  # hostnames, device names, metric and task names, shape entries
MAX_LIST_ITEMS = 64  # shape entries, devices
MAX_LABELS = 1 << 16
MAX_EXPERIMENTS_AT_ONCE = 64  # params.max_experiments of one envoy
MAX_ERROR_CHARS = 16384
MAX_METRICS_PER_REPORT = 256
MAX_MODEL_BYTES = 16 << 30  # default of settings.max_model_bytes


def _text(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidRequestError(f"{field} is {len(value)} characters; at most {limit} are allowed")


def check_shard_info(envoy: str, info: r.ShardInfo) -> None:
    _text(f"envoy {envoy!r}: shard description", info.description, MAX_DESCRIPTION_CHARS)
    _text(f"envoy {envoy!r}: hostname", info.hostname, MAX_SHORT_TEXT_CHARS)
    for field, items, limit in (("sample_shape", info.sample_shape, MAX_LIST_ITEMS),
                                ("target_shape", info.target_shape, MAX_LIST_ITEMS),
                                ("devices", info.devices, MAX_LIST_ITEMS), ("label_counts", info.label_counts, MAX_LABELS)):
        if len(items) > limit:
            raise InvalidRequestError(f"envoy {envoy!r}: {field} has {len(items)} entries; at most {limit} are allowed")
    for item in (*info.sample_shape, *info.target_shape, *info.devices):
        _text(f"envoy {envoy!r}: a shape entry or device name", item, MAX_SHORT_TEXT_CHARS)
    if info.train_size < 0 or info.valid_size < 0 or any(n < 0 for n in info.label_counts):
        raise InvalidRequestError(f"envoy {envoy!r}: sample counts cannot be negative")
    if not 1 <= info.max_experiments <= MAX_EXPERIMENTS_AT_ONCE:
        raise InvalidRequestError(f"envoy {envoy!r}: max_experiments is {info.max_experiments}; an envoy runs "
                                  f"between 1 and {MAX_EXPERIMENTS_AT_ONCE} experiments at once")


def check_metrics(envoy: str, metrics: tuple[r.Metric, ...]) -> None:
    if len(metrics) > MAX_METRICS_PER_REPORT:
        raise InvalidRequestError(f"envoy {envoy!r} reported {len(metrics)} metrics at once; at most "
                                  f"{MAX_METRICS_PER_REPORT} are allowed: report fewer from the tasks")
    for m in metrics:
        _text(f"envoy {envoy!r}: metric name {m.name[:40]!r}", m.name, MAX_SHORT_TEXT_CHARS)
        _text(f"envoy {envoy!r}: task name {m.task[:40]!r}", m.task, MAX_SHORT_TEXT_CHARS)
        if not math.isfinite(m.value):
            raise InvalidRequestError(
                f"envoy {envoy!r} reported {m.task}/{m.name} = {m.value}: metrics must be finite numbers (a diverged "
                "loss, or a task that divides by zero); the report is refused and the envoy drops out of the round")


def check_reports(envoy: str, reports: Sequence[r.StageReport]) -> None:
    """An envoy's metric reports for one round: known stages, each at most once, each within check_metrics."""
    stages = [report.stage for report in reports]
    for stage in stages:
        if stage not in r.STAGES:
            raise InvalidRequestError(f"unknown stage {stage[:40]!r}; expected one of {', '.join(r.STAGES)}")
    if len(set(stages)) != len(stages):
        raise InvalidRequestError(f"envoy {envoy!r} sent stages {stages} in one upload: each stage at most once")
    for report in reports:
        check_metrics(envoy, report.metrics)


def clip_error(text: str) -> str:
    """An envoy's error text, cut to a size the database and the notebook can hold."""
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return text[:MAX_ERROR_CHARS] + f"\n[... {len(text) - MAX_ERROR_CHARS} more characters cut by the director]"


MAX_SECAGG_ITEMS = 1024  # neighbours a participant shares with (SecAgg+ neighbourhoods are O(log n))
MAX_SECAGG_ITEM_BYTES = 4096  # one encrypted pair of shares is about 170 bytes


def check_secagg(items: dict[str, bytes] | None) -> None:
    """A secure aggregation step's shares: a bounded number of bounded ciphertexts, to envoys with valid names."""
    if items is None:
        return
    if len(items) > MAX_SECAGG_ITEMS:
        raise InvalidRequestError(f"a secure aggregation step carries {len(items)} shares; at most {MAX_SECAGG_ITEMS}")
    for name, data in items.items():
        _text("a secure aggregation neighbour's name", name, MAX_SHORT_TEXT_CHARS)
        if len(data) > MAX_SECAGG_ITEM_BYTES:
            raise InvalidRequestError(f"the share for {name[:64]!r} is {len(data)} bytes; at most "
                                      f"{MAX_SECAGG_ITEM_BYTES} are allowed")
