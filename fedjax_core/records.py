"""Typed records for what crosses the wire. Plain, immutable, numpy-free."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Stage(StrEnum):
    """What a metric event measures. ROUND events carry the round's timings, bytes and participants."""

    AGGREGATED = "aggregated_model_validation"
    TRAIN = "train"
    LOCAL = "locally_tuned_model_validation"
    ROUND = "round"
    DROPOUT = "dropout"  # an envoy left a round (its task failed); the event's note says who, why, who goes on
    SYNC_CHECK = "sync_check"  # an envoy's squared distance from the global model (periodic and dynamic sync)
    COMM = "comm"  # what one envoy moved in a round: bytes each way and model messages


class State(StrEnum):
    """An experiment's life: submitting -> queued -> running -> finished | failed | cancelled."""

    SUBMITTING = "submitting"
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskKind(StrEnum):
    NONE = "none"          # nothing for this worker yet (or it sits this round out): ask again
    TRAIN = "train"        # validate the round's model, train, validate, upload
    VALIDATE = "validate"  # validate the final aggregated model only
    SYNC = "sync"          # upload the model trained this round (dynamic averaging was triggered)
    SECAGG = "secagg"      # the next step of the round's secure aggregation (Task.secagg says which)
    FINISHED = "finished"  # the experiment is over for this envoy


class OptTreatment(StrEnum):
    RESET = "RESET"
    CONTINUE_LOCAL = "CONTINUE_LOCAL"
    CONTINUE_GLOBAL = "CONTINUE_GLOBAL"


STAGES = (Stage.AGGREGATED, Stage.TRAIN, Stage.LOCAL)  # the stages envoys report
OPT_TREATMENTS = tuple(OptTreatment)
TERMINAL_STATES = (State.FINISHED, State.FAILED, State.CANCELLED)


def default_higher_is_better(metric: str) -> bool:
    """Losses and errors go down; everything else (accuracy, AUC...) goes up."""
    return not any(word in metric.lower() for word in ("loss", "error", "perplexity"))


@dataclass(frozen=True)
class Encoding:
    """How a tensor was compressed for the wire (see :mod:`fedjax_core.codecs`).

    The tensor's spec then names the *wire* dtype; ``dtype`` is the model's. ``delta``: the
    values are the change from the round's global model. ``scale``/``zero_point``: int8's
    linear quantization, one pair per tensor or per output channel (the last axis).
    """

    codec: str  # "none" (only with delta), "fp16", "bf16" or "int8"
    dtype: str
    delta: bool = False
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()


