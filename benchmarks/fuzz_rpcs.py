#!/usr/bin/env python
"""``make fuzz``: every director RPC fed generated and mutated messages, then a real experiment.

A real director (``fedjax director start --disable-tls``) on a free loopback port. The RPCs
are enumerated from the service descriptors of the generated ``fedjax_proto/*_pb2.py``, so
one added later is fuzzed too. For each call, hypothesis draws either a generated request
(every field from its type: names the director knows, empty, huge and odd unicode strings,
boundary and random integers, NaN and infinities, oversize bytes, unset and wrong oneofs,
over-long lists; for client streams, random sequences of headers and tensor chunks) or a
valid request mutated field by field (drawn values, cleared fields, switched oneofs) or as
bytes (bit flips, truncation, insertions, huge varints, bogus lengths, splices, unknown
fields; for streams also dropped, repeated and reordered items), sent raw through a generic
channel. Meanwhile two fuzz envoys beat and experiments run on them (rotating through
compression, periodic and dynamic averaging, a robust rule), so rounds, models and uploads
are there to hit.

Every call has a deadline. Unacceptable: the director dies; a call ends UNKNOWN or INTERNAL
(an exception nobody mapped to a status; INTERNAL is also gRPC's own answer to bytes that do
not parse as the request, counted as UNPARSEABLE and accepted only when they do not parse
here either); a call that is not a long-poll runs past its deadline. Afterwards the
director must still work: heartbeats answer quickly and two real envoys run a small
experiment to its end.

    python -u benchmarks/fuzz_rpcs.py --messages 10000 --seed 0 --json bench-results/fuzz.json
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import itertools
import json
import math
import os
import pkgutil
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# hypothesis keeps caches in ./.hypothesis unless told otherwise: not in the repository
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "fedjax-fuzz-hypothesis"))

import grpc  # noqa: E402
from google.protobuf import message_factory, text_format  # noqa: E402
from google.protobuf.descriptor import Descriptor, FieldDescriptor  # noqa: E402
from google.protobuf.message import DecodeError, Message  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import BenchStack, proc_status, run_experiment  # noqa: E402

import fedjax_proto  # noqa: E402
from fedjax_core import serde  # noqa: E402
from fedjax_core.serde import spec_from_proto  # noqa: E402
from fedjax_core.spec import from_flat  # noqa: E402
from fedjax_core.transport import CHANNEL_OPTIONS  # noqa: E402
from fedjax_proto import envoy_service_pb2 as env_pb  # noqa: E402
from fedjax_proto import federation_service_pb2 as fed_pb  # noqa: E402
from fedjax_proto import tensors_pb2 as t_pb  # noqa: E402

# Calls that legitimately last until their deadline: DEADLINE_EXCEEDED is fine for them only.
LONG_POLLS = frozenset({"fedjax.EnvoyService/WaitExperiment", "fedjax.EnvoyService/WaitTask",
                        "fedjax.FederationService/StreamMetrics", "fedjax.FederationService/StreamMetricBatches"})
GRPC_UNPARSEABLE = "Exception deserializing request!"  # grpcio's INTERNAL for bytes that do not parse
UNPARSEABLE = "UNPARSEABLE"
CLIENT_ERROR = "CLIENT_ERROR"  # the call could not be made at all (a bug of this script)
CALL_DEADLINE_S = 10.0  # nothing but a long-poll may take this long on loopback
LONG_POLL_DEADLINE_S = 0.5
FUZZ_ENVOYS = ("fuzz-e1", "fuzz-e2")
MODEL_SPEC = t_pb.TensorSpec(name="params/w", dtype="float32", shape=[4, 4])
MODEL_DATA = bytes(range(64))  # 16 float32, all finite
MiB = 1 << 20


# ----------------------------------------------------------------------------- the RPCs
@dataclasses.dataclass(frozen=True)
class Rpc:
    service: str  # full name, e.g. fedjax.EnvoyService
    name: str
    request: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def key(self) -> str:
        return f"{self.service}/{self.name}"

    @property
    def path(self) -> str:
        return f"/{self.key}"

    @property
    def long_poll(self) -> bool:
        return self.key in LONG_POLLS


def discover_rpcs() -> list[Rpc]:
    """Every method of every service in the generated ``fedjax_proto`` modules."""
    rpcs = []
    for info in sorted(pkgutil.iter_modules(fedjax_proto.__path__), key=lambda m: m.name):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"fedjax_proto.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rpcs.append(Rpc(service.full_name, method.name, message_factory.GetMessageClass(method.input_type),
                                method.client_streaming, method.server_streaming))
    return rpcs


def call(channel: grpc.Channel, rpc: Rpc, items: list[bytes], timeout: float) -> tuple[str, str, int]:
    """Send raw request bytes; returns (status code name, details, responses received)."""
    received = 0
    try:
        if rpc.client_streaming:
            request = iter(items)
            stub = (channel.stream_stream if rpc.server_streaming else channel.stream_unary)(rpc.path)
        else:
            request = items[0]
            stub = (channel.unary_stream if rpc.server_streaming else channel.unary_unary)(rpc.path)
        if rpc.server_streaming:
            for _ in stub(request, timeout=timeout):
                received += 1
        else:
            stub(request, timeout=timeout)
            received = 1
        return "OK", "", received
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", received


def parses_as(cls: type[Message], data: bytes) -> bool:
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


def classify(rpc: Rpc, code: str, details: str, items: list[bytes]) -> tuple[str, str | None]:
    """(label for the table, why the outcome is unacceptable or None)."""
    if code == "INTERNAL" and details == GRPC_UNPARSEABLE and not all(parses_as(rpc.request, item) for item in items):
        return UNPARSEABLE, None
    if code == CLIENT_ERROR:
        return code, f"the fuzzer could not send it ({details[:300]})"
    if code in ("UNKNOWN", "INTERNAL"):
        return code, f"{code}: an exception the director did not map to a status ({details[:300]})"
    if code == "DEADLINE_EXCEEDED" and not rpc.long_poll:
        return code, "hung: no answer within the deadline, and this RPC is not a long-poll"
    return code, None


def describe(rpc: Rpc, items: list[bytes], limit: int = 600) -> str:
    """A request for humans: text format where it parses, else repr of the bytes; truncated."""
    parts = []
    for item in items:
        try:
            text = text_format.MessageToString(rpc.request.FromString(item), as_one_line=True)
            parts.append(f"{{{text}}}" if len(text) < 200 else f"{{{text[:200]}...}} ({len(item)} bytes)")
        except DecodeError:
            parts.append(f"{item[:80]!r}{'...' if len(item) > 80 else ''} ({len(item)} bytes, unparseable)")
    text = " | ".join(parts) if rpc.client_streaming else (parts[0] if parts else "")
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"[{len(items)} items] {text}" if rpc.client_streaming else text


# ----------------------------------------------------------------------------- what the director knows
# Header settings the keeper's experiments rotate through, so every path (compression, periodic and
# dynamic averaging with CheckIn, a robust rule) has a running experiment some of the time.
KEEPER_CONFIGS = [{}, {"sync": "dynamic", "sync_threshold": 1.0}, {"compression": "int8", "send_deltas": True},
                  {"sync": "periodic", "sync_every": 2}, {"aggregation": "fedmedian"}]
KEEPER_ROUNDS = 8
KEEPER_ROTATE_S = 15.0  # an experiment of the keeper's running longer is cancelled for the next config


class Keeper:
    """Keeps two fuzz envoys beating and an experiment running on them, and moves its rounds on (valid
    uploads, final validations), so fuzzed calls find rounds, models and uploads to hit; tells the
    fuzzer which names and rounds exist now."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.instances = {name: uuid.uuid4().hex for name in FUZZ_ENVOYS}
        self.experiments: list[str] = []
        self.running = ""
        self.round = 0
        self.submitted = 0
        self.error = ""
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="keeper")

    def _unary(self, path: str, request: Message, response: type[Message]) -> Message:
        stub = self.channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                        response_deserializer=response.FromString)
        return stub(request, timeout=CALL_DEADLINE_S)

    def _stream(self, path: str, items: list[Message], response: type[Message]) -> Message:
        stub = self.channel.stream_unary(path, request_serializer=type(items[0]).SerializeToString,
                                         response_deserializer=response.FromString)
        return stub(iter(items), timeout=CALL_DEADLINE_S)

    def register(self, name: str) -> None:
        shard = env_pb.ShardInfo(description="fuzz", sample_shape=["32", "32", "3"], target_shape=["1"],
                                 train_size=8, valid_size=8, hostname="localhost")
        self._unary("/fedjax.EnvoyService/RegisterEnvoy",
                    env_pb.RegisterEnvoyRequest(envoy_name=name, shard_info=shard, instance_id=self.instances[name]),
                    env_pb.RegisterEnvoyResponse)

    def submit(self, name: str, config: dict) -> None:
        settings_ = {"name": name, "rounds": KEEPER_ROUNDS, "opt_treatment": "RESET", "aggregation": "fedavg",
                     "aggregation_params": "{}", "bundle_size": len(b"fuzz bundle"), "envoys": list(FUZZ_ENVOYS),
                     "model_spec": [MODEL_SPEC], "min_envoys": 1, **config}
        spec = serde.experiment_spec_to_proto(from_flat({**settings_, "model_spec": [spec_from_proto(MODEL_SPEC)]}))
        self._stream("/fedjax.FederationService/SubmitExperiment", [
            fed_pb.SubmitExperimentRequest(spec=spec), fed_pb.SubmitExperimentRequest(bundle_data=b"fuzz bundle"),
            fed_pb.SubmitExperimentRequest(chunk=t_pb.TensorChunk(spec=MODEL_SPEC, name=MODEL_SPEC.name,
                                                                  data=MODEL_DATA))],
            fed_pb.SubmitExperimentResponse)

    def listed(self) -> list:
        """Every experiment the director lists, page by page."""
        out, token = [], ""
        while True:
            page = self._unary("/fedjax.FederationService/ListExperiments",
                               fed_pb.ListExperimentsRequest(page_size=1000, page_token=token),
                               fed_pb.ListExperimentsResponse)
            out += page.experiments
            token = page.next_page_token
            if not token:
                return out

    def start(self) -> None:
        for name in FUZZ_ENVOYS:
            self.register(name)
        self.tick()  # submits the first experiment
        self.tick()  # and sees it running
        self._thread.start()

    def tick(self) -> None:
        """Heartbeats; one step of the running experiment; a new one when none of ours runs; the names seen."""
        for name in FUZZ_ENVOYS:
            known = self._unary("/fedjax.EnvoyService/Heartbeat",
                                env_pb.HeartbeatRequest(envoy_name=name, instance_id=self.instances[name]),
                                env_pb.HeartbeatResponse).known
            if not known:
                try:
                    self.register(name)
                except grpc.RpcError:
                    pass  # a fuzzed registration holds the name for now
        listed = self.listed()
        ours = lambda e: set(e.envoys) <= set(FUZZ_ENVOYS)  # noqa: E731
        running = [e for e in listed if e.state == "running"]
        for e in running:  # one for envoys that never beat, or one of ours that ran its time
            if not ours(e) or time.monotonic() - self._started.setdefault(e.name, time.monotonic()) > KEEPER_ROTATE_S:
                self._cancel(e.name)
        running = [e for e in running if ours(e) and e.name in self._started
                   and time.monotonic() - self._started[e.name] <= KEEPER_ROTATE_S]
        if running:
            self.step(running[0].name)
        elif not any(e.state == "queued" and ours(e) for e in listed):
            self.submitted += 1
            try:
                self.submit(f"fuzz-run-{self.submitted}", KEEPER_CONFIGS[(self.submitted - 1) % len(KEEPER_CONFIGS)])
            except grpc.RpcError:
                pass  # e.g. a fuzzed submission took the name first; next tick tries the next one
        with self._lock:
            self.experiments = [e.name for e in listed[-20:]]
            self.running = running[0].name if running else ""
            self.round = running[0].current_round if running else 0

    def step(self, experiment: str) -> None:
        """What each fuzz envoy's worker would do next: upload its update, or validate the final model."""
        for name in FUZZ_ENVOYS:
            try:
                task = self._unary("/fedjax.EnvoyService/WaitTask", env_pb.WaitTaskRequest(
                    envoy_name=name, experiment_name=experiment, max_wait_s=0.0), env_pb.WaitTaskResponse)
                if task.kind == env_pb.WaitTaskResponse.TRAIN:
                    self._stream("/fedjax.EnvoyService/UploadUpdate", [
                        env_pb.UploadUpdateRequest(header=env_pb.UploadUpdateRequest.Header(
                            envoy_name=name, experiment_name=experiment, round=task.round, train_sample_count=8)),
                        env_pb.UploadUpdateRequest(chunk=t_pb.TensorChunk(spec=MODEL_SPEC, name=MODEL_SPEC.name,
                                                                          data=MODEL_DATA))],
                        env_pb.UploadUpdateResponse)
                elif task.kind == env_pb.WaitTaskResponse.VALIDATE:
                    self._unary("/fedjax.EnvoyService/ReportMetrics", env_pb.ReportMetricsRequest(
                        envoy_name=name, experiment_name=experiment, round=task.round, sample_count=8,
                        stage="aggregated_model_validation", metrics=[t_pb.Metric(task="validate", name="accuracy",
                                                                                  value=0.5)]),
                        env_pb.ReportMetricsResponse)
            except grpc.RpcError:
                pass  # the fuzz got there first (a cancelled experiment, a closed round, a compressed upload...)

    def _cancel(self, name: str) -> None:
        try:
            self._unary("/fedjax.FederationService/CancelExperiment", fed_pb.CancelExperimentRequest(name=name),
                        fed_pb.ExperimentStatus)
        except grpc.RpcError:
            pass  # ended meanwhile

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            try:
                self.tick()
            except grpc.RpcError:
                pass  # the fuzz check sees a dead or stuck director; the keeper just keeps trying
            except Exception:  # a bug of the harness: reported, not hidden
                self.error = traceback.format_exc()
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=4 * CALL_DEADLINE_S)

    def snapshot(self) -> dict:
        with self._lock:
            return {"experiments": list(self.experiments), "running": self.running, "round": self.round,
                    "submitted": self.submitted}

    def cancel_all(self) -> dict[str, int]:
        """Cancel every queued or running experiment (the keeper's and any the fuzz submitted); how many
        experiments were in each state before."""
        listed = self.listed()
        for e in listed:
            if e.state in ("queued", "running"):
                self._cancel(e.name)
        return dict(collections.Counter(e.state for e in listed))


