from fedjax_proto import tensors_pb2 as _tensors_pb2
from fedjax_proto import envoy_service_pb2 as _envoy_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetDatasetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDatasetInfoResponse(_message.Message):
    __slots__ = ("sample_shape", "target_shape")
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_SHAPE_FIELD_NUMBER: _ClassVar[int]
    sample_shape: _containers.RepeatedScalarFieldContainer[str]
    target_shape: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sample_shape: _Optional[_Iterable[str]] = ..., target_shape: _Optional[_Iterable[str]] = ...) -> None: ...

class GetShardRegistryRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class EnvoyEntry(_message.Message):
    __slots__ = ("name", "shard_info", "is_online", "last_seen", "current_experiment")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHARD_INFO_FIELD_NUMBER: _ClassVar[int]
    IS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    shard_info: _envoy_service_pb2.ShardInfo
    is_online: bool
    last_seen: float
    current_experiment: str
    def __init__(self, name: _Optional[str] = ..., shard_info: _Optional[_Union[_envoy_service_pb2.ShardInfo, _Mapping]] = ..., is_online: _Optional[bool] = ..., last_seen: _Optional[float] = ..., current_experiment: _Optional[str] = ...) -> None: ...

class GetShardRegistryResponse(_message.Message):
    __slots__ = ("envoys", "next_page_token")
    ENVOYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    envoys: _containers.RepeatedCompositeFieldContainer[EnvoyEntry]
    next_page_token: str
    def __init__(self, envoys: _Optional[_Iterable[_Union[EnvoyEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExperimentSpec(_message.Message):
    __slots__ = ("name", "rounds", "opt_treatment", "model_spec", "envoys", "submitter", "bundle_size", "round_config", "sampling", "deadline", "communication", "strategy", "best", "privacy", "secure", "personal")
    class Sampling(_message.Message):
        __slots__ = ("envoys_per_round", "fraction", "seed")
        ENVOYS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
        FRACTION_FIELD_NUMBER: _ClassVar[int]
        SEED_FIELD_NUMBER: _ClassVar[int]
        envoys_per_round: int
        fraction: float
        seed: int
        def __init__(self, envoys_per_round: _Optional[int] = ..., fraction: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...
    class Deadline(_message.Message):
        __slots__ = ("round_timeout_s", "min_envoys")
        ROUND_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
        MIN_ENVOYS_FIELD_NUMBER: _ClassVar[int]
        round_timeout_s: float
        min_envoys: int
        def __init__(self, round_timeout_s: _Optional[float] = ..., min_envoys: _Optional[int] = ...) -> None: ...
    class Communication(_message.Message):
        __slots__ = ("compression", "send_deltas", "compress_downloads", "sync", "sync_every", "sync_threshold")
        COMPRESSION_FIELD_NUMBER: _ClassVar[int]
        SEND_DELTAS_FIELD_NUMBER: _ClassVar[int]
        COMPRESS_DOWNLOADS_FIELD_NUMBER: _ClassVar[int]
        SYNC_FIELD_NUMBER: _ClassVar[int]
        SYNC_EVERY_FIELD_NUMBER: _ClassVar[int]
        SYNC_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
        compression: str
        send_deltas: bool
        compress_downloads: bool
        sync: str
        sync_every: int
        sync_threshold: float
        def __init__(self, compression: _Optional[str] = ..., send_deltas: _Optional[bool] = ..., compress_downloads: _Optional[bool] = ..., sync: _Optional[str] = ..., sync_every: _Optional[int] = ..., sync_threshold: _Optional[float] = ...) -> None: ...
    class Strategy(_message.Message):
        __slots__ = ("name", "params")
        NAME_FIELD_NUMBER: _ClassVar[int]
        PARAMS_FIELD_NUMBER: _ClassVar[int]
        name: str
        params: str
        def __init__(self, name: _Optional[str] = ..., params: _Optional[str] = ...) -> None: ...
    class BestModel(_message.Message):
        __slots__ = ("metric", "higher_is_better")
        METRIC_FIELD_NUMBER: _ClassVar[int]
        HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
        metric: str
        higher_is_better: bool
        def __init__(self, metric: _Optional[str] = ..., higher_is_better: _Optional[bool] = ...) -> None: ...
    class Privacy(_message.Message):
        __slots__ = ("mode", "clipping_norm", "noise_multiplier", "delta", "epsilon", "clip_on", "adaptive", "target_clipped_quantile", "clip_norm_lr", "clipped_count_stddev", "max_epsilon")
        MODE_FIELD_NUMBER: _ClassVar[int]
        CLIPPING_NORM_FIELD_NUMBER: _ClassVar[int]
        NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
        DELTA_FIELD_NUMBER: _ClassVar[int]
        EPSILON_FIELD_NUMBER: _ClassVar[int]
        CLIP_ON_FIELD_NUMBER: _ClassVar[int]
        ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
        TARGET_CLIPPED_QUANTILE_FIELD_NUMBER: _ClassVar[int]
        CLIP_NORM_LR_FIELD_NUMBER: _ClassVar[int]
        CLIPPED_COUNT_STDDEV_FIELD_NUMBER: _ClassVar[int]
        MAX_EPSILON_FIELD_NUMBER: _ClassVar[int]
        mode: str
        clipping_norm: float
        noise_multiplier: float
        delta: float
        epsilon: float
        clip_on: str
        adaptive: bool
        target_clipped_quantile: float
        clip_norm_lr: float
        clipped_count_stddev: float
        max_epsilon: float
        def __init__(self, mode: _Optional[str] = ..., clipping_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., delta: _Optional[float] = ..., epsilon: _Optional[float] = ..., clip_on: _Optional[str] = ..., adaptive: _Optional[bool] = ..., target_clipped_quantile: _Optional[float] = ..., clip_norm_lr: _Optional[float] = ..., clipped_count_stddev: _Optional[float] = ..., max_epsilon: _Optional[float] = ...) -> None: ...
    class SecureAggregation(_message.Message):
        __slots__ = ("enabled", "threshold", "clip_range", "bits")
        ENABLED_FIELD_NUMBER: _ClassVar[int]
        THRESHOLD_FIELD_NUMBER: _ClassVar[int]
        CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
        BITS_FIELD_NUMBER: _ClassVar[int]
        enabled: bool
        threshold: float
        clip_range: float
        bits: int
        def __init__(self, enabled: _Optional[bool] = ..., threshold: _Optional[float] = ..., clip_range: _Optional[float] = ..., bits: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    OPT_TREATMENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEC_FIELD_NUMBER: _ClassVar[int]
    ENVOYS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTER_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROUND_CONFIG_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    COMMUNICATION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    rounds: int
    opt_treatment: str
    model_spec: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.TensorSpec]
    envoys: _containers.RepeatedScalarFieldContainer[str]
    submitter: str
    bundle_size: int
    round_config: str
    sampling: ExperimentSpec.Sampling
    deadline: ExperimentSpec.Deadline
    communication: ExperimentSpec.Communication
    strategy: ExperimentSpec.Strategy
    best: ExperimentSpec.BestModel
    privacy: ExperimentSpec.Privacy
    secure: ExperimentSpec.SecureAggregation
    personal: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., rounds: _Optional[int] = ..., opt_treatment: _Optional[str] = ..., model_spec: _Optional[_Iterable[_Union[_tensors_pb2.TensorSpec, _Mapping]]] = ..., envoys: _Optional[_Iterable[str]] = ..., submitter: _Optional[str] = ..., bundle_size: _Optional[int] = ..., round_config: _Optional[str] = ..., sampling: _Optional[_Union[ExperimentSpec.Sampling, _Mapping]] = ..., deadline: _Optional[_Union[ExperimentSpec.Deadline, _Mapping]] = ..., communication: _Optional[_Union[ExperimentSpec.Communication, _Mapping]] = ..., strategy: _Optional[_Union[ExperimentSpec.Strategy, _Mapping]] = ..., best: _Optional[_Union[ExperimentSpec.BestModel, _Mapping]] = ..., privacy: _Optional[_Union[ExperimentSpec.Privacy, _Mapping]] = ..., secure: _Optional[_Union[ExperimentSpec.SecureAggregation, _Mapping]] = ..., personal: _Optional[_Iterable[str]] = ...) -> None: ...

class ExperimentHeader(_message.Message):
    __slots__ = ("name", "rounds", "opt_treatment", "aggregation", "best_metric", "best_higher_is_better", "bundle_size", "envoys", "submitter", "model_spec", "min_envoys", "round_timeout_s", "aggregation_params", "envoys_per_round", "envoys_fraction", "sampling_seed", "round_config", "compression", "send_deltas", "compress_downloads", "sync", "sync_every", "sync_threshold")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    OPT_TREATMENT_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    BEST_METRIC_FIELD_NUMBER: _ClassVar[int]
    BEST_HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENVOYS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTER_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEC_FIELD_NUMBER: _ClassVar[int]
    MIN_ENVOYS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_PARAMS_FIELD_NUMBER: _ClassVar[int]
    ENVOYS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    ENVOYS_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_SEED_FIELD_NUMBER: _ClassVar[int]
    ROUND_CONFIG_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SEND_DELTAS_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_DOWNLOADS_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    SYNC_EVERY_FIELD_NUMBER: _ClassVar[int]
    SYNC_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    name: str
    rounds: int
    opt_treatment: str
    aggregation: str
    best_metric: str
    best_higher_is_better: bool
    bundle_size: int
    envoys: _containers.RepeatedScalarFieldContainer[str]
    submitter: str
    model_spec: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.TensorSpec]
    min_envoys: int
    round_timeout_s: float
    aggregation_params: str
    envoys_per_round: int
    envoys_fraction: float
    sampling_seed: int
    round_config: str
    compression: str
    send_deltas: bool
    compress_downloads: bool
    sync: str
    sync_every: int
    sync_threshold: float
    def __init__(self, name: _Optional[str] = ..., rounds: _Optional[int] = ..., opt_treatment: _Optional[str] = ..., aggregation: _Optional[str] = ..., best_metric: _Optional[str] = ..., best_higher_is_better: _Optional[bool] = ..., bundle_size: _Optional[int] = ..., envoys: _Optional[_Iterable[str]] = ..., submitter: _Optional[str] = ..., model_spec: _Optional[_Iterable[_Union[_tensors_pb2.TensorSpec, _Mapping]]] = ..., min_envoys: _Optional[int] = ..., round_timeout_s: _Optional[float] = ..., aggregation_params: _Optional[str] = ..., envoys_per_round: _Optional[int] = ..., envoys_fraction: _Optional[float] = ..., sampling_seed: _Optional[int] = ..., round_config: _Optional[str] = ..., compression: _Optional[str] = ..., send_deltas: _Optional[bool] = ..., compress_downloads: _Optional[bool] = ..., sync: _Optional[str] = ..., sync_every: _Optional[int] = ..., sync_threshold: _Optional[float] = ...) -> None: ...

class SubmitExperimentRequest(_message.Message):
    __slots__ = ("header", "bundle_data", "chunk", "spec")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    header: ExperimentHeader
    bundle_data: bytes
    chunk: _tensors_pb2.TensorChunk
    spec: ExperimentSpec
    def __init__(self, header: _Optional[_Union[ExperimentHeader, _Mapping]] = ..., bundle_data: _Optional[bytes] = ..., chunk: _Optional[_Union[_tensors_pb2.TensorChunk, _Mapping]] = ..., spec: _Optional[_Union[ExperimentSpec, _Mapping]] = ...) -> None: ...

class SubmitExperimentResponse(_message.Message):
    __slots__ = ("queue_position",)
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    queue_position: int
    def __init__(self, queue_position: _Optional[int] = ...) -> None: ...

class ListExperimentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExperimentsResponse(_message.Message):
    __slots__ = ("experiments", "next_page_token")
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[ExperimentStatus]
    next_page_token: str
    def __init__(self, experiments: _Optional[_Iterable[_Union[ExperimentStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetExperimentStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ExperimentStatus(_message.Message):
    __slots__ = ("name", "state", "current_round", "rounds", "envoys", "best_round", "best_value", "error", "submitted_at", "best_metric", "participants", "epsilon", "delta", "submitter", "started_at", "personal_validation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ENVOYS_FIELD_NUMBER: _ClassVar[int]
    BEST_ROUND_FIELD_NUMBER: _ClassVar[int]
    BEST_VALUE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    BEST_METRIC_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SUBMITTER_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_VALIDATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    current_round: int
    rounds: int
    envoys: _containers.RepeatedScalarFieldContainer[str]
    best_round: int
    best_value: float
    error: str
    submitted_at: float
    best_metric: str
    participants: _containers.RepeatedCompositeFieldContainer[RoundParticipants]
    epsilon: float
    delta: float
    submitter: str
    started_at: float
    personal_validation: _containers.RepeatedCompositeFieldContainer[EnvoyValidation]
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., current_round: _Optional[int] = ..., rounds: _Optional[int] = ..., envoys: _Optional[_Iterable[str]] = ..., best_round: _Optional[int] = ..., best_value: _Optional[float] = ..., error: _Optional[str] = ..., submitted_at: _Optional[float] = ..., best_metric: _Optional[str] = ..., participants: _Optional[_Iterable[_Union[RoundParticipants, _Mapping]]] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., submitter: _Optional[str] = ..., started_at: _Optional[float] = ..., personal_validation: _Optional[_Iterable[_Union[EnvoyValidation, _Mapping]]] = ...) -> None: ...

class EnvoyValidation(_message.Message):
    __slots__ = ("envoy", "round", "metrics")
    ENVOY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    envoy: str
    round: int
    metrics: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.Metric]
    def __init__(self, envoy: _Optional[str] = ..., round: _Optional[int] = ..., metrics: _Optional[_Iterable[_Union[_tensors_pb2.Metric, _Mapping]]] = ...) -> None: ...

class RoundParticipants(_message.Message):
    __slots__ = ("round", "envoys")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ENVOYS_FIELD_NUMBER: _ClassVar[int]
    round: int
    envoys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., envoys: _Optional[_Iterable[str]] = ...) -> None: ...

class StreamMetricsRequest(_message.Message):
    __slots__ = ("experiment_name", "snapshot")
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    experiment_name: str
    snapshot: bool
    def __init__(self, experiment_name: _Optional[str] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class MetricEvent(_message.Message):
    __slots__ = ("round", "envoy", "stage", "metrics", "timestamp", "experiment_done", "state", "round_time_s", "participants", "note")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ENVOY_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_DONE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIME_S_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    round: int
    envoy: str
    stage: str
    metrics: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.Metric]
    timestamp: float
    experiment_done: bool
    state: str
    round_time_s: float
    participants: _containers.RepeatedScalarFieldContainer[str]
    note: str
    def __init__(self, round: _Optional[int] = ..., envoy: _Optional[str] = ..., stage: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[_tensors_pb2.Metric, _Mapping]]] = ..., timestamp: _Optional[float] = ..., experiment_done: _Optional[bool] = ..., state: _Optional[str] = ..., round_time_s: _Optional[float] = ..., participants: _Optional[_Iterable[str]] = ..., note: _Optional[str] = ...) -> None: ...

class MetricEventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[MetricEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[MetricEvent, _Mapping]]] = ...) -> None: ...

class CancelExperimentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetAuditLogRequest(_message.Message):
    __slots__ = ("since", "after_id", "page_size")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    since: float
    after_id: int
    page_size: int
    def __init__(self, since: _Optional[float] = ..., after_id: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "timestamp", "action", "actor", "peer", "experiment", "detail")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    id: int
    timestamp: float
    action: str
    actor: str
    peer: str
    experiment: str
    detail: str
    def __init__(self, id: _Optional[int] = ..., timestamp: _Optional[float] = ..., action: _Optional[str] = ..., actor: _Optional[str] = ..., peer: _Optional[str] = ..., experiment: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class GetAuditLogResponse(_message.Message):
    __slots__ = ("entries", "more")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    more: bool
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("experiment_name", "which")
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    WHICH_FIELD_NUMBER: _ClassVar[int]
    experiment_name: str
    which: str
    def __init__(self, experiment_name: _Optional[str] = ..., which: _Optional[str] = ...) -> None: ...
