"""Requests whose bytes do not parse end INVALID_ARGUMENT, naming the message type and the reason.

grpc.aio would answer them UNKNOWN with a traceback in the log; :class:`ParseGate` makes the
request deserializer return an :class:`Unparseable` instead of raising, and the handler refuse it.
Streams get the marker as a message, which :mod:`fedjax_core.director.concurrency` refuses likewise.
"""
from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError

from fedjax_core.errors import InvalidRequestError


class Unparseable:
    def __init__(self, type_name: str, error: Exception):
        self.error = InvalidRequestError(f"the request is not a valid {type_name} message ({error}); "
                                         "client and director may run different versions of fedjax_proto")


def _safe(deserializer):
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = type_name.full_name if type_name is not None else "request"

    def parse(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:
            return Unparseable(type_name, exc)
    return parse


class ParseGate(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.request_streaming:  # each message is checked where the stream is read
            factory, behavior = ((grpc.stream_stream_rpc_method_handler, handler.stream_stream)
                                 if handler.response_streaming
                                 else (grpc.stream_unary_rpc_method_handler, handler.stream_unary))
            wrapped = behavior
        else:
            factory, behavior = ((grpc.unary_stream_rpc_method_handler, handler.unary_stream)
                                 if handler.response_streaming
                                 else (grpc.unary_unary_rpc_method_handler, handler.unary_unary))
            wrapped = _refusing(behavior)
        return factory(wrapped, request_deserializer=_safe(handler.request_deserializer),
                       response_serializer=handler.response_serializer)


def _refusing(behavior):
    """``behavior`` that first refuses an Unparseable request, keeping its kind (plain, coroutine, async gen)."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            if isinstance(request, Unparseable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))
            async for response in behavior(request, context):
                yield response
        return stream
    if inspect.iscoroutinefunction(behavior):
        async def coroutine(request, context):
            if isinstance(request, Unparseable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))
            return await behavior(request, context)
        return coroutine

    def plain(request, context):
        if isinstance(request, Unparseable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))
        return behavior(request, context)
    return plain
