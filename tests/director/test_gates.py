"""Interceptors wrap a method's handler once, not once per call, and still check every call."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc

from fedjax_core.director import gates
from fedjax_core.director.parsing import ParseGate, Received, Unparseable
from fedjax_proto import envoy_service_pb2 as env_pb


def _handler():
    return grpc.unary_unary_rpc_method_handler(lambda request, context: request,
                                               request_deserializer=env_pb.HeartbeatRequest.FromString,
                                               response_serializer=env_pb.HeartbeatResponse.SerializeToString)


def test_wrapped_once_per_method_and_again_for_a_new_handler():
    made = []
    handlers = gates.WrappedHandlers(lambda handler, method: made.append(method) or object())
    first = _handler()
    a = handlers.of(first, "/svc/A")
    assert handlers.of(first, "/svc/A") is a and made == ["/svc/A"]
    second = _handler()  # the service answers the method with another handler: wrapped anew
    assert handlers.of(second, "/svc/A") is not a and made == ["/svc/A", "/svc/A"]


def test_known_methods_are_bounded(monkeypatch):
    monkeypatch.setattr(gates, "MAX_KNOWN_METHODS", 3)
    handlers = gates.WrappedHandlers(lambda handler, method: object())
    handler = _handler()
    for i in range(10):
        handlers.of(handler, f"/svc/M{i}")
    assert len(handlers._made) == 3
    assert handlers.of(handler, "/svc/M9") is not handlers.of(handler, "/svc/M9")  # past the bound: made per call


def test_parse_gate_reuses_its_handler_and_still_refuses_each_bad_request():
    gate, handler = ParseGate(), _handler()
    details = SimpleNamespace(method="/fedjax.EnvoyService/Heartbeat")

    async def continuation(_):
        return handler

    first = asyncio.run(gate.intercept_service(continuation, details))
    assert asyncio.run(gate.intercept_service(continuation, details)) is first
    good = first.request_deserializer(env_pb.HeartbeatRequest(envoy_name="one").SerializeToString())
    assert good.envoy_name == "one"
    bad = first.request_deserializer(b"\xff\xff\xff")
    assert isinstance(bad, Unparseable) and "HeartbeatRequest" in str(bad.error)
    aborted = []
    context = SimpleNamespace(abort=lambda code, message: aborted.append(code) or (_ for _ in ()).throw(RuntimeError()))
    try:
        first.unary_unary(bad, context)
    except RuntimeError:
        pass
    assert aborted == [grpc.StatusCode.INVALID_ARGUMENT]
    assert first.unary_unary(good, context) is good


def test_a_streams_messages_arrive_with_their_size_on_the_wire():
    """The stream's reader counts bytes from the wire, not by serializing each message again (ByteSize)."""
    gate, details = ParseGate(), SimpleNamespace(method="/fedjax.EnvoyService/UploadUpdate")
    handler = grpc.stream_unary_rpc_method_handler(lambda requests, context: None,
                                                   request_deserializer=env_pb.HeartbeatRequest.FromString)

    async def continuation(_):
        return handler

    wrapped = asyncio.run(gate.intercept_service(continuation, details))
    data = env_pb.HeartbeatRequest(envoy_name="x" * 1000).SerializeToString()
    received = wrapped.request_deserializer(data)
    assert isinstance(received, Received) and received.nbytes == len(data) > 1000
    assert received.message.envoy_name == "x" * 1000
    assert isinstance(wrapped.request_deserializer(b"\xff\xff\xff"), Unparseable)  # refused, not sized
