"""fedjax_core.serde: every record survives ``x_to_proto`` then ``x_from_proto`` unchanged.

Records are built from ``dataclasses.fields`` with a non-default value in every field, so a
field added to a record without its conversion makes these tests fail.
"""
from __future__ import annotations

import array
import collections.abc
import dataclasses
import itertools
import math
import types
import typing

import pytest

from fedjax_core import records as r
from fedjax_core import serde
from fedjax_core import spec as experiment_spec
from fedjax_core.errors import InvalidRequestError
from fedjax_core.spec import ExperimentSpec
from fedjax_proto import tensors_pb2 as t_pb

# Fields whose values are constrained to a vocabulary: a non-default member of it.
_CHOICES = {
    (r.Task, "kind"): [r.TaskKind.TRAIN, r.TaskKind.VALIDATE, r.TaskKind.FINISHED, r.TaskKind.SECAGG],
    (ExperimentSpec, "opt_treatment"): [r.OptTreatment.CONTINUE_GLOBAL],
    (experiment_spec.Communication, "sync"): [experiment_spec.SyncMode.PERIODIC],
    (r.MetricEvent, "stage"): [r.Stage.LOCAL],
    (experiment_spec.Privacy, "mode"): [experiment_spec.PrivacyMode.CENTRAL],
    (experiment_spec.Privacy, "clip_on"): [experiment_spec.ClipOn.ENVOY],
}
_counter = itertools.count(1)