# ----------------------------------------------------------------------------- hypothesis strategies
def _huge(chars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    # one char repeated: cheap to draw, still trips every length limit and gRPC's 8 MiB message cap
    return st.builds(lambda c, n: c * n, chars, st.sampled_from([257, 4097, 16385, 70_000, 3 * MiB]))


ODD_TEXT = ["", " ", "\x00", "..", "../../etc/passwd", "a" * 128, "a" * 129, "\u202e", "😀", "名前", "-x", ".x",
            "x\n", "%s%n", "NaN", "1e999", "-1", "null", "{}", "[]", "[{}]", "[" * 5000, '{"a":', "\ud7ff\ue000"]


@dataclasses.dataclass
class Values:
    """Field-value strategies; ``names`` (envoys, experiments) and ``known`` (those, stages, dtypes,
    strategies...) are strings the director recognises right now."""

    names: list[str]
    known: list[str]
    small: bool = False  # no huge values (for the elements of long lists)

    def text(self) -> st.SearchStrategy[str]:
        options = [st.sampled_from(self.names), st.sampled_from(self.names), st.sampled_from(self.known),
                   st.sampled_from(ODD_TEXT), st.text(max_size=24), _json_text()]
        if not self.small:
            options.append(_huge(st.sampled_from(["a", "é", "😀", "\x00"])))
        return st.one_of(*options)

    def integer(self, bits: int, signed: bool) -> st.SearchStrategy[int]:
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        edges = [v for v in (0, 1, -1, 2, 3, 64, 65, 1 << 20, (1 << 31) - 1, -(1 << 31), 1 << 32, 1 << 53,
                             (1 << 63) - 1, -(1 << 63)) if lo <= v <= hi]
        return st.one_of(st.sampled_from(edges), st.integers(max(lo, -2), min(hi, 12)), st.integers(lo, hi))

    def double(self) -> st.SearchStrategy[float]:
        return st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e308, 0.5, 1.0, 31.0]),
                         st.floats())

    def binary(self) -> st.SearchStrategy[bytes]:
        options = [st.binary(max_size=80), st.sampled_from([MODEL_DATA, MODEL_DATA[:7], b"fuzz bundle"])]
        if not self.small:
            options.append(st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255),
                                     st.sampled_from([MiB, MiB + 1, 9 * MiB])))
        return st.one_of(*options)


