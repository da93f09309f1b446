from fedjax_proto import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardInfo(_message.Message):
    __slots__ = ("description", "sample_shape", "target_shape", "train_size", "valid_size", "hostname", "devices", "label_counts", "max_experiments")
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VALID_SIZE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    MAX_EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    description: str
    sample_shape: _containers.RepeatedScalarFieldContainer[str]
    target_shape: _containers.RepeatedScalarFieldContainer[str]
    train_size: int
    valid_size: int
    hostname: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    label_counts: _containers.RepeatedScalarFieldContainer[int]
    max_experiments: int
    def __init__(self, description: _Optional[str] = ..., sample_shape: _Optional[_Iterable[str]] = ..., target_shape: _Optional[_Iterable[str]] = ..., train_size: _Optional[int] = ..., valid_size: _Optional[int] = ..., hostname: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., label_counts: _Optional[_Iterable[int]] = ..., max_experiments: _Optional[int] = ...) -> None: ...

class RegisterEnvoyRequest(_message.Message):
    __slots__ = ("envoy_name", "shard_info", "instance_id")
    ENVOY_NAME_FIELD_NUMBER: _ClassVar[int]
    SHARD_INFO_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    envoy_name: str
    shard_info: ShardInfo
    instance_id: str
    def __init__(self, envoy_name: _Optional[str] = ..., shard_info: _Optional[_Union[ShardInfo, _Mapping]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class RegisterEnvoyResponse(_message.Message):
    __slots__ = ("health_check_period_s",)
    HEALTH_CHECK_PERIOD_S_FIELD_NUMBER: _ClassVar[int]
    health_check_period_s: float
    def __init__(self, health_check_period_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("envoy_name", "instance_id")
    ENVOY_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    envoy_name: str
    instance_id: str
    def __init__(self, envoy_name: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class WaitExperimentRequest(_message.Message):
    __slots__ = ("envoy_name",)
    ENVOY_NAME_FIELD_NUMBER: _ClassVar[int]
    envoy_name: str
    def __init__(self, envoy_name: _Optional[str] = ...) -> None: ...

class WaitExperimentResponse(_message.Message):
    __slots__ = ("experiment_name", "submitter", "bundle_sha256", "running")
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    SUBMITTER_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    experiment_name: str
    submitter: str
    bundle_sha256: str
    running: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, experiment_name: _Optional[str] = ..., submitter: _Optional[str] = ..., bundle_sha256: _Optional[str] = ..., running: _Optional[_Iterable[str]] = ...) -> None: ...

class GetExperimentBundleRequest(_message.Message):
    __slots__ = ("envoy_name", "experiment_name")
    ENVOY_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    envoy_name: str
    experiment_name: str
    def __init__(self, envoy_name: _Optional[str] = ..., experiment_name: _Optional[str] = ...) -> None: ...

class BundleChunk(_message.Message):
    __slots__ = ("data", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class WaitTaskRequest(_message.Message):
    __slots__ = ("envoy_name", "experiment_name", "max_wait_s", "inline_model")
    ENVOY_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    INLINE_MODEL_FIELD_NUMBER: _ClassVar[int]
    envoy_name: str
    experiment_name: str
    max_wait_s: float
    inline_model: bool
    def __init__(self, envoy_name: _Optional[str] = ..., experiment_name: _Optional[str] = ..., max_wait_s: _Optional[float] = ..., inline_model: _Optional[bool] = ...) -> None: ...

class WaitTaskResponse(_message.Message):
    __slots__ = ("kind", "round", "opt_treatment", "upload_tensors", "message", "task_kwargs", "from_global", "check_in", "compression", "send_deltas", "clip_norm", "noise_std", "secagg", "personal", "model", "model_inline", "reports_with_upload")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NONE: _ClassVar[WaitTaskResponse.Kind]
        TRAIN: _ClassVar[WaitTaskResponse.Kind]
        VALIDATE: _ClassVar[WaitTaskResponse.Kind]
        FINISHED: _ClassVar[WaitTaskResponse.Kind]
        SYNC: _ClassVar[WaitTaskResponse.Kind]
        SECAGG: _ClassVar[WaitTaskResponse.Kind]
    NONE: WaitTaskResponse.Kind
    TRAIN: WaitTaskResponse.Kind
    VALIDATE: WaitTaskResponse.Kind
    FINISHED: WaitTaskResponse.Kind
    SYNC: WaitTaskResponse.Kind
    SECAGG: WaitTaskResponse.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OPT_TREATMENT_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_TENSORS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TASK_KWARGS_FIELD_NUMBER: _ClassVar[int]
    FROM_GLOBAL_FIELD_NUMBER: _ClassVar[int]
    CHECK_IN_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SEND_DELTAS_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_INLINE_FIELD_NUMBER: _ClassVar[int]
    REPORTS_WITH_UPLOAD_FIELD_NUMBER: _ClassVar[int]
    kind: WaitTaskResponse.Kind
    round: int
    opt_treatment: str
    upload_tensors: _containers.RepeatedScalarFieldContainer[str]
    message: str
    task_kwargs: str
    from_global: bool
    check_in: bool
    compression: str
    send_deltas: bool
    clip_norm: float
    noise_std: float
    secagg: SecAggStep
    personal: _containers.RepeatedScalarFieldContainer[str]
    model: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.TensorChunk]
    model_inline: bool
    reports_with_upload: bool
    def __init__(self, kind: _Optional[_Union[WaitTaskResponse.Kind, str]] = ..., round: _Optional[int] = ..., opt_treatment: _Optional[str] = ..., upload_tensors: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., task_kwargs: _Optional[str] = ..., from_global: _Optional[bool] = ..., check_in: _Optional[bool] = ..., compression: _Optional[str] = ..., send_deltas: _Optional[bool] = ..., clip_norm: _Optional[float] = ..., noise_std: _Optional[float] = ..., secagg: _Optional[_Union[SecAggStep, _Mapping]] = ..., personal: _Optional[_Iterable[str]] = ..., model: _Optional[_Iterable[_Union[_tensors_pb2.TensorChunk, _Mapping]]] = ..., model_inline: _Optional[bool] = ..., reports_with_upload: _Optional[bool] = ...) -> None: ...

class SecAggKeys(_message.Message):
    __slots__ = ("cipher_pk", "mask_pk")
    CIPHER_PK_FIELD_NUMBER: _ClassVar[int]
    MASK_PK_FIELD_NUMBER: _ClassVar[int]
    cipher_pk: bytes
    mask_pk: bytes
    def __init__(self, cipher_pk: _Optional[bytes] = ..., mask_pk: _Optional[bytes] = ...) -> None: ...

class SecAggStep(_message.Message):
    __slots__ = ("phase", "participants", "threshold", "bits", "clip_range", "size", "seed", "weight_scale", "keys", "ciphertexts", "survivors", "dropped")
    class KeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SecAggKeys
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SecAggKeys, _Mapping]] = ...) -> None: ...
    class CiphertextsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SCALE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    phase: str
    participants: _containers.RepeatedScalarFieldContainer[str]
    threshold: float
    bits: int
    clip_range: float
    size: int
    seed: int
    weight_scale: float
    keys: _containers.MessageMap[str, SecAggKeys]
    ciphertexts: _containers.ScalarMap[str, bytes]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, phase: _Optional[str] = ..., participants: _Optional[_Iterable[str]] = ..., threshold: _Optional[float] = ..., bits: _Optional[int] = ..., clip_range: _Optional[float] = ..., size: _Optional[int] = ..., seed: _Optional[int] = ..., weight_scale: _Optional[float] = ..., keys: _Optional[_Mapping[str, SecAggKeys]] = ..., ciphertexts: _Optional[_Mapping[str, bytes]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggShares(_message.Message):
    __slots__ = ("items",)
    class ItemsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.ScalarMap[str, bytes]
    def __init__(self, items: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("envoy_name", "experiment_name", "round", "keys", "shares", "reveal")
    ENVOY_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    REVEAL_FIELD_NUMBER: _ClassVar[int]
    envoy_name: str
    experiment_name: str
    round: int
    keys: SecAggKeys
    shares: SecAggShares
    reveal: SecAggShares
    def __init__(self, envoy_name: _Optional[str] = ..., experiment_name: _Optional[str] = ..., round: _Optional[int] = ..., keys: _Optional[_Union[SecAggKeys, _Mapping]] = ..., shares: _Optional[_Union[SecAggShares, _Mapping]] = ..., reveal: _Optional[_Union[SecAggShares, _Mapping]] = ...) -> None: ...

class SecAggResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRoundModelRequest(_message.Message):
    __slots__ = ("envoy_name", "experiment_name", "round")
    ENVOY_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    envoy_name: str
    experiment_name: str
    round: int
    def __init__(self, envoy_name: _Optional[str] = ..., experiment_name: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("envoy_name", "experiment_name", "round", "metrics", "sample_count", "stage")
    ENVOY_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    envoy_name: str
    experiment_name: str
    round: int
    metrics: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.Metric]
    sample_count: int
    stage: str
    def __init__(self, envoy_name: _Optional[str] = ..., experiment_name: _Optional[str] = ..., round: _Optional[int] = ..., metrics: _Optional[_Iterable[_Union[_tensors_pb2.Metric, _Mapping]]] = ..., sample_count: _Optional[int] = ..., stage: _Optional[str] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageReport(_message.Message):
    __slots__ = ("stage", "metrics", "sample_count")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    stage: str
    metrics: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.Metric]
    sample_count: int
    def __init__(self, stage: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[_tensors_pb2.Metric, _Mapping]]] = ..., sample_count: _Optional[int] = ...) -> None: ...

class UploadUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    class Header(_message.Message):
        __slots__ = ("envoy_name", "experiment_name", "round", "train_sample_count", "clip_norm", "noise_std", "reports", "next_task_wait_s", "inline_model")
        ENVOY_NAME_FIELD_NUMBER: _ClassVar[int]
        EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
        ROUND_FIELD_NUMBER: _ClassVar[int]
        TRAIN_SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
        CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
        NOISE_STD_FIELD_NUMBER: _ClassVar[int]
        REPORTS_FIELD_NUMBER: _ClassVar[int]
        NEXT_TASK_WAIT_S_FIELD_NUMBER: _ClassVar[int]
        INLINE_MODEL_FIELD_NUMBER: _ClassVar[int]
        envoy_name: str
        experiment_name: str
        round: int
        train_sample_count: int
        clip_norm: float
        noise_std: float
        reports: _containers.RepeatedCompositeFieldContainer[StageReport]
        next_task_wait_s: float
        inline_model: bool
        def __init__(self, envoy_name: _Optional[str] = ..., experiment_name: _Optional[str] = ..., round: _Optional[int] = ..., train_sample_count: _Optional[int] = ..., clip_norm: _Optional[float] = ..., noise_std: _Optional[float] = ..., reports: _Optional[_Iterable[_Union[StageReport, _Mapping]]] = ..., next_task_wait_s: _Optional[float] = ..., inline_model: _Optional[bool] = ...) -> None: ...
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadUpdateRequest.Header
    chunk: _tensors_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[UploadUpdateRequest.Header, _Mapping]] = ..., chunk: _Optional[_Union[_tensors_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class SmallUpdateRequest(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: UploadUpdateRequest.Header
    chunks: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.TensorChunk]
    def __init__(self, header: _Optional[_Union[UploadUpdateRequest.Header, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[_tensors_pb2.TensorChunk, _Mapping]]] = ...) -> None: ...

class UploadUpdateResponse(_message.Message):
    __slots__ = ("bytes_received", "next_task")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TASK_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    next_task: WaitTaskResponse
    def __init__(self, bytes_received: _Optional[int] = ..., next_task: _Optional[_Union[WaitTaskResponse, _Mapping]] = ...) -> None: ...

class ReportFailureRequest(_message.Message):
    __slots__ = ("envoy_name", "experiment_name", "error", "round", "worker_lost", "refused")
    ENVOY_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKER_LOST_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    envoy_name: str
    experiment_name: str
    error: str
    round: int
    worker_lost: bool
    refused: bool
    def __init__(self, envoy_name: _Optional[str] = ..., experiment_name: _Optional[str] = ..., error: _Optional[str] = ..., round: _Optional[int] = ..., worker_lost: _Optional[bool] = ..., refused: _Optional[bool] = ...) -> None: ...

class ReportFailureResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckInRequest(_message.Message):
    __slots__ = ("envoy_name", "experiment_name", "round", "divergence")
    ENVOY_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    envoy_name: str
    experiment_name: str
    round: int
    divergence: float
    def __init__(self, envoy_name: _Optional[str] = ..., experiment_name: _Optional[str] = ..., round: _Optional[int] = ..., divergence: _Optional[float] = ...) -> None: ...

class CheckInResponse(_message.Message):
    __slots__ = ("upload",)
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    upload: bool
    def __init__(self, upload: _Optional[bool] = ...) -> None: ...