def _value(tp, owner: type, name: str, default):
    """A value of type ``tp`` that differs from ``default``."""
    if (owner, name) in _CHOICES:
        options = [v for v in _CHOICES[(owner, name)] if v != default]
        return options[next(_counter) % len(options)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _value(inner[0], owner, name, default)
    if origin is tuple:
        args = typing.get_args(tp)
        item = args[0]
        return tuple(_value(item, owner, name, None) for _ in range(3))
    if origin is collections.abc.Mapping:
        key, item = typing.get_args(tp)
        return {_value(key, owner, name, None): _value(item, owner, name, None) for _ in range(3)}
    if dataclasses.is_dataclass(tp):
        return build(tp)
    n = next(_counter)
    if tp is bool:
        return not default if isinstance(default, bool) else True
    if tp is int:
        return (1 << 33) + n  # beyond 32 bits: int64 on the wire
    if tp is float:
        return 1 / 3 + n * 1e6  # not representable in float32
    if tp is str:
        return f"{name}-{n}-é"
    if tp is bytes:
        return bytes(range(256)) + bytes([n % 256])
    raise TypeError(f"no test value for {owner.__name__}.{name}: {tp!r}")


def build(cls: type):
    hints = typing.get_type_hints(cls, {**vars(r), **vars(experiment_spec)})
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        value = _value(hints[f.name], cls, f.name, default)
        if default is not None:
            assert value != default, f"{cls.__name__}.{f.name}"
        kwargs[f.name] = value
    return cls(**kwargs)


PAIRS = {
    r.Encoding: (serde.encoding_to_proto, serde.encoding_from_proto),
    r.TensorSpec: (serde.spec_to_proto, serde.spec_from_proto),
    r.TensorChunk: (serde.chunk_to_proto, serde.chunk_from_proto),
    r.ShardInfo: (serde.shard_info_to_proto, serde.shard_info_from_proto),
    r.EnvoyEntry: (serde.envoy_entry_to_proto, serde.envoy_entry_from_proto),
    ExperimentSpec: (serde.experiment_spec_to_proto, serde.experiment_spec_from_proto),
    r.ExperimentStatus: (serde.status_to_proto, serde.status_from_proto),
    r.MetricEvent: (serde.metric_event_to_proto, serde.metric_event_from_proto),
    r.Task: (serde.task_to_proto, serde.task_from_proto),
    r.SecAggKeys: (serde.secagg_keys_to_proto, serde.secagg_keys_from_proto),
    r.SecAggStep: (serde.secagg_step_to_proto, serde.secagg_step_from_proto),
    r.EnvoyValidation: (serde.envoy_validation_to_proto, serde.envoy_validation_from_proto),
    r.AuditEntry: (serde.audit_entry_to_proto, serde.audit_entry_from_proto),
    r.StageReport: (serde.stage_report_to_proto, serde.stage_report_from_proto),
}


def _record_classes() -> list[type]:
    return [obj for obj in vars(r).values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == r.__name__]


@pytest.mark.parametrize("cls", list(PAIRS), ids=lambda c: c.__name__)
def test_round_trip_with_every_field_set(cls):
    to_proto, from_proto = PAIRS[cls]
    record = build(cls)
    back = from_proto(to_proto(record))
    assert type(back) is cls
    for f in dataclasses.fields(cls):
        got, want = getattr(back, f.name), getattr(record, f.name)
        assert got == want, f"{cls.__name__}.{f.name}: {got!r} != {want!r}"
        assert type(got) is type(want), f"{cls.__name__}.{f.name}: {type(got).__name__} != {type(want).__name__}"
    assert back == record


@pytest.mark.parametrize("cls", list(PAIRS), ids=lambda c: c.__name__)
def test_round_trip_through_bytes(cls):
    """The same through the serialized wire form, as the other side sees it."""
    to_proto, from_proto = PAIRS[cls]
    record = build(cls)
    msg = to_proto(record)
    again = type(msg).FromString(msg.SerializeToString())
    assert from_proto(again) == record


@pytest.mark.parametrize("cls", list(PAIRS), ids=lambda c: c.__name__)
def test_defaults_round_trip(cls):
    """A record with only its required fields (set) and defaults elsewhere comes back equal."""
    to_proto, from_proto = PAIRS[cls]
    full = build(cls)
    required = {f.name: getattr(full, f.name) for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    record = cls(**required)
    back = from_proto(to_proto(record))
    for f in dataclasses.fields(cls):
        got, want = getattr(back, f.name), getattr(record, f.name)
        if isinstance(want, float) and math.isnan(want):  # ExperimentStatus.best_value before any round
            assert isinstance(got, float) and math.isnan(got), f"{cls.__name__}.{f.name}: {got!r}"
        else:
            assert got == want, f"{cls.__name__}.{f.name}: {got!r} != {want!r}"


def test_metrics_round_trip():
    metrics = tuple(build(r.Metric) for _ in range(4))
    assert len({m.value for m in metrics}) == 4
    back = serde.metrics_from_proto(serde.metrics_to_proto(metrics))
    assert back == metrics
    assert serde.metrics_from_proto(serde.metrics_to_proto(list(metrics))) == metrics


def test_chunk_without_spec_round_trips_as_none():
    chunk = r.TensorChunk(name="params/w", offset=1 << 34, data=b"\x00\x01")
    assert serde.chunk_from_proto(serde.chunk_to_proto(chunk)) == chunk


@pytest.mark.parametrize("kind", ["none", "train", "validate", "finished"])
def test_every_task_kind_round_trips(kind):
    task = r.Task(kind=kind, round=3)
    assert serde.task_from_proto(serde.task_to_proto(task)) == task


def test_every_wire_record_has_a_conversion():
    covered = set(PAIRS) | {r.Metric}
    missing = [c.__name__ for c in _record_classes() if c not in covered]
    assert not missing, f"records without an x_to_proto/x_from_proto pair in serde: {missing}"


def test_every_serde_pair_is_tested():
    to_names = {n[: -len("_to_proto")] for n in dir(serde) if n.endswith("_to_proto")}
    from_names = {n[: -len("_from_proto")] for n in dir(serde) if n.endswith("_from_proto")}
    assert to_names == from_names, "every x_to_proto has its x_from_proto"
    tested = {fn.__name__[: -len("_to_proto")] for fn, _ in PAIRS.values()} | {"metrics"}
    assert to_names <= tested, f"untested serde pairs: {sorted(to_names - tested)}"


@pytest.mark.parametrize("chunk", [
    r.TensorChunk("params/w", 0, b"\x00\x01" * 3000, r.TensorSpec("params/w", "float32", (1500,))),
    r.TensorChunk("params/w", 1 << 40, memoryview(bytes(range(256)) * 600)),  # a view, a large offset, no spec
    r.TensorChunk("step", 0, b"", r.TensorSpec("step", "int32", ())),  # proto3 leaves empty data out
    r.TensorChunk("a" * 300, 5, b"x" * 130),  # lengths that take two-byte varints
    r.TensorChunk("params/f", 0, memoryview(array.array("f", range(40)))),  # a view of 4-byte items
], ids=["first", "view", "empty", "long-name", "float-view"])
def test_chunk_messages_are_the_bytes_protobuf_writes(chunk):
    plain = dataclasses.replace(chunk, data=memoryview(chunk.data).tobytes())
    [sent] = serde.chunk_messages([chunk])  # one chunk alone travels as itself
    assert sent == serde.chunk_to_proto(plain).SerializeToString()
    assert serde.chunk_from_proto(type(serde.chunk_to_proto(plain)).FromString(sent)) == plain


def test_chunk_messages_pack_small_chunks_and_keep_the_order():
    small = [r.TensorChunk(f"params/t{i}", 0, bytes([i % 256]) * 40, r.TensorSpec(f"params/t{i}", "float32", (10,)))
             for i in range(3000)]
    big = r.TensorChunk("params/big", 0, b"\x01" * serde.PACK_BELOW, r.TensorSpec("params/big", "uint8",
                                                                                   (serde.PACK_BELOW,)))
    chunks = small[:10] + [big] + small[10:]
    messages = list(serde.chunk_messages(chunks))
    assert 3 <= len(messages) <= 6  # the 10 small ones, the big one alone, then packs of about PACK_BYTES
    protos = [t_pb.TensorChunk.FromString(m) for m in messages]
    assert protos[1] == serde.chunk_to_proto(big) and len(protos[0].packed) == 10
    assert all(p.ByteSize() <= serde.PACK_BYTES + 4096 for p in protos)
    assert list(serde.chunk_stream(protos)) == chunks
    assert list(serde.chunk_stream(serde.chunk_protos(chunks))) == chunks


@pytest.mark.parametrize("msg, message", [
    (t_pb.TensorChunk(name="x", packed=[t_pb.TensorChunk(name="y")]), "either one chunk or packed ones"),
    (t_pb.TensorChunk(packed=[t_pb.TensorChunk(packed=[t_pb.TensorChunk(name="y")])]), "do not nest"),
])
def test_malformed_packed_chunks_are_refused(msg, message):
    with pytest.raises(InvalidRequestError, match=message):
        serde.unpacked_chunks(msg)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 1 << 20, (1 << 63) - 1])
