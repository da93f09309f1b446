"""fedjax_core.envoy.client: the upload requests it serializes itself are protobuf's own bytes."""
from __future__ import annotations

import numpy as np
import pytest

from fedjax_core import serde
from fedjax_core.envoy.client import upload_chunk_message
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
    got = upload_chunk_message(chunk)
    assert got == _protobufs(chunk)
    back = serde.chunk_from_proto(env_pb.UploadUpdateRequest.FromString(got).chunk)
    assert back == chunk


def test_upload_messages_take_views_of_the_arrays():
    tensors = {"params/w": np.arange(70000, dtype=np.float32).reshape(700, 100), "step": np.asarray(3, np.int32)}
    views = list(chunk_views(tensors, chunk_bytes=1 << 16))
    assert len(views) == 6
    for chunk in views:
        assert isinstance(chunk.data, memoryview)
        assert upload_chunk_message(chunk) == _protobufs(TensorChunk(chunk.name, chunk.offset, bytes(chunk.data),
                                                                     chunk.spec))
