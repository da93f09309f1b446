"""The director's messages at the wire: requests whose bytes do not parse, and responses serialized ahead.

Requests that do not parse end INVALID_ARGUMENT, naming the message type and the reason. grpc.aio
would answer them UNKNOWN with a traceback in the log; :class:`ParseGate` makes the request
deserializer return an :class:`Unparseable` instead of raising, and the handler refuse it. Streams
get the marker as a message, which :mod:`fedjax_core.director.concurrency` refuses likewise. A stream's
messages arrive as :class:`Received`, with the size they had on the wire: asking a parsed message its size
(``ByteSize``) serializes it again (178 us for a 1 MiB chunk, over twice what parsing it takes).

A streamed response that is ``bytes`` already (tensor chunks, serde.chunk_messages) goes out as it is;
any other is serialized by the method's own serializer.
"""
from __future__ import annotations

from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError

from fedjax_core.director.gates import WrappedHandlers, guarded_handler
from fedjax_core.errors import InvalidRequestError


class Unparseable:
    def __init__(self, type_name: str, error: Exception):
        self.error = InvalidRequestError(f"the request is not a valid {type_name} message ({error}); "
                                         "client and director may run different versions of fedjax_proto")


class Received(NamedTuple):
    """A streamed request and the bytes it took on the wire."""
    message: object
    nbytes: int


def _safe(deserializer, streaming: bool = False):
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = type_name.full_name if type_name is not None else "request"

    def parse(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:
            return Unparseable(type_name, exc)

    def parse_received(data: bytes):
        message = parse(data)
        return message if isinstance(message, Unparseable) else Received(message, len(data))
    return parse_received if streaming else parse


class ParseGate(grpc.aio.ServerInterceptor):
    def __init__(self):
        self._handlers = WrappedHandlers(_parse_checked)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self._handlers.of(handler, handler_call_details.method)


def _parse_checked(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    # a stream's messages are checked where the stream is read; a single request here
    return guarded_handler(handler, None if handler.request_streaming else _refuse_unparseable,
                           request_deserializer=_safe(handler.request_deserializer, handler.request_streaming),
                           response_serializer=_serialized_passes(handler.response_serializer)
                           if handler.response_streaming else None)


def _serialized_passes(serializer):
    def serialize(message) -> bytes:
        return message if isinstance(message, bytes) else serializer(message)
    return serialize


def _refuse_unparseable(request, context) -> tuple[grpc.StatusCode, str] | None:
    return (grpc.StatusCode.INVALID_ARGUMENT, str(request.error)) if isinstance(request, Unparseable) else None
