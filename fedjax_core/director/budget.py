"""Long-lived calls never starve short ones: a budget of server threads for streams and long-polls.

The director's gRPC server runs every call on one thread pool. Streams (experiment pushes,
metric streams, model transfers, submissions) and long-polls (``WaitTask``) hold a thread
for as long as they last, so enough idle ones could take every thread and leave heartbeats
waiting until envoys look offline. ``StreamBudget`` lets them hold at most ``limit``
threads; the rest stay free for short calls. A long call over the budget is refused at
once with RESOURCE_EXHAUSTED and a message starting with :data:`BUSY`, which clients retry
with backoff (``transport.is_retryable``).
"""
from __future__ import annotations

import threading

import grpc

from fedjax_core.transport import BUSY

LONG_POLLS = frozenset({"/fedjax.EnvoyService/WaitTask"})


def stream_limit(max_workers: int) -> int:
    """Threads long calls may hold: all but a quarter of the pool (at least 4 stay for short calls)."""
    return max_workers - max(4, max_workers // 4)


class StreamBudget(grpc.ServerInterceptor):
    def __init__(self, limit: int):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not (handler.request_streaming or handler.response_streaming or method in LONG_POLLS):
            return handler
        if handler.response_streaming:
            factory = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                       else grpc.unary_stream_rpc_method_handler)
            behavior = self._streaming(handler.stream_stream or handler.unary_stream)
        else:
            factory = (grpc.stream_unary_rpc_method_handler if handler.request_streaming
                       else grpc.unary_unary_rpc_method_handler)
            behavior = self._unary(handler.stream_unary or handler.unary_unary)
        return factory(behavior, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _acquire(self, context: grpc.ServicerContext) -> None:
        if not self._slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{BUSY}: it serves its maximum of {self.limit} streams and long-polls at once; retry "
                          "shortly, or raise the director's settings.max_workers")

    def _unary(self, behavior):
        def call(request, context):
            self._acquire(context)
            try:
                return behavior(request, context)
            finally:
                self._slots.release()
        return call

    def _streaming(self, behavior):
        def call(request, context):
            self._acquire(context)
            try:
                yield from behavior(request, context)
            finally:
                self._slots.release()
        return call
