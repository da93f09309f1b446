"""fedjax_core.envoy.client: the upload requests it serializes itself are protobuf's own bytes, small chunks
packed together."""
from __future__ import annotations

import numpy as np
import pytest

from fedjax_core import serde
from fedjax_core.envoy.client import upload_chunk_messages
from fedjax_proto import tensors_pb2 as t_pb
from fedjax_core.records import Encoding, TensorChunk, TensorSpec
from fedjax_core.tensors import chunk_views
from fedjax_proto import envoy_service_pb2 as env_pb


def _protobufs(chunk: TensorChunk) -> bytes:
    return env_pb.UploadUpdateRequest(chunk=serde.chunk_to_proto(chunk)).SerializeToString()


@pytest.mark.parametrize("chunk", [
    TensorChunk("params/w", 0, b"\x00\x01" * 3000, TensorSpec("params/w", "float32", (1500,))),
    TensorChunk("params/w", 1 << 40, bytes(range(256)) * 600),  # a later chunk: no spec, a large offset
    TensorChunk("step", 0, b"", TensorSpec("step", "int32", ())),  # empty data: proto3 leaves the field out
    TensorChunk("params/k", 0, b"\x7f" * 200, TensorSpec("params/k", "int8", (10, 20),
                                                         Encoding("int8", "float32", True, (0.5,) * 20, (3,) * 20))),
    TensorChunk("a" * 300, 5, b"x" * 130),  # lengths that take two-byte varints
], ids=["first", "later", "empty", "encoded", "long-name"])
def test_upload_messages_are_the_bytes_protobuf_writes(chunk):
    [got] = upload_chunk_messages([chunk])
    assert got == _protobufs(chunk)
    back = serde.chunk_from_proto(env_pb.UploadUpdateRequest.FromString(got).chunk)
    assert back == chunk


def test_upload_messages_take_views_of_the_arrays():
    tensors = {"params/w": np.arange(70000, dtype=np.float32).reshape(700, 100), "step": np.asarray(3, np.int32)}
    views = list(chunk_views(tensors, chunk_bytes=1 << 16))
    assert len(views) == 6
    for chunk in views:
        assert isinstance(chunk.data, memoryview)
        assert list(upload_chunk_messages([chunk])) == [_protobufs(TensorChunk(chunk.name, chunk.offset, bytes(chunk.data),
                                                                         chunk.spec))]


def test_small_chunks_travel_packed_as_protobuf_writes_them_and_come_back_in_order():
    tensors = {f"params/t{i}": np.full((3,), i, np.float32) for i in range(5000)}
    tensors["params/big"] = np.arange(1 << 17, dtype=np.float32)  # 512 KiB: a message of its own
    tensors["step"] = np.asarray(7, np.int32)
    chunks = list(chunk_views(tensors))
    messages = list(upload_chunk_messages(chunks))
    assert len(messages) < 10  # not one per tensor
    plain = [TensorChunk(c.name, c.offset, bytes(c.data), c.spec) for c in chunks]
    expected = [env_pb.UploadUpdateRequest(chunk=serde.chunk_to_proto(group[0]) if len(group) == 1 else
                                           t_pb.TensorChunk(packed=[serde.chunk_to_proto(c) for c in group]))
                .SerializeToString() for group in serde.pack(plain)]
    assert messages == expected
    back = [c for m in messages for c in serde.unpacked_chunks(env_pb.UploadUpdateRequest.FromString(m).chunk)]
    assert back == plain
