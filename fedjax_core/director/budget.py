"""Long-lived calls never starve short ones: a budget of server threads for streams and long-polls,
and a server-side deadline on transfers that stop moving.

The director's gRPC server runs every call on one thread pool. Streams (experiment pushes,
metric streams, model transfers, submissions) and long-polls (``WaitTask``) hold a thread
for as long as they last, so enough idle ones could take every thread and leave heartbeats
waiting until envoys look offline. ``StreamBudget`` lets them hold at most ``limit``
threads; the rest stay free for short calls. A long call over the budget is refused at
once with RESOURCE_EXHAUSTED and a message starting with :data:`BUSY`, which clients retry
with backoff (``transport.is_retryable``).

Transfers (uploads, submissions, model and bundle downloads) must also keep moving: one
that neither sends nor receives a message for ``idle_s`` seconds is cancelled by the
server, so a peer that stalls mid-stream cannot keep its thread (or a round) forever.
Waiting streams (experiment pushes, metric streams, long-polls) are idle by design and end
when their caller goes away.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time

import grpc

from fedjax_core.transport import BUSY

log = logging.getLogger("fedjax.director")
LONG_POLLS = frozenset({"/fedjax.EnvoyService/WaitTask"})
TRANSFERS = frozenset({"/fedjax.EnvoyService/UploadUpdate", "/fedjax.EnvoyService/GetRoundModel",
                       "/fedjax.EnvoyService/GetExperimentBundle", "/fedjax.FederationService/SubmitExperiment",
                       "/fedjax.FederationService/GetModel"})


def stream_limit(max_workers: int) -> int:
    """Threads long calls may hold: all but a quarter of the pool (at least 4 stay for short calls)."""
    return max_workers - max(4, max_workers // 4)


class IdleWatchdog:
    """Cancels calls that made no progress for ``idle_s``; sleeps until the earliest such deadline."""

    def __init__(self, idle_s: float, timer=time.monotonic):
        self.idle_s = idle_s
        self._timer = timer
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, grpc.ServicerContext, str]] = {}
        threading.Thread(target=self._watch, daemon=True, name="stream-idle-watchdog").start()

    def start(self, key: int, context: grpc.ServicerContext, method: str) -> None:
        with self._cond:
            self._due[key] = (self._timer() + self.idle_s, context, method)
            self._cond.notify()

    def touch(self, key: int) -> None:
        """Progress: the call's deadline moves ``idle_s`` ahead (the watcher finds out when it wakes)."""
        with self._cond:
            if key in self._due:
                _, context, method = self._due[key]
                self._due[key] = (self._timer() + self.idle_s, context, method)

    def stop(self, key: int) -> None:
        with self._cond:
            self._due.pop(key, None)

    def _watch(self) -> None:
        while True:
            with self._cond:
                while not self._due:
                    self._cond.wait()
                now = self._timer()
                expired = [(k, c, m) for k, (due, c, m) in self._due.items() if due <= now]
                for key, _, _ in expired:
                    del self._due[key]
                if not expired:
                    self._cond.wait(timeout=min(due for due, _, _ in self._due.values()) - now)
                    continue
            for _, context, method in expired:
                log.warning("cancelled %s from %s: no message for %.0f s (settings.stream_idle_s)", method,
                            context.peer(), self.idle_s)
                context.cancel()


class StreamBudget(grpc.ServerInterceptor):
    def __init__(self, limit: int, idle_s: float = 120.0):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._watchdog = IdleWatchdog(idle_s)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not (handler.request_streaming or handler.response_streaming or method in LONG_POLLS):
            return handler
        watched = method in TRANSFERS
        if handler.response_streaming:
            factory = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                       else grpc.unary_stream_rpc_method_handler)
            behavior = self._streaming(handler.stream_stream or handler.unary_stream, method, watched)
        else:
            factory = (grpc.stream_unary_rpc_method_handler if handler.request_streaming
                       else grpc.unary_unary_rpc_method_handler)
            behavior = self._unary(handler.stream_unary or handler.unary_unary, method, watched,
                                   handler.request_streaming)
        return factory(behavior, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    @contextlib.contextmanager
    def _slot(self, context: grpc.ServicerContext, method: str, watched: bool):
        """Hold one of the budget's threads for the call (refused at once when none is free); a watched
        call (a transfer) is also cancelled if it stops moving."""
        if not self._slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{BUSY}: it serves its maximum of {self.limit} streams and long-polls at once; retry "
                          "shortly, or raise the director's settings.max_workers")
        try:
            if watched:
                self._watchdog.start(id(context), context, method)
            yield id(context)
        finally:
            self._watchdog.stop(id(context))
            self._slots.release()

    def _touching(self, requests, key: int):
        for request in requests:
            self._watchdog.touch(key)
            yield request
        self._watchdog.stop(key)  # all received: what follows (checks, folding) is the director's own work

    def _unary(self, behavior, method: str, watched: bool, request_streaming: bool):
        def call(request, context):
            with self._slot(context, method, watched) as key:
                if watched and request_streaming:
                    request = self._touching(request, key)
                return behavior(request, context)
        return call

    def _streaming(self, behavior, method: str, watched: bool):
        def call(request, context):
            with self._slot(context, method, watched) as key:
                for response in behavior(request, context):
                    yield response
                    if watched:
                        self._watchdog.touch(key)
        return call