def _json_text() -> st.SearchStrategy[str]:
    leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
    value = st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=3)),
                         max_leaves=8)
    keys = st.sampled_from(["lr", "eta", "beta", "server_learning_rate", "server_momentum", "tau",
                            "num_malicious_clients", "num_clients_to_keep", "train", "validate", "every",
                            "delta_threshold", "batch_size"])
    return st.one_of(value, st.dictionaries(keys, value, max_size=3), st.lists(st.dictionaries(
        st.sampled_from(["train", "validate"]), st.dictionaries(keys, value, max_size=2), max_size=2), max_size=3)
    ).map(json.dumps)


_INT_BITS = {FieldDescriptor.TYPE_INT64: (64, True), FieldDescriptor.TYPE_SINT64: (64, True),
             FieldDescriptor.TYPE_SFIXED64: (64, True), FieldDescriptor.TYPE_INT32: (32, True),
             FieldDescriptor.TYPE_SINT32: (32, True), FieldDescriptor.TYPE_SFIXED32: (32, True),
             FieldDescriptor.TYPE_UINT64: (64, False), FieldDescriptor.TYPE_FIXED64: (64, False),
             FieldDescriptor.TYPE_UINT32: (32, False), FieldDescriptor.TYPE_FIXED32: (32, False)}


