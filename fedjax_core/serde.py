"""Record <-> protobuf conversions, one ``x_to_proto`` / ``x_from_proto`` pair per record.

The only module besides the transport that imports generated proto code.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator

from fedjax_core import records as r
from fedjax_core import spec as experiment_spec
from fedjax_core.errors import InvalidRequestError
from fedjax_proto import envoy_service_pb2 as env_pb
from fedjax_proto import federation_service_pb2 as fed_pb
from fedjax_core.records import OptTreatment
from fedjax_core.spec import ExperimentSpec, SyncMode
from fedjax_proto import tensors_pb2 as t_pb

_TASK_KINDS = {
    r.TaskKind.NONE: env_pb.WaitTaskResponse.NONE,
    r.TaskKind.TRAIN: env_pb.WaitTaskResponse.TRAIN,
    r.TaskKind.VALIDATE: env_pb.WaitTaskResponse.VALIDATE,
    r.TaskKind.FINISHED: env_pb.WaitTaskResponse.FINISHED,
    r.TaskKind.SYNC: env_pb.WaitTaskResponse.SYNC,
    r.TaskKind.SECAGG: env_pb.WaitTaskResponse.SECAGG,
}
_TASK_KIND_NAMES = {v: k for k, v in _TASK_KINDS.items()}


def encoding_to_proto(e: r.Encoding) -> t_pb.TensorEncoding:
    return t_pb.TensorEncoding(codec=e.codec, dtype=e.dtype, delta=e.delta, scale=list(e.scale),
                               zero_point=list(e.zero_point))


def encoding_from_proto(msg: t_pb.TensorEncoding) -> r.Encoding:
    return r.Encoding(codec=msg.codec, dtype=msg.dtype, delta=msg.delta, scale=tuple(float(v) for v in msg.scale),
                      zero_point=tuple(int(v) for v in msg.zero_point))


def spec_to_proto(spec: r.TensorSpec) -> t_pb.TensorSpec:
    msg = t_pb.TensorSpec(name=spec.name, dtype=spec.dtype, shape=list(spec.shape))
    if spec.encoding is not None:
        msg.encoding.CopyFrom(encoding_to_proto(spec.encoding))
    return msg


def spec_from_proto(msg: t_pb.TensorSpec) -> r.TensorSpec:
    encoding = encoding_from_proto(msg.encoding) if msg.HasField("encoding") else None
    return r.TensorSpec(name=msg.name, dtype=msg.dtype, shape=tuple(int(d) for d in msg.shape), encoding=encoding)


def chunk_to_proto(chunk: r.TensorChunk) -> t_pb.TensorChunk:
    msg = t_pb.TensorChunk(name=chunk.name, offset=chunk.offset, data=chunk.data)
    if chunk.spec is not None:
        msg.spec.CopyFrom(spec_to_proto(chunk.spec))
    return msg


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_key(field) -> bytes:
    """The key of a length-delimited field (bytes, string, message), from its descriptor."""
    return varint(field.number << 3 | 2)


_DATA = t_pb.TensorChunk.DESCRIPTOR.fields_by_name["data"]
_DATA_KEY = field_key(_DATA)
_PACKED_KEY = field_key(t_pb.TensorChunk.DESCRIPTOR.fields_by_name["packed"])
if _DATA.number != max(f.number for f in t_pb.TensorChunk.DESCRIPTOR.fields if f.name != "packed"):
    raise ImportError("TensorChunk.data must keep the highest field number of a chunk's own fields: chunk_wire "
                      "writes it after the others")
PACK_BELOW = 64 << 10  # a chunk smaller than this travels packed with others (TensorChunk.packed)
PACK_BYTES = 1 << 20  # how much a packed message carries at most, about a full chunk's worth


def chunk_wire(chunk: r.TensorChunk) -> tuple[bytes, bytes | memoryview]:
    """``chunk`` as a serialized TensorChunk in two parts whose concatenation is the bytes protobuf writes:
    every other field (serialized by protobuf) with ``data``'s key, then ``data`` itself, the last field by
    number, so where protobuf puts it too. Joining them copies ``data`` once; protobuf would copy it into
    the message and again into the serialized bytes."""
    head = t_pb.TensorChunk(name=chunk.name, offset=chunk.offset)
    if chunk.spec is not None:
        head.spec.CopyFrom(spec_to_proto(chunk.spec))
    size = memoryview(chunk.data).nbytes  # bytes, not elements, of a view of another format
    data_key = _DATA_KEY + varint(size) if size else b""  # proto3 leaves an empty bytes field out
    return head.SerializeToString() + data_key, chunk.data


def pack(chunks: Iterable[r.TensorChunk]) -> Iterator[list[r.TensorChunk]]:
    """``chunks`` grouped into messages: a chunk of PACK_BELOW bytes or more alone, smaller ones together up to
    PACK_BYTES (in order: a receiver sees the same chunk sequence)."""
    group: list[r.TensorChunk] = []
    size = 0
    for chunk in chunks:
        n = memoryview(chunk.data).nbytes
        if n >= PACK_BELOW:
            if group:
                yield group
                group, size = [], 0
            yield [chunk]
            continue
        group.append(chunk)
        size += n + 64  # the spec and keys around it
        if size >= PACK_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def message_wire(group: list[r.TensorChunk]) -> list[bytes | memoryview]:
    """One TensorChunk message carrying ``group`` (a group of :func:`pack`), as parts whose concatenation is
    its serialization: the chunk itself, or a message of ``packed`` chunks."""
    if len(group) == 1:
        return list(chunk_wire(group[0]))
    parts: list[bytes | memoryview] = []
    for chunk in group:
        head, data = chunk_wire(chunk)
        parts += [_PACKED_KEY + varint(len(head) + memoryview(data).nbytes) + head, data]
    return parts


def chunk_messages(chunks: Iterable[r.TensorChunk]) -> Iterator[bytes]:
    """``chunks`` as serialized TensorChunk messages, small ones packed: what the director streams (its servers
    pass such bytes through, see director/parsing.py)."""
    for group in pack(chunks):
        yield b"".join(message_wire(group))


def chunk_protos(chunks: Iterable[r.TensorChunk]) -> Iterator[t_pb.TensorChunk]:
    """``chunks`` as TensorChunk messages, small ones packed (for a client stub that takes messages)."""
    for group in pack(chunks):
        yield (chunk_to_proto(group[0]) if len(group) == 1
               else t_pb.TensorChunk(packed=[chunk_to_proto(c) for c in group]))


def chunk_from_proto(msg: t_pb.TensorChunk) -> r.TensorChunk:
    if msg.packed:
        raise InvalidRequestError("a packed TensorChunk where a single tensor chunk belongs: packed chunks do not "
                                  "nest")
    spec = spec_from_proto(msg.spec) if msg.HasField("spec") else None
    return r.TensorChunk(name=msg.name, offset=int(msg.offset), data=bytes(msg.data), spec=spec)


def unpacked_chunks(msg: t_pb.TensorChunk) -> list[r.TensorChunk]:
    """The chunks one message carries: itself, or the ones packed in it."""
    if not msg.packed:
        return [chunk_from_proto(msg)]
    if msg.name or msg.offset or msg.data or msg.HasField("spec"):
        raise InvalidRequestError("a TensorChunk carries either one chunk or packed ones, not both")
    return [chunk_from_proto(inner) for inner in msg.packed]


def chunk_stream(messages: Iterable[t_pb.TensorChunk]) -> Iterator[r.TensorChunk]:
    """Every chunk a stream of TensorChunk messages carries, in order."""
    for msg in messages:
        yield from unpacked_chunks(msg)


def metrics_to_proto(metrics: tuple[r.Metric, ...] | list[r.Metric]) -> list[t_pb.Metric]:
    return [t_pb.Metric(task=m.task, name=m.name, value=float(m.value)) for m in metrics]


def metrics_from_proto(msgs) -> tuple[r.Metric, ...]:
    return tuple(r.Metric(task=m.task, name=m.name, value=float(m.value)) for m in msgs)


def stage_report_to_proto(rep: r.StageReport) -> env_pb.StageReport:
    return env_pb.StageReport(stage=rep.stage, metrics=metrics_to_proto(rep.metrics), sample_count=rep.sample_count)


def stage_report_from_proto(msg: env_pb.StageReport) -> r.StageReport:
    return r.StageReport(msg.stage, metrics_from_proto(msg.metrics), int(msg.sample_count))


def shard_info_to_proto(info: r.ShardInfo) -> env_pb.ShardInfo:
    return env_pb.ShardInfo(
        description=info.description, sample_shape=list(info.sample_shape),
        target_shape=list(info.target_shape), train_size=info.train_size,
        valid_size=info.valid_size, hostname=info.hostname, devices=list(info.devices),
        label_counts=list(info.label_counts), max_experiments=info.max_experiments,
    )


def shard_info_from_proto(msg: env_pb.ShardInfo) -> r.ShardInfo:
    return r.ShardInfo(
        description=msg.description, sample_shape=tuple(msg.sample_shape),
        target_shape=tuple(msg.target_shape), train_size=int(msg.train_size),
        valid_size=int(msg.valid_size), hostname=msg.hostname, devices=tuple(msg.devices),
        label_counts=tuple(int(n) for n in msg.label_counts), max_experiments=msg.max_experiments or 1,
    )


def envoy_entry_to_proto(entry: r.EnvoyEntry) -> fed_pb.EnvoyEntry:
    return fed_pb.EnvoyEntry(
        name=entry.name, shard_info=shard_info_to_proto(entry.shard_info), is_online=entry.is_online,
        last_seen=entry.last_seen, current_experiment=entry.current_experiment,
    )


def envoy_entry_from_proto(msg: fed_pb.EnvoyEntry) -> r.EnvoyEntry:
    return r.EnvoyEntry(
        name=msg.name, shard_info=shard_info_from_proto(msg.shard_info), is_online=msg.is_online,
        last_seen=msg.last_seen, current_experiment=msg.current_experiment,
    )


def experiment_spec_to_proto(s: ExperimentSpec) -> fed_pb.ExperimentSpec:
    pb = fed_pb.ExperimentSpec
    c = s.communication
    return pb(
        name=s.name, rounds=s.rounds, opt_treatment=str(s.opt_treatment),
        model_spec=[spec_to_proto(t) for t in s.model_spec], envoys=list(s.envoys), submitter=s.submitter,
        bundle_size=s.bundle_size, round_config=s.round_config,
        sampling=pb.Sampling(envoys_per_round=s.sampling.envoys_per_round, fraction=s.sampling.fraction,
                             seed=s.sampling.seed),
        deadline=pb.Deadline(round_timeout_s=s.deadline.round_timeout_s, min_envoys=s.deadline.min_envoys),
        communication=pb.Communication(compression=c.compression, send_deltas=c.send_deltas,
                                       compress_downloads=c.compress_downloads, sync=str(c.sync),
                                       sync_every=c.sync_every, sync_threshold=c.sync_threshold),
        strategy=pb.Strategy(name=s.strategy.name, params=s.strategy.params),
        best=pb.BestModel(metric=s.best.metric, higher_is_better=s.best.higher_is_better),
        privacy=pb.Privacy(**{f.name: (str(getattr(s.privacy, f.name)) if f.name in ("mode", "clip_on")
                                      else getattr(s.privacy, f.name))
                              for f in dataclasses.fields(s.privacy)}) if s.privacy.enabled else None,
        secure=pb.SecureAggregation(enabled=True, threshold=s.secure.threshold, clip_range=s.secure.clip_range,
                                    bits=s.secure.bits) if s.secure.enabled else None,
        personal=list(s.personal),
    )


def experiment_spec_from_proto(msg: fed_pb.ExperimentSpec) -> ExperimentSpec:
    """The spec a client sent; its enums must be ones this director knows (:func:`spec.validate` checks the rest)."""
    c = msg.communication
    return ExperimentSpec(
        name=msg.name, rounds=int(msg.rounds), opt_treatment=experiment_spec.enum_of(
            OptTreatment, msg.opt_treatment, "opt_treatment"),
        model_spec=tuple(spec_from_proto(t) for t in msg.model_spec), envoys=tuple(msg.envoys),
        submitter=msg.submitter, bundle_size=int(msg.bundle_size), round_config=msg.round_config,
        sampling=experiment_spec.Sampling(int(msg.sampling.envoys_per_round), msg.sampling.fraction,
                                          int(msg.sampling.seed)),
        deadline=experiment_spec.Deadline(msg.deadline.round_timeout_s, int(msg.deadline.min_envoys)),
        communication=experiment_spec.Communication(
            c.compression, c.send_deltas, c.compress_downloads,
            experiment_spec.enum_of(SyncMode, c.sync or SyncMode.EVERY_ROUND, "sync"), int(c.sync_every),
            c.sync_threshold),
        strategy=experiment_spec.StrategySpec(msg.strategy.name or "fedavg", msg.strategy.params or "{}"),
        best=experiment_spec.BestModel(msg.best.metric, msg.best.higher_is_better),
        privacy=_privacy_section(msg.privacy) if msg.HasField("privacy") else experiment_spec.Privacy(),
        secure=experiment_spec.SecureAggregation(msg.secure.enabled, msg.secure.threshold, msg.secure.clip_range,
                                                 int(msg.secure.bits)) if msg.HasField("secure")
        else experiment_spec.SecureAggregation(),
        personal=tuple(msg.personal),
    )


def _privacy_section(msg: fed_pb.ExperimentSpec.Privacy) -> experiment_spec.Privacy:
    """The privacy section a client sent (its mode and clip_on must be known here; ``validate`` checks the rest)."""
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(experiment_spec.Privacy)}
    return experiment_spec.privacy_from_dict(fields)


def spec_from_legacy_header(msg: fed_pb.ExperimentHeader) -> ExperimentSpec:
    """The spec of a flat header from a fedjax-core 0.1.0 notebook (read for one release)."""
    fields = {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}
    fields["model_spec"] = tuple(spec_from_proto(t) for t in msg.model_spec)
    for key in ("rounds", "bundle_size", "min_envoys", "envoys_per_round", "sampling_seed", "sync_every"):
        fields[key] = int(fields[key])
    return experiment_spec.from_flat(fields)


def status_to_proto(s: r.ExperimentStatus) -> fed_pb.ExperimentStatus:
    return fed_pb.ExperimentStatus(
        name=s.name, state=s.state, current_round=s.current_round, rounds=s.rounds,
        envoys=list(s.envoys), best_round=s.best_round, best_value=s.best_value, error=s.error,
        submitted_at=s.submitted_at, best_metric=s.best_metric,
        participants=[fed_pb.RoundParticipants(round=i, envoys=list(p)) for i, p in s.participants.items()],
        epsilon=None if math.isnan(s.epsilon) else s.epsilon, delta=None if math.isnan(s.delta) else s.delta,
        submitter=s.submitter, started_at=s.started_at,
        personal_validation=[envoy_validation_to_proto(v) for v in s.personal_validation],
    )


def status_from_proto(msg: fed_pb.ExperimentStatus) -> r.ExperimentStatus:
    return r.ExperimentStatus(
        name=msg.name, state=msg.state, current_round=int(msg.current_round), rounds=int(msg.rounds),
        envoys=tuple(msg.envoys), best_round=int(msg.best_round), best_value=msg.best_value,
        error=msg.error, submitted_at=msg.submitted_at, best_metric=msg.best_metric,
        participants={int(p.round): tuple(p.envoys) for p in sorted(msg.participants, key=lambda p: p.round)},
        epsilon=msg.epsilon if msg.HasField("epsilon") else math.nan,
        delta=msg.delta if msg.HasField("delta") else math.nan,
        submitter=msg.submitter, started_at=msg.started_at,
        personal_validation=tuple(envoy_validation_from_proto(v) for v in msg.personal_validation),
    )


def envoy_validation_to_proto(v: r.EnvoyValidation) -> fed_pb.EnvoyValidation:
    return fed_pb.EnvoyValidation(envoy=v.envoy, round=v.round, metrics=metrics_to_proto(v.metrics))


def envoy_validation_from_proto(msg: fed_pb.EnvoyValidation) -> r.EnvoyValidation:
    return r.EnvoyValidation(envoy=msg.envoy, round=int(msg.round), metrics=metrics_from_proto(msg.metrics))


def audit_entry_to_proto(e: r.AuditEntry) -> fed_pb.AuditEntry:
    return fed_pb.AuditEntry(id=e.id, timestamp=e.timestamp, action=e.action, actor=e.actor, peer=e.peer,
                             experiment=e.experiment, detail=e.detail)


def audit_entry_from_proto(msg: fed_pb.AuditEntry) -> r.AuditEntry:
    return r.AuditEntry(action=msg.action, actor=msg.actor, peer=msg.peer, experiment=msg.experiment,
                        detail=msg.detail, timestamp=msg.timestamp, id=int(msg.id))


def metric_event_to_proto(e: r.MetricEvent) -> fed_pb.MetricEvent:
    return fed_pb.MetricEvent(
        round=e.round, envoy=e.envoy, stage=e.stage, metrics=metrics_to_proto(e.metrics),
        timestamp=e.timestamp, experiment_done=e.experiment_done, state=e.state,
        round_time_s=e.round_time_s, participants=list(e.participants), note=e.note,
    )


def metric_event_batches(events: Iterable[r.MetricEvent], max_bytes: int) -> Iterator[fed_pb.MetricEventBatch]:
    """``events`` as MetricEventBatch messages of at most ``max_bytes`` of events each (one event at least, however
    large), in order; none for no events."""
    batch, size = fed_pb.MetricEventBatch(), 0
    for event in events:
        message = metric_event_to_proto(event)
        nbytes = message.ByteSize()
        if batch.events and size + nbytes > max_bytes:
            yield batch
            batch, size = fed_pb.MetricEventBatch(), 0
        batch.events.append(message)
        size += nbytes
    if batch.events:
        yield batch


def _stage(text: str) -> r.Stage | str:
    return r.Stage(text) if text in r.Stage.__members__.values() else text


def metric_event_from_proto(msg: fed_pb.MetricEvent) -> r.MetricEvent:
    return r.MetricEvent(
        round=int(msg.round), envoy=msg.envoy, stage=_stage(msg.stage), metrics=metrics_from_proto(msg.metrics),
        timestamp=msg.timestamp, experiment_done=msg.experiment_done, state=msg.state,
        round_time_s=msg.round_time_s, participants=tuple(msg.participants), note=msg.note,
    )


def task_to_proto(t: r.Task) -> env_pb.WaitTaskResponse:
    return env_pb.WaitTaskResponse(
        kind=_TASK_KINDS[t.kind], round=t.round, opt_treatment=t.opt_treatment,
        upload_tensors=list(t.upload_tensors), message=t.message, task_kwargs=t.task_kwargs,
        from_global=t.from_global, check_in=t.check_in, compression=t.compression, send_deltas=t.send_deltas,
        clip_norm=t.clip_norm, noise_std=t.noise_std,
        secagg=secagg_step_to_proto(t.secagg) if t.secagg is not None else None, personal=list(t.personal),
        reports_with_upload=t.reports_with_upload,
    )


def task_from_proto(msg: env_pb.WaitTaskResponse) -> r.Task:
    return r.Task(
        kind=_TASK_KIND_NAMES[msg.kind], round=int(msg.round), opt_treatment=msg.opt_treatment,
        upload_tensors=tuple(msg.upload_tensors), message=msg.message, task_kwargs=msg.task_kwargs,
        from_global=msg.from_global, check_in=msg.check_in, compression=msg.compression, send_deltas=msg.send_deltas,
        clip_norm=msg.clip_norm, noise_std=msg.noise_std,
        secagg=secagg_step_from_proto(msg.secagg) if msg.HasField("secagg") else None,
        personal=tuple(msg.personal), reports_with_upload=msg.reports_with_upload,
    )


def secagg_keys_to_proto(k: r.SecAggKeys) -> env_pb.SecAggKeys:
    return env_pb.SecAggKeys(cipher_pk=k.cipher_pk, mask_pk=k.mask_pk)


def secagg_keys_from_proto(msg: env_pb.SecAggKeys) -> r.SecAggKeys:
    return r.SecAggKeys(bytes(msg.cipher_pk), bytes(msg.mask_pk))


def secagg_step_to_proto(s: r.SecAggStep) -> env_pb.SecAggStep:
    return env_pb.SecAggStep(
        phase=s.phase, participants=list(s.participants), threshold=s.threshold, bits=s.bits,
        clip_range=s.clip_range, size=s.size, seed=s.seed, weight_scale=s.weight_scale,
        keys={k: secagg_keys_to_proto(v) for k, v in s.keys.items()},
        ciphertexts=dict(s.ciphertexts), survivors=list(s.survivors), dropped=list(s.dropped))


def secagg_step_from_proto(msg: env_pb.SecAggStep) -> r.SecAggStep:
    return r.SecAggStep(
        phase=msg.phase, participants=tuple(msg.participants), threshold=msg.threshold, bits=int(msg.bits),
        clip_range=msg.clip_range, size=int(msg.size), seed=int(msg.seed), weight_scale=msg.weight_scale,
        keys={k: secagg_keys_from_proto(v) for k, v in msg.keys.items()},
        ciphertexts=dict(msg.ciphertexts), survivors=tuple(msg.survivors), dropped=tuple(msg.dropped))