@dataclass(frozen=True)
class TensorSpec:
    """One model leaf: its pytree path, dtype name and shape (and its encoding, when compressed)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: Encoding | None = None


@dataclass(frozen=True)
class TensorChunk:
    """A slice of one tensor's raw bytes; ``spec`` is set on the tensor's first chunk."""

    name: str
    offset: int
    data: bytes
    spec: TensorSpec | None = None


@dataclass(frozen=True)
class Metric:
    task: str
    name: str
    value: float


@dataclass(frozen=True)
class StageReport:
    """One stage's metrics from an envoy's round, as one ReportMetrics call (or an upload's header) carries them."""

    stage: str
    metrics: tuple[Metric, ...]
    sample_count: int


@dataclass(frozen=True)
class ShardInfo:
    """What an envoy tells the director about its local shard (never the data)."""

    description: str
    sample_shape: tuple[str, ...]
    target_shape: tuple[str, ...]
    train_size: int
    valid_size: int
    hostname: str = ""
    devices: tuple[str, ...] = ()
    label_counts: tuple[int, ...] = ()  # training records per class, when the descriptor says
    max_experiments: int = 1  # experiments the envoy runs at once, each in a worker of its own


@dataclass(frozen=True)
class EnvoyEntry:
    name: str
    shard_info: ShardInfo
    is_online: bool
    last_seen: float
    current_experiment: str = ""


@dataclass(frozen=True)
class ExperimentStatus:
    name: str
    state: str
    current_round: int
    rounds: int
    envoys: tuple[str, ...]
    best_round: int = -1
    best_value: float = float("nan")
    error: str = ""
    submitted_at: float = 0.0
    best_metric: str = ""
    # the envoys selected for each of the last rounds so far (at most the director's STATUS_ROUNDS), by round; every round's
    # are on its round event (MetricEvent.participants)
    participants: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    # differential privacy spent so far: epsilon at delta over the rounds trained (NaN without DP)
    epsilon: float = float("nan")
    delta: float = float("nan")
    submitter: str = ""  # the certificate name (or plaintext client_id) that submitted it
    started_at: float = 0.0  # 0 until it started
    # with personal layers: each envoy's latest validation of the aggregated model with its own personal tensors
    personal_validation: tuple["EnvoyValidation", ...] = ()


@dataclass(frozen=True)
class EnvoyValidation:
    """One envoy's validation metrics of one round (its personalised model's, under personal layers)."""

    envoy: str
    round: int
    metrics: tuple[Metric, ...] = ()


@dataclass(frozen=True)
class AuditEntry:
    """One line of the director's audit trail: who did what, from where, to which experiment."""

    action: str  # AuditAction
    actor: str  # a certificate name, or a plaintext client's client_id
    peer: str = ""  # ip:port the call came from
    experiment: str = ""
    detail: str = ""  # a JSON object: bundle sha256 and envoys, which model, a refusal's reason...
    timestamp: float = 0.0
    id: int = 0  # its place in the trail, from 1


class AuditAction(StrEnum):
    SUBMIT = "submit"
    CANCEL = "cancel"
    DOWNLOAD = "download"
    REGISTER = "register"
    REFUSE = "refuse"


@dataclass(frozen=True)
class MetricEvent:
    """Metrics of one envoy (or the aggregate, envoy == "") for one stage of one round."""

    round: int
    envoy: str
    stage: str
    metrics: tuple[Metric, ...] = ()
    timestamp: float = 0.0
    experiment_done: bool = False
    state: str = ""
    round_time_s: float = 0.0
    participants: tuple[str, ...] = ()  # on ROUND events: the envoys selected for the round
    note: str = ""  # on DROPOUT events: what happened and what happens next


@dataclass(frozen=True)
class SecAggKeys:
    cipher_pk: bytes
    mask_pk: bytes


@dataclass(frozen=True)
class SecAggStep:
    """A step of a round's secure aggregation (``fedjax_core/secagg``), as the director tells a worker.

    ``setup`` (with a TRAIN task): the round's public parameters; ``share``: the neighbours' public keys;
    ``mask``: the encrypted shares neighbours sent; ``unmask``: which neighbours survived and which dropped.
    """

    phase: str
    participants: tuple[str, ...] = ()
    threshold: float = 0.0
    bits: int = 0
    clip_range: float = 0.0
    size: int = 0
    seed: int = 0
    weight_scale: float = 0.0  # the envoy multiplies its update (and weight) by train samples x weight_scale
    keys: Mapping[str, SecAggKeys] = field(default_factory=dict)
    ciphertexts: Mapping[str, bytes] = field(default_factory=dict)
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    """What a worker is told to do next."""

    kind: TaskKind
    round: int = 0
    opt_treatment: str = ""
    upload_tensors: tuple[str, ...] = field(default_factory=tuple)
    message: str = ""
    task_kwargs: str = ""  # JSON {task: {kwarg: value}} from the experiment's round_config for this round
    from_global: bool = True  # start from the round's global model; False: keep training the local one
    check_in: bool = False  # report the divergence after training and upload only if the director says so
    compression: str = ""  # codec for the upload ("" none)
    send_deltas: bool = False  # upload the change from the global model, not the weights
    clip_norm: float = 0.0  # clip the change from the round's model to this L2 norm before uploading (0: no)
    noise_std: float = 0.0  # then add Gaussian noise of this standard deviation per coordinate (local DP)
    secagg: SecAggStep | None = None  # secure aggregation: TRAIN's setup, or the step of a SECAGG task
    personal: tuple[str, ...] = field(default_factory=tuple)  # the experiment's personal-layer patterns (personal.py)
    reports_with_upload: bool = False  # send this round's metric reports inside the upload (one call, not four)