def scalar(field: FieldDescriptor, values: Values, depth: int) -> st.SearchStrategy:
    t = field.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        return message(field.message_type, values, depth + 1)
    if t == FieldDescriptor.TYPE_STRING:
        return values.text()
    if t == FieldDescriptor.TYPE_BYTES:
        return values.binary()
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return values.double() if t == FieldDescriptor.TYPE_DOUBLE else values.double().map(_as_float32)
    if t == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers are legal on the wire
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), values.integer(32, True))
    return values.integer(*_INT_BITS[t])


def _as_float32(x: float) -> float:
    return x if not math.isfinite(x) or abs(x) < 3.4e38 else math.copysign(math.inf, x)


def field_value(field: FieldDescriptor, values: Values, depth: int) -> st.SearchStrategy:
    one = scalar(field, values, depth)
    if not field.is_repeated:
        return one
    if field.message_type is not None and field.message_type is field.containing_type:
        # a message that holds its own kind (TensorChunk.packed): a few, and no long lists, or the drawn
        # request grows as 257 ** depth and the fuzzer spends minutes building it instead of calling
        return st.lists(one, max_size=3)
    small = scalar(field, dataclasses.replace(values, small=True), depth)
    # over every list limit the director has (64 shape entries, 256 metrics, 65536 labels)
    longs = st.builds(lambda x, n: [x] * n, small, st.sampled_from([65, 257] if field.type ==
                                                                  FieldDescriptor.TYPE_MESSAGE else [65, 257, 65537]))
    return st.one_of(st.lists(one, max_size=4), longs)


def message(desc: Descriptor, values: Values, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of type ``desc``: each field set or not, each oneof unset or any one of its fields."""
    cls = message_factory.GetMessageClass(desc)
    if depth > 4 or (depth > 2 and any(f.message_type is desc for f in desc.fields)):
        return st.just(cls())
    in_oneof = {f.name for o in desc.oneofs for f in o.fields}

    @st.composite
    def build(draw) -> Message:
        msg = cls()
        chosen = {f.name for o in desc.oneofs for f in [draw(st.sampled_from([None, *o.fields]))] if f is not None}
        for field in desc.fields:
            if field.name not in chosen and (field.name in in_oneof or not draw(st.booleans())):
                continue
            _set(msg, field, draw(field_value(field, values, depth)))
        return msg

    return build()


def _set(msg: Message, field: FieldDescriptor, value) -> None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:  # drawn as entry messages
        msg.ClearField(field.name)
        container, by_message = getattr(msg, field.name), field.message_type.fields_by_name["value"].message_type
        for entry in value:
            if by_message is not None:
                container[entry.key].CopyFrom(entry.value)
            else:
                container[entry.key] = entry.value
    elif field.is_repeated:
        msg.ClearField(field.name)  # (``del field[:]`` fails on a filled repeated message field under upb)
        getattr(msg, field.name).extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(msg, field.name).CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@st.composite
def mutated(draw, data: bytes, others: list[bytes]) -> bytes:
    """``data`` with 1-4 byte-level mutations."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete", "varint", "length", "splice",
                                   "unknown", "double"]))
        pos = draw(st.integers(0, 1 << 16)) % (len(b) + 1)
        if op == "flip" and b:
            b[pos % len(b)] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and b:
            b[pos % len(b)] = draw(st.integers(0, 255))
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 16))]
        elif op == "varint":  # an 11-byte varint: longer than any valid one
            b[pos:pos] = b"\xff" * 10 + b"\x01"
        elif op == "length":  # a length-delimited field that claims more bytes than follow
            claimed = draw(st.sampled_from([5, 1 << 20, 1 << 31, (1 << 63) - 1]))
            b[pos:pos] = _varint(draw(st.integers(1, 20)) << 3 | 2) + _varint(claimed)
        elif op == "splice":  # merging: repeated fields grow, a oneof takes the last branch seen
            b += draw(st.sampled_from(others))
        elif op == "unknown":
            tag = draw(st.integers(1, (1 << 29) - 1)) << 3 | draw(st.sampled_from([0, 1, 2, 5]))
            b += _varint(tag) + draw(st.binary(max_size=9))
        elif op == "double":
            b.extend(bytes(b))
    return bytes(b)


@st.composite
def field_mutated(draw, data: bytes, cls: type[Message], values: Values) -> bytes:
    """``data`` parsed as ``cls`` with 1-3 fields (nested ones too) cleared or given drawn values; setting
    another member of a oneof switches its branch."""
    msg = cls.FromString(data)
    if not cls.DESCRIPTOR.fields:
        return draw(mutated(data, [data]))
    for _ in range(draw(st.integers(1, 3))):
        target = msg
        while True:
            field = draw(st.sampled_from(list(target.DESCRIPTOR.fields)))
            nested = (field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated
                      and target.HasField(field.name))
            if not (nested and target.DESCRIPTOR.fields and draw(st.booleans())):
                break
            target = getattr(target, field.name)
        if draw(st.integers(0, 4)) == 0:
            target.ClearField(field.name)
            continue
        value = draw(field_value(field, values, 1))
        _set(target, field, value)
    return msg.SerializeToString()


