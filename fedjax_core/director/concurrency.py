"""How the director's asyncio server spends threads, so that hundreds of envoys fit in a few.

- **Long-polls wait without a thread.** ``WaitExperiment``, ``WaitTask`` and the metric streams
  are coroutines that sleep on :class:`Changes` until the director reports a change that
  concerns them (an envoy's own, or everyone's), then look again on a pool thread. At most
  ``max_waiting`` envoy calls, and apart from them ``max_waiting`` notebook streams, wait at
  once (so notebooks cannot crowd envoys out); one more is refused with RESOURCE_EXHAUSTED and a
  message starting with :data:`~fedjax_core.transport.BUSY`, which clients retry.
- **Short calls** (metric reports, status) run on the server's thread pool
  (``settings.max_workers`` threads), which nothing long ever holds; heartbeats have two
  threads of their own, so a burst of reports from hundreds of envoys cannot delay them.
- **Transfers** run their disk and numpy work on a second pool, one step per message, so a
  download holds a thread only while it prepares a chunk. An upload's consumer holds one for
  its whole stream, so at most ``max_uploads`` uploads (and ``max_submissions`` experiment
  submissions) are received at once; the others wait their turn without a thread while gRPC
  flow control holds their bytes back at the sender. A slot is taken only once the stream's
  first message has been read and admitted (an upload from an envoy that is not expected to
  upload is refused without one).
- **Transfers must keep moving**: one that does not move at least ``PROGRESS_BYTES`` in
  ``idle_s`` seconds (empty messages are not progress) is ended with DEADLINE_EXCEEDED, so a
  stalled peer cannot hold a slot (or a round) forever.
- **Small uploads, kept in batches**: an upload read whole with its first messages is checked and
  spooled on the loop (no thread hop, no lock contention), and kept by :class:`Batches` on a
  thread of its own together with the others that arrived meanwhile: one disk sync for the
  batch instead of three per update.
- **Few messages, made in batches**: small tensors travel packed several to a message
  (``serde.pack``), so a model of thousands of tiny tensors is a few dozen messages, and a sent
  stream's messages are made on the transfer pool ``SEND_BATCH`` at a time.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc

from fedjax_core.director.parsing import Unparseable
from fedjax_core.transport import BUSY

log = logging.getLogger("fedjax.director")
T = TypeVar("T")
EVERYTHING = object()  # the key of waiters that look again on any change (metric streams)
_END = object()
PROGRESS_BYTES = 1024  # what a transfer must move per idle_s to count as moving
SEND_BATCH = 32  # messages of a sent stream made per trip to the transfer pool
READ_AHEAD_BYTES = 256 << 10  # what a received call's first messages may hold before its consumer starts
READ_AHEAD_MESSAGES = 2  # and how many reads after the first (the second may be the call's end)
ENVOYS, NOTEBOOKS = "envoys", "notebooks"  # the two budgets of waiting calls
MAX_LONG_POLL_S = 30.0  # the longest a long-poll waits before it answers (and a stream looks again)


class Changes:
    """Wakes long-polls on the event loop when the director changes, from whichever thread changed it.

    A waiter takes :meth:`watch` ``(key)`` *before* it looks at the director, then awaits the event:
    a change that lands in between still wakes it. ``notify(envoy)`` wakes that envoy's waiters and
    the ``EVERYTHING`` ones; ``notify(None)`` wakes every waiter.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: dict[Any, asyncio.Event] = {}

    def notify(self, envoy: str | None) -> None:
        """Any thread; only schedules the wake-up on the loop."""
        self._loop.call_soon_threadsafe(self._wake, envoy)

    def _wake(self, envoy: str | None) -> None:
        for key in list(self._events) if envoy is None else (envoy, EVERYTHING):
            event = self._events.pop(key, None)
            if event is not None:
                event.set()

    def watch(self, key: Any) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())