def test_varint_matches_protobuf(value):
    from fedjax_proto import tensors_pb2 as t_pb

    # an int64 field's wire bytes are its key (one byte here) and the varint
    assert t_pb.TensorChunk(offset=value).SerializeToString()[1:] == (serde.varint(value) if value else b"")


def test_metric_event_batches_keep_order_and_stay_within_their_size():
    events = [r.MetricEvent(round=i // 4, envoy=f"env{i}", stage=r.Stage.TRAIN,
                            metrics=tuple(r.Metric("train", f"m{j}", float(j)) for j in range(i % 7 + 1)),
                            note="x" * (i * 13 % 50)) for i in range(40)]
    one = list(serde.metric_event_batches(events, 1 << 20))
    assert len(one) == 1 and [serde.metric_event_from_proto(m) for m in one[0].events] == events
    small = list(serde.metric_event_batches(events, 300))
    assert len(small) > 5
    assert [serde.metric_event_from_proto(m) for b in small for m in b.events] == events
    for b in small:  # within the bound, unless a single event is larger than it
        assert len(b.events) == 1 or sum(m.ByteSize() for m in b.events) <= 300
    huge = r.MetricEvent(round=0, envoy="e", stage=r.Stage.TRAIN, note="y" * 1000)
    assert [len(b.events) for b in serde.metric_event_batches([events[0], huge, events[1]], 300)] == [1, 1, 1]
    assert list(serde.metric_event_batches([], 300)) == []