@st.composite
def mutated_stream(draw, items: list[bytes], others: list[bytes], cls: type[Message], values: Values) -> list[bytes]:
    """A valid request stream with 1-3 mutations of its items (as bytes or as fields) or of their sequence."""
    items = list(items)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["bytes", "fields", "fields", "drop", "repeat", "swap", "empty", "cut", "extra"]))
        i = draw(st.integers(0, 1 << 10)) % max(len(items), 1)
        if op == "bytes" and items:
            items[i] = draw(mutated(items[i], others))
        elif op == "fields" and items and parses_as(cls, items[i]):
            items[i] = draw(field_mutated(items[i], cls, values))
        elif op == "drop" and items:
            del items[i]
        elif op == "repeat" and items:
            items.insert(i, items[i])
        elif op == "swap" and len(items) > 1:
            j = draw(st.integers(0, len(items) - 1))
            items[i], items[j] = items[j], items[i]
        elif op == "empty":
            items.insert(i, b"")
        elif op == "cut":
            items = items[:i]
        elif op == "extra":
            items.append(draw(st.sampled_from(others)))
    return items


def _field_of_type(desc: Descriptor, full_name: str) -> FieldDescriptor | None:
    return next((f for f in desc.fields if f.message_type is not None and f.message_type.full_name == full_name), None)


@st.composite
def chunk_sequence(draw, values: Values) -> list[t_pb.TensorChunk]:
    """The fuzz model's tensor in random pieces: offsets off by a little or a lot, specs here and there,
    names and dtypes swapped, pieces reordered or repeated."""
    cuts = sorted(draw(st.lists(st.integers(0, len(MODEL_DATA)), max_size=4)))
    bounds = list(zip([0, *cuts], [*cuts, len(MODEL_DATA)]))
    chunks = []
    for i, (start, end) in enumerate(bounds):
        chunk = t_pb.TensorChunk(name=draw(st.sampled_from([MODEL_SPEC.name, MODEL_SPEC.name, "params/other", ""])),
                                 offset=start + draw(st.sampled_from([0, 0, 0, -1, 1, 1 << 62])),
                                 data=MODEL_DATA[start:end])
        if i == 0 or draw(st.booleans()):
            spec = t_pb.TensorSpec()
            spec.CopyFrom(MODEL_SPEC)
            if draw(st.booleans()):
                spec.dtype = draw(st.sampled_from(["float32", "float64", "bfloat16", "int8", "object", "<f4", ""]))
            if draw(st.booleans()):
                spec.shape[:] = draw(st.lists(values.integer(64, True), max_size=3))
            chunk.spec.CopyFrom(spec)
        chunks.append(chunk)
    order = draw(st.permutations(range(len(chunks))))
    chunks = [chunks[i] for i in order]
    if chunks and draw(st.booleans()):
        chunks.append(chunks[draw(st.integers(0, len(chunks) - 1))])
    return chunks


def request_strategy(rpc: Rpc, values: Values, seeds: list[list[bytes]]) -> st.SearchStrategy:
    """("generated" | "mutated", request items as bytes) for one call of ``rpc``."""
    desc = rpc.request.DESCRIPTOR
    one = message(desc, values).map(lambda m: m.SerializeToString())
    flat = [item for s in seeds for item in s] or [b""]
    if not rpc.client_streaming:
        generated = one.map(lambda b: [b])
        mutations = st.sampled_from(seeds).flatmap(lambda s: st.one_of(
            mutated(s[0], flat), field_mutated(s[0], rpc.request, values)).map(lambda b: [b]))
    else:
        chunk_field = _field_of_type(desc, t_pb.TensorChunk.DESCRIPTOR.full_name)

        @st.composite
        def stream(draw) -> list[bytes]:
            items = [draw(st.sampled_from(seeds))[0]] if seeds and draw(st.booleans()) else []
            items += draw(st.lists(one, max_size=5))
            if chunk_field is not None and draw(st.booleans()):
                for chunk in draw(chunk_sequence(values)):
                    wrapper = rpc.request()
                    getattr(wrapper, chunk_field.name).CopyFrom(chunk)
                    items.append(wrapper.SerializeToString())
            return items

        generated = stream()
        mutations = st.sampled_from(seeds).flatmap(lambda s: mutated_stream(s, flat, rpc.request, values))
    if not seeds:
        return generated.map(lambda items: ("generated", items))
    return st.one_of(generated.map(lambda items: ("generated", items)), mutations.map(lambda items: ("mutated", items)))


# ----------------------------------------------------------------------------- valid requests to mutate
FRESH_NAME = b"fuzz-sub-00000000"  # in a seed; each call that carries it gets a name of its own instead
_fresh = itertools.count(1)


def fresh_names(items: list[bytes]) -> list[bytes]:
    """Give each submission its own experiment name (same length: the bytes around stay valid)."""
    if not any(FRESH_NAME in item for item in items):
        return items
    name = f"fuzz-sub-{next(_fresh):08d}".encode()
    return [item.replace(FRESH_NAME, name) for item in items]


def valid_requests(rpc: Rpc, known: dict) -> list[list[bytes]]:
    """Requests the director accepts (or nearly) right now, as item lists; empty when none is known.

    Fields are filled by name, so a new RPC whose fields are named like the others gets seeds too.
    """
    experiment = known["running"] or (known["experiments"] or ["none"])[-1]
    desc = rpc.request.DESCRIPTOR
    if rpc.client_streaming:
        header_field = next((f for f in desc.fields if f.message_type is not None
                             and f.message_type.full_name != t_pb.TensorChunk.DESCRIPTOR.full_name), None)
        chunk_field = _field_of_type(desc, t_pb.TensorChunk.DESCRIPTOR.full_name)
        if header_field is None or chunk_field is None:
            return []
        out = []
        for envoy in FUZZ_ENVOYS:
            items = []
            wrapper = rpc.request()
            _fill(getattr(wrapper, header_field.name), envoy, experiment, known["round"], FRESH_NAME.decode())
            items.append(wrapper.SerializeToString())
            bundle_field = next((f for f in desc.fields if f.type == FieldDescriptor.TYPE_BYTES), None)
            if bundle_field is not None:
                items.append(rpc.request(**{bundle_field.name: b"fuzz bundle"}).SerializeToString())
            wrapper = rpc.request()
            getattr(wrapper, chunk_field.name).CopyFrom(t_pb.TensorChunk(spec=MODEL_SPEC, name=MODEL_SPEC.name,
                                                                         data=MODEL_DATA))
            items.append(wrapper.SerializeToString())
            out.append(items)
        return out
    out = []
    for envoy in FUZZ_ENVOYS:
        msg = rpc.request()
        _fill(msg, envoy, experiment, known["round"], experiment)
        for field in desc.fields:  # a stream's header and chunks in one message (UploadSmallUpdate)
            if field.message_type is None:
                continue
            if field.message_type.full_name == t_pb.TensorChunk.DESCRIPTOR.full_name and field.is_repeated:
                getattr(msg, field.name).add().CopyFrom(t_pb.TensorChunk(spec=MODEL_SPEC, name=MODEL_SPEC.name,
                                                                         data=MODEL_DATA))
            elif "envoy_name" in field.message_type.fields_by_name and not field.is_repeated:
                _fill(getattr(msg, field.name), envoy, experiment, known["round"], experiment)
        out.append([msg.SerializeToString()])
    return out