class Batches:
    """Items handed in one at a time on the loop, handled by ``handle(batch)`` on a thread of its own: all those
    that arrived while the last batch was handled go together (a group commit). ``handle`` answers each item
    with its result, or the exception to raise for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handle: Callable[[list], list], name: str,
                 max_batch: int = 256):
        self._loop, self._handle, self._max = loop, handle, max_batch
        self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._busy = False

    async def run(self, item: Any) -> Any:
        """Handle ``item`` with the next batch; its answer (raised when an exception). The item is handled even
        if the caller is cancelled meanwhile."""
        answer = self._loop.create_future()
        self._queue.append((item, answer))
        if not self._busy:
            self._start()
        return await answer

    def _start(self) -> None:
        batch, self._queue = self._queue[:self._max], self._queue[self._max:]
        try:
            done = self._loop.run_in_executor(self._pool, self._handle, [item for item, _ in batch])
        except RuntimeError:  # closed: the server is shutting down
            for _, answer in batch + self._queue:
                if not answer.done():
                    answer.set_exception(ConnectionError("the director is shutting down"))
            self._queue = []
            return
        self._busy = True
        done.add_done_callback(lambda finished: self._finished(batch, finished))

    def _finished(self, batch: list[tuple[Any, asyncio.Future]], done: asyncio.Future) -> None:
        self._busy = False
        if done.cancelled() or done.exception() is not None:
            error = done.exception() if not done.cancelled() else ConnectionError("the director is shutting down")
            answers = [error] * len(batch)
        else:
            answers = done.result()
        for (_, answer), result in zip(batch, answers):
            if answer.done():  # its caller went away: the item was handled all the same
                continue
            if isinstance(result, BaseException):
                answer.set_exception(result)
            else:
                answer.set_result(result)
        if self._queue:
            self._start()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Flow:
    """The director server's thread pools, wake-ups and limits (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, short_pool: futures.ThreadPoolExecutor, max_uploads: int,
                 idle_s: float, max_waiting: int, max_submissions: int = 2):
        self.loop = loop
        self.changes = Changes(loop)
        self.short_pool = short_pool
        self.idle_s = idle_s
        self.max_waiting = max_waiting
        self._waiting = {ENVOYS: 0, NOTEBOOKS: 0}
        self._uploads = asyncio.Semaphore(max_uploads)
        self._submissions = asyncio.Semaphore(max_submissions)
        self.transfer_pool = futures.ThreadPoolExecutor(max_uploads + max_submissions + 4,
                                                        thread_name_prefix="director-transfer")
        self.heartbeat_pool = futures.ThreadPoolExecutor(2, thread_name_prefix="director-heartbeat")
        self._batches: list[Batches] = []

    def close(self) -> None:
        self.transfer_pool.shutdown(wait=False, cancel_futures=True)
        self.heartbeat_pool.shutdown(wait=False, cancel_futures=True)
        for batches in self._batches:
            batches.close()

    def batches(self, handle: Callable[[list], list], name: str) -> Batches:
        """A :class:`Batches` of this server's, closed with it."""
        self._batches.append(Batches(self.loop, handle, name))
        return self._batches[-1]

    def spawn(self, what: str, fn: Callable[..., Any], *args) -> None:
        """``fn(*args)`` on the transfer pool, nobody waiting for it: its failure is logged as ``what``."""
        def logged() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s failed", what)
        self.transfer_pool.submit(logged)

    async def heartbeat(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on threads of their own: heartbeats never queue behind a burst of metric reports."""
        return await self.loop.run_in_executor(self.heartbeat_pool, fn, *args)

    @contextlib.asynccontextmanager
    async def upload_slot(self):
        """One of the ``max_uploads`` slots, for an upload that came whole in one message."""
        async with self._uploads:
            yield

    async def transfer(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the transfer pool (it blocks on the disk)."""
        return await self.loop.run_in_executor(self.transfer_pool, fn, *args)

    async def short(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the short-call pool (it takes the director's lock or reads the database)."""
        return await self.loop.run_in_executor(self.short_pool, fn, *args)

    def has_room(self, budget: str = ENVOYS) -> bool:
        """Whether one more long-poll of ``budget`` may wait now (checked and entered with no await between)."""
        return self._waiting[budget] < self.max_waiting

    @contextlib.asynccontextmanager
    async def waiting(self, context: grpc.aio.ServicerContext | None = None, budget: str = ENVOYS):
        """Count a long-poll or stream against its ``budget``'s ``max_waiting`` (envoys' calls and notebooks'
        streams have one each); refused with BUSY past it (without a ``context``: check :meth:`has_room`)."""
        if not self.has_room(budget):
            who = "envoy long-polls" if budget == ENVOYS else "notebook streams"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{BUSY}: it holds its maximum of {self.max_waiting} {who} at once; "
                                "retry shortly, or raise the director's settings.max_waiting_calls")
        self._waiting[budget] += 1
        try:
            yield
        finally:
            self._waiting[budget] -= 1

    async def poll(self, key: Any, look: Callable[[], T], ready: Callable[[T], bool], timeout: float,
                   peek: Callable[[], T | None] | None = None) -> T:
        """``look()`` (on the short pool) until ``ready`` says yes or ``timeout`` passes; the last answer.
        Between looks it sleeps until :class:`Changes` wakes ``key``. ``peek()``, tried first here on the loop,
        may answer from memory without waiting for anything (None: it cannot tell, ``look`` does)."""
        deadline = self.loop.time() + timeout
        while True:
            changed = self.changes.watch(key)
            answer = peek() if peek is not None else None
            if answer is None:
                answer = await self.short(look)
            left = deadline - self.loop.time()
            if ready(answer) or left <= 0:
                return answer
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):  # unlike wait_for, no task per wait
                    await changed.wait()

    async def send(self, context: grpc.aio.ServicerContext, method: str, messages: Iterator) -> None:
        """Stream ``messages`` (a generator doing disk or numpy work) to the caller: they are made on the
        transfer pool, ``SEND_BATCH`` at a time, then written; a write the caller does not take within ``idle_s``
        ends the call."""
        try:
            while batch := await self.loop.run_in_executor(self.transfer_pool, _next_batch, messages):
                for message in batch:
                    try:
                        async with asyncio.timeout(self.idle_s):
                            await context.write(message)
                    except TimeoutError:
                        await self._stalled(context, method, "took no message")
        finally:
            with contextlib.suppress(ValueError):  # still running on its thread: it ends when that step does
                messages.close()  # a caller that went away: the generator's files close now

    async def receive(self, context: grpc.aio.ServicerContext, method: str, consume: Callable[[Iterator], T],
                      submission: bool = False, admit: Callable[[Any], None] | None = None,
                      admit_here: Callable[[Any], bool] | None = None,
                      here: Callable[[list], Awaitable[T] | None] | None = None) -> T:
        """Run ``consume(requests)`` on the transfer pool, where ``requests`` yields the call's messages as they
        arrive. The first message is read, and checked by ``admit(first)`` (on the short pool; it raises to
        refuse the call), before an upload slot (a submission slot for submissions) is taken; ``admit_here(first)``
        is tried first on the loop, and True spares that trip (it admitted the call from memory). A call read
        whole with its first messages goes to ``here(messages)`` on the loop, which answers an awaitable of the
        result, or None to leave it to ``consume``. A transfer that makes no progress for ``idle_s`` ends the
        call. The slot is freed when ``consume`` (or ``here``'s awaitable) has returned."""
        incoming = _Incoming(context, self.loop, self.idle_s)
        first = await incoming.next()
        if isinstance(first, Exception):
            await self._ended(context, method, incoming, first)
        if admit is not None and first is not _END and not (admit_here is not None and admit_here(first)):
            await self.short(admit, first)
        slots = self._submissions if submission else self._uploads
        await slots.acquire()
        incoming.restart()  # waiting for a slot is not the sender's stall: its idle time starts now
        try:  # a small call (a header, a chunk, its end) is read whole here, sparing its consumer trips to the loop
            ahead = [first]
            while (len(ahead) <= READ_AHEAD_MESSAGES and ahead[-1] is not _END and not isinstance(ahead[-1], Exception)
                   and incoming.total < READ_AHEAD_BYTES):
                ahead.append(await incoming.next())
            handled = here(ahead[:-1]) if here is not None and ahead[-1] is _END else None
        except BaseException:
            slots.release()
            raise
        if handled is not None:
            try:
                return await handled
            finally:
                slots.release()

        def requests() -> Iterator:
            for message in ahead:
                if message is _END:
                    return
                if isinstance(message, Exception):
                    raise message
                yield message
            while (message := asyncio.run_coroutine_threadsafe(incoming.next(), self.loop).result()) is not _END:
                if isinstance(message, Exception):
                    raise message
                yield message

        done = self.transfer_pool.submit(consume, requests())
        done.add_done_callback(lambda _: self.loop.call_soon_threadsafe(slots.release))
        try:
            return await asyncio.wrap_future(done)
        except ConnectionError as exc:
            await self._ended(context, method, incoming, exc)

    async def _ended(self, context: grpc.aio.ServicerContext, method: str, incoming: _Incoming,
                     exc: Exception) -> None:
        if incoming.stalled:
            await self._stalled(context, method, incoming.stalled)
        if isinstance(exc, ConnectionError):
            await context.abort(grpc.StatusCode.CANCELLED, str(exc))  # the caller went away: nobody reads this
        raise exc

    async def _stalled(self, context: grpc.aio.ServicerContext, method: str, what: str) -> None:
        log.warning("ended %s from %s: it %s for %.0f s (settings.stream_idle_s)", method, context.peer(), what,
                    self.idle_s)
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the director ended this transfer: it {what} for {self.idle_s:g} s "
                            "(the director's settings.stream_idle_s)")


