"""One way for the director's interceptors to check a call before its handler runs."""
from __future__ import annotations

import inspect
from collections.abc import Callable

import grpc

Refusal = Callable[[object, object], "tuple[grpc.StatusCode, str] | None"]  # (request, context) -> why not, or None
MAX_KNOWN_METHODS = 256


class WrappedHandlers:
    """An interceptor's wrapped handlers, made once per method instead of once per call (an interceptor runs
    for every call). Kept while the service answers a method with the same handler; at most MAX_KNOWN_METHODS
    (method names come from callers, though only the services' own get a handler)."""

    def __init__(self, wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]):
        self._wrap = wrap
        self._made: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}  # method: (its, ours)

    def of(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        known = self._made.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        if len(self._made) < MAX_KNOWN_METHODS:
            self._made[method] = (handler, wrapped)
        return wrapped


def guarded_handler(handler: grpc.RpcMethodHandler, refusal: Refusal | None,
                    request_deserializer: Callable | None = None,
                    response_serializer: Callable | None = None) -> grpc.RpcMethodHandler:
    """``handler`` with ``refusal(request, context)`` checked first (a ``(code, message)`` answer ends the call
    with it), keeping the behavior's kind (plain, coroutine or async generator) and its serializers;
    ``request_deserializer`` and ``response_serializer`` replace the handler's. A request-streaming handler
    gets the request iterator as ``request``."""
    factory, behavior = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(behavior if refusal is None else _checked(behavior, refusal),
                   request_deserializer=request_deserializer or handler.request_deserializer,
                   response_serializer=response_serializer or handler.response_serializer)


def _checked(behavior, refusal: Refusal):
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            if (why := refusal(request, context)) is not None:
                await context.abort(*why)
            async for response in behavior(request, context):
                yield response
        return stream
    if inspect.iscoroutinefunction(behavior):
        async def coroutine(request, context):
            if (why := refusal(request, context)) is not None:
                await context.abort(*why)
            return await behavior(request, context)
        return coroutine

    def plain(request, context):  # run on the server's thread pool
        if (why := refusal(request, context)) is not None:
            context.abort(*why)
        return behavior(request, context)
    return plain