def _fill(msg: Message, envoy: str, experiment: str, round_: int, name: str) -> None:
    """Set the fields of ``msg`` a valid request of its kind would carry, by field name."""
    by_name = {"envoy_name": envoy, "experiment_name": experiment, "name": name, "round": round_,
               "instance_id": "", "which": "last", "stage": "train", "max_wait_s": 0.2, "sample_count": 8,
               "train_sample_count": 8, "error": "fuzz failure", "rounds": 3, "opt_treatment": "RESET",
               "aggregation": "fedavg", "aggregation_params": "{}", "bundle_size": len(b"fuzz bundle"),
               "min_envoys": 1, "divergence": 0.5}
    for field in msg.DESCRIPTOR.fields:
        if field.name in by_name and not field.is_repeated and field.type != FieldDescriptor.TYPE_MESSAGE:
            setattr(msg, field.name, by_name[field.name])
    names = {f.name for f in msg.DESCRIPTOR.fields}
    if "shard_info" in names:
        msg.shard_info.CopyFrom(env_pb.ShardInfo(sample_shape=["32", "32", "3"], target_shape=["1"], train_size=8,
                                                 valid_size=8, hostname="localhost"))
    if "metrics" in names:
        msg.metrics.add(task="validate", name="accuracy", value=0.5)
    if "model_spec" in names:
        msg.model_spec.add().CopyFrom(MODEL_SPEC)
    if "envoys" in names and msg.DESCRIPTOR.fields_by_name["envoys"].type == FieldDescriptor.TYPE_STRING:
        msg.envoys.extend(FUZZ_ENVOYS)


def vocabulary(known: dict) -> list[str]:
    from fedjax_core import records as r
    from fedjax_core.strategies import STRATEGIES
    from fedjax_core.tensors import ALLOWED_DTYPES

    return sorted({*FUZZ_ENVOYS, *known["experiments"], "fuzz-run-1", *map(str, r.STAGES), *map(str, r.OPT_TREATMENTS),
                   *STRATEGIES, *ALLOWED_DTYPES, MODEL_SPEC.name, "best", "last", "api", "32", "3", "1"})


# ----------------------------------------------------------------------------- the fuzz run
@dataclasses.dataclass
class Tally:
    """Outcomes per RPC, and every unacceptable one (the first ``keep`` in full)."""

    keep: int = 50
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    items: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    codes: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    origins: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    slowest: dict = dataclasses.field(default_factory=dict)
    failures: list = dataclasses.field(default_factory=list)
    failure_count: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def record(self, rpc: Rpc, origin: str, items: list[bytes], code: str, details: str, seconds: float) -> None:
        label, problem = classify(rpc, code, details, items)
        with self.lock:
            self.calls[rpc.key] += 1
            self.items[rpc.key] += len(items)
            self.codes[rpc.key][label] += 1
            self.origins[origin] += 1
            if not rpc.long_poll:
                self.slowest[rpc.key] = max(self.slowest.get(rpc.key, 0.0), seconds)
            if problem is not None:
                self.failure_count += 1
                if len(self.failures) < self.keep:
                    self.failures.append({"rpc": rpc.key, "origin": origin, "status": code, "details": details[:2000],
                                          "problem": problem, "seconds": round(seconds, 3),
                                          "request": describe(rpc, items)})


class DirectorDied(Exception):
    """Stops the fuzz: nothing more can be learned from a dead director."""