class _Incoming:
    """A call's messages, read one at a time on the event loop. The call stalls when it moves fewer than
    PROGRESS_BYTES within ``idle_s``: empty messages keep nothing alive."""

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop, idle_s: float):
        self.context, self.loop, self.idle_s = context, loop, idle_s
        self.progress_at, self.moved, self.messages = loop.time(), 0, 0  # bytes and messages since progress_at
        self.total = 0  # bytes of every message read
        self.stalled = ""  # what the caller did instead of moving, once it stalled

    def restart(self) -> None:
        self.progress_at, self.moved, self.messages = self.loop.time(), 0, 0

    async def next(self):
        """The next message, _END, or an exception (ConnectionError for a caller that stalled or left)."""
        left = self.progress_at + self.idle_s - self.loop.time()
        try:
            async with asyncio.timeout(max(left, 0.0)):
                message = await self.context.read()
        except TimeoutError:
            self.stalled = ("sent no message" if not self.messages else
                            f"sent {self.moved} bytes in {self.messages} messages")
            return ConnectionError(f"no progress for {self.idle_s:g} s")
        except Exception as exc:  # the call ended under us (the caller went away)
            return ConnectionError(f"the stream ended: {exc or type(exc).__name__}")
        if isinstance(message, Unparseable):
            return message.error
        if message is grpc.aio.EOF:
            return _END
        message, size = message  # parsing.Received
        self.moved += size
        self.total += size
        self.messages += 1
        if self.moved >= PROGRESS_BYTES:
            self.restart()
        return message


def _next_batch(messages: Iterator) -> list:
    """Up to SEND_BATCH of ``messages`` (on a transfer thread); empty at the end."""
    return list(itertools.islice(messages, SEND_BATCH))