def fuzz(channel: grpc.Channel, rpcs: list[Rpc], keeper: Keeper, messages: int, seed_value: int, workers: int,
         director_alive: Callable[[], bool], progress: Callable[[str], None] = print,
         tally: Tally | None = None) -> Tally:
    """Send ``messages`` calls drawn by hypothesis, in turns of ``per_turn`` calls to each RPC; stop if the
    director dies. The names the director knows are refreshed every turn. Outcomes add to ``tally``."""
    tally = tally if tally is not None else Tally()
    in_flight = threading.BoundedSemaphore(2 * workers)
    per_turn = max(1, min(30, messages // (4 * len(rpcs))))  # short runs too reach every RPC a few turns
    n_sent = 0
    next_report = time.monotonic() + 10

    def send(rpc: Rpc, origin: str, items: list[bytes]) -> None:
        t0 = time.monotonic()
        try:
            code, details, _ = call(channel, rpc, items, LONG_POLL_DEADLINE_S if rpc.long_poll else CALL_DEADLINE_S)
        except Exception as exc:  # not the director's doing, but never lost silently
            code, details = CLIENT_ERROR, f"{type(exc).__name__}: {exc}"
        try:
            tally.record(rpc, origin, items, code, details, time.monotonic() - t0)
        finally:
            in_flight.release()

    def run(pool: ThreadPoolExecutor, rpc: Rpc, strategy: st.SearchStrategy, quota: int, run_seed: int) -> None:
        @settings(max_examples=quota, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @seed(run_seed)
        @given(strategy)
        def one_call(drawn: tuple[str, list[bytes]]) -> None:
            nonlocal n_sent
            if not director_alive():
                raise DirectorDied()
            origin, items = drawn
            items = fresh_names(items) if items or rpc.client_streaming else [b""]  # a stream may be empty
            in_flight.acquire()
            n_sent += 1
            pool.submit(send, rpc, origin, items)

        one_call()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fuzz") as pool:
        try:
            for turn in itertools.count():
                known = keeper.snapshot()
                values = Values(sorted({*FUZZ_ENVOYS, *known["experiments"]}), vocabulary(known))
                for i, rpc in enumerate(rpcs):
                    left = messages - n_sent
                    if left <= 0:
                        return tally
                    strategy = request_strategy(rpc, values, valid_requests(rpc, known))
                    run(pool, rpc, strategy, min(per_turn, left), (seed_value * 1_000_003 + turn) * 1000 + i)
                if time.monotonic() >= next_report:
                    next_report = time.monotonic() + 10
                    progress(f"  {n_sent} calls sent, {tally.failure_count} unacceptable so far")
        except DirectorDied:
            pass
    return tally


# ----------------------------------------------------------------------------- after the fuzz
def heartbeat_latency(channel: grpc.Channel, keeper: Keeper, n: int = 50) -> float:
    """Worst seconds of ``n`` heartbeats in a row (a fuzz envoy's, so the call does real work)."""
    stub = channel.unary_unary("/fedjax.EnvoyService/Heartbeat",
                               request_serializer=env_pb.HeartbeatRequest.SerializeToString,
                               response_deserializer=env_pb.HeartbeatResponse.FromString)
    worst = 0.0
    for _ in range(n):
        t0 = time.monotonic()
        stub(env_pb.HeartbeatRequest(envoy_name=FUZZ_ENVOYS[0], instance_id=keeper.instances[FUZZ_ENVOYS[0]]),
             timeout=CALL_DEADLINE_S)
        worst = max(worst, time.monotonic() - t0)
    return worst


# A later pass may add this much (allocator noise, SQLite's page cache filling) and still count as flat.
PASS_GROWTH_SLACK_MB = 8.0


def memory_growth_problems(before_mb: float, after_each_pass: list[float], messages: int) -> list[str]:
    """A director holds nothing per call: past the first pass (caches filled, allocator pools grown) its
    memory stays flat, so each later pass may add at most a slack."""
    problems = []
    for n in range(1, len(after_each_pass)):
        grown = after_each_pass[n] - after_each_pass[n - 1]
        if grown > PASS_GROWTH_SLACK_MB:
            problems.append(f"the director's memory grew by {grown:.1f} MiB over pass {n + 1} ({messages} more "
                            f"calls; {after_each_pass[n - 1]} -> {after_each_pass[n]} MiB, {before_mb:.1f} MiB "
                            f"at start): something holds memory per call")
    return problems


def tracebacks(log: str) -> list[str]:
    """Distinct tracebacks in the director's output (by their last line)."""
    found: dict[str, str] = {}
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("During handling")
                                      or not lines[j].strip() or lines[j].startswith("Traceback")):
                j += 1
            block = lines[max(i - 1, 0):j + 1]
            if GRPC_UNPARSEABLE.replace("request", "message") not in block[0]:  # gRPC logs each unparseable one
                found.setdefault(lines[min(j, len(lines) - 1)], "\n".join(block))
    return list(found.values())


def without_unparseable(log: str) -> list[str]:
    """The director's output lines less gRPC's traceback for each message that did not parse."""
    out: list[str] = []
    skipping = False
    for line in log.splitlines():
        if GRPC_UNPARSEABLE.replace("request", "message") in line:
            skipping = True
        elif skipping and not (line.startswith((" ", "Traceback", "google.protobuf.message.DecodeError"))):
            skipping = False
        if not skipping:
            out.append(line)
    return out


def table(tally: Tally, rpcs: list[Rpc]) -> str:
    labels = sorted({label for counts in tally.codes.values() for label in counts}, key=lambda c: (c != "OK", c))
    headers = ["rpc", "kind", "calls", "msgs", *labels, "max s"]
    rows = []
    for rpc in rpcs:
        kind = ("stream" if rpc.client_streaming else "unary") + "->" + ("stream" if rpc.server_streaming else "unary")
        slow = tally.slowest.get(rpc.key)
        rows.append([rpc.key.split(".", 1)[1], kind + (" (long-poll)" if rpc.long_poll else ""), tally.calls[rpc.key],
                     tally.items[rpc.key], *(tally.codes[rpc.key][label] for label in labels),
                     "-" if slow is None else f"{slow:.2f}"])
    rows.append(["total", "", sum(tally.calls.values()), sum(tally.items.values()),
                 *(sum(c[label] for c in tally.codes.values()) for label in labels), ""])
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths), *map(fmt, cells[1:])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="fuzzed calls to send (spread over every RPC)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--passes", type=int, default=1,
                        help="send --messages calls this many times (seeds differ), measuring the director's memory "
                             "after each: a director that holds nothing per call stops growing after the first")
    parser.add_argument("--workers", type=int, default=8, help="calls in flight at once (x2 queued)")
    parser.add_argument("--json", help="write the outcome table and findings here")
    parser.add_argument("--no-experiment", action="store_true",
                        help="afterwards only check heartbeats and the registry, without running an experiment")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the finally that stops processes

    started = time.monotonic()
    rpcs = discover_rpcs()
    workdir = Path(tempfile.mkdtemp(prefix="fedjax-fuzz-"))
    stack = BenchStack(workdir, n_envoys=2, samples=16)
    result: dict = {"messages_requested": args.messages, "seed": args.seed, "rpcs": [r.key for r in rpcs]}
    problems: list[str] = []
    tally = Tally()
    keeper = None
    try:
        stack.start_director()
        director = stack.director
        alive = lambda: director.proc.poll() is None  # noqa: E731
        rss_before = proc_status(director.proc.pid)["VmRSS"]
        print(f"director up on 127.0.0.1:{stack.port}; fuzzing {len(rpcs)} RPCs with {args.messages} calls "
              f"(seed {args.seed})", flush=True)
        options = [o for o in CHANNEL_OPTIONS if o[0] != "grpc.max_send_message_length"]
        with grpc.insecure_channel(f"127.0.0.1:{stack.port}", options=options + [
                ("grpc.max_send_message_length", 64 * MiB)]) as channel:
            keeper = Keeper(channel)
            keeper.start()
            t0 = time.monotonic()
            rss_after: list[float] = []
            for n in range(args.passes):
                fuzz(channel, rpcs, keeper, args.messages, args.seed + 7919 * n, args.workers, alive,
                     progress=lambda line: print(line, flush=True), tally=tally)
                if not alive():
                    break
                rss_after.append(round(proc_status(director.proc.pid)["VmRSS"] / MiB, 1))
                print(f"  pass {n + 1} of {args.passes}: {args.messages} calls; director RSS {rss_after[-1]} MiB "
                      f"(started at {rss_before / MiB:.1f} MiB)", flush=True)
            result["fuzz_s"] = round(time.monotonic() - t0, 1)
            keeper.stop()
            if keeper.error:
                problems.append(f"the fuzz harness's keeper thread failed:\n{keeper.error}")
            if alive():
                result["director_rss_mb"] = {"before": round(rss_before / MiB, 1), "after_each_pass": rss_after,
                                             "after": round(proc_status(director.proc.pid)["VmRSS"] / MiB, 1)}
                problems += memory_growth_problems(rss_before / MiB, rss_after, args.messages)
                result["heartbeat_worst_s"] = round(heartbeat_latency(channel, keeper), 4)
                if result["heartbeat_worst_s"] > 1.0:
                    problems.append(f"heartbeats are slow after the fuzz: worst {result['heartbeat_worst_s']} s")
                result["experiments_after_fuzz"] = keeper.cancel_all()  # by state, before the cancels
        if alive():
            t1 = time.monotonic()
            stack.start_envoys()
            from fedjax_core import Federation

            fed = Federation(client_id="fuzz", director_node_fqdn="127.0.0.1", director_port=stack.port, tls=False)
            try:
                online = {n for n, e in fed.get_shard_registry().items() if e["is_online"]}
            finally:
                fed.close()
            if not set(stack.names) <= online:
                problems.append(f"real envoys {stack.names} did not come online after the fuzz "
                                f"(online: {sorted(online)})")
            elif not args.no_experiment:
                run = run_experiment(stack, "after-fuzz", model_mb=0.01, rounds=2, timeout_s=120)
                result["experiment_after_fuzz"] = {"rounds": run["rounds"], "wall_s": round(run["wall_s"], 2),
                                                   "state": "finished"}
            result["after_fuzz_s"] = round(time.monotonic() - t1, 1)
        if not alive():
            problems.append(f"the director died (exit code {director.proc.returncode})")
        problems += [f"an exception escaped a director thread:\n{tb}" for tb in tracebacks(director.output())
                     if "Exception in thread" in tb]
    except Exception as exc:  # a failed check after the fuzz: report it with the director's log
        problems.append(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        if keeper is not None:
            keeper.stop()
        log = stack.director.output() if stack.director else ""
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    for failure in tally.failures:
        problems.append(f"{failure['rpc']} ({failure['origin']}): {failure['problem']}\n"
                        f"    request: {failure['request']}")
    if tally.failure_count > len(tally.failures):
        problems.append(f"... and {tally.failure_count - len(tally.failures)} more unacceptable calls")
    result.update({
        "calls": sum(tally.calls.values()), "messages": sum(tally.items.values()), "origins": dict(tally.origins),
        "per_rpc": {rpc.key: {"calls": tally.calls[rpc.key], "messages": tally.items[rpc.key],
                              "codes": dict(tally.codes[rpc.key]), "long_poll": rpc.long_poll,
                              "max_s": tally.slowest.get(rpc.key)} for rpc in rpcs},
        "unacceptable": tally.failure_count, "failures": tally.failures, "problems": problems,
        "director_tracebacks": tracebacks(log), "wall_s": round(time.monotonic() - started, 1),
        "passed": not problems})
    print()
    print(table(tally, rpcs))
    print(f"\n{result['calls']} calls ({result['messages']} messages; {tally.origins['generated']} generated, "
          f"{tally.origins['mutated']} mutated) in {result.get('fuzz_s', 0)} s; wall time {result['wall_s']} s")
    print(f"{UNPARSEABLE}: gRPC's INTERNAL '{GRPC_UNPARSEABLE}' for bytes that do not parse as the request")
    if "heartbeat_worst_s" in result:
        states = result.get("experiments_after_fuzz", {})
        print(f"after the fuzz: worst of 50 heartbeats {result['heartbeat_worst_s']} s; experiments by state "
              f"{dict(sorted(states.items()))} (queued and running ones then cancelled); director RSS "
              f"{result['director_rss_mb']['before']} MiB before, "
              + ", ".join(f"{mb} MiB after pass {i + 1}" for i, mb in enumerate(result["director_rss_mb"]["after_each_pass"])))
    if "experiment_after_fuzz" in result:
        e = result["experiment_after_fuzz"]
        print(f"after the fuzz: two real envoys ran a {e['rounds']}-round experiment to its end in {e['wall_s']} s")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"results written to {out}")
    if problems:
        print(f"\nFUZZ FAILED: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        for tb in result["director_tracebacks"][:10]:
            print(f"\n----- a traceback in the director's log -----\n{tb}")
        print("\n----- director log (tail, less gRPC's notes on unparseable messages) -----\n"
              + "\n".join(without_unparseable(log)[-60:]))
        return 1
    print("\nFUZZ PASSED: no crash, no UNKNOWN or INTERNAL, no hang; the director still runs experiments")
    return 0


if __name__ == "__main__":
    sys.exit(main())
