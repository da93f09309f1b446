"""The dashboard's live data, fanned out to every open page as server-sent events.

Two sources, both read through the director's ``api`` client (no polling while no page is open):

* the federation: the shard registry and the experiment list, fetched every ``refresh_s`` seconds while at
  least one page watches, pushed when they change;
* one experiment: a follower thread per watched experiment reads ``client.events(name)`` (a blocking gRPC
  stream that replays the experiment's events, then sends new ones as rounds close) and hands each event to
  the asyncio loop, which keeps it (bounded) and sends it to every page watching that experiment. A page that
  opens later first gets the events so far.

Everything here runs on one asyncio loop, except the follower threads and the blocking client calls, which
only ever hand results to the loop with ``call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fedjax_core import records as r

log = logging.getLogger("fedjax.dashboard")

MAX_EVENTS = 100_000  # events kept per watched experiment (about 300 bytes each)
MAX_FEEDS = 32  # ended experiments whose events stay in memory for the next page that opens them
MAX_BACKLOG = 20_000  # frames a page may fall behind by before its stream is cut (its browser reconnects)
RETRY_MAX_S = 30.0
FOLLOW_IDLE_S = 60.0  # a feed no page has watched for this long closes its stream (each holds a director slot)


class DirectorClient(Protocol):
    """What the dashboard needs of :class:`fedjax_core.api.client.FederationClient` (tests pass a fake)."""

    address: str

    def shard_registry(self) -> list[r.EnvoyEntry]: ...
    def experiments(self) -> list[r.ExperimentStatus]: ...
    # an iterator of MetricEvent, ending after the 'done' event; the gRPC call goes into ``calls`` (to cancel it)
    def events(self, name: str, calls: list | None = None) -> Any: ...
    def close(self) -> None: ...


def plain(value: Any) -> Any:
    """``value`` (records, tuples, enums, floats) as JSON-ready data; NaN and infinities become None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "items"):  # a Mapping that is not a dict
        return {str(k): plain(v) for k, v in value.items()}
    return value


def frame(event: str, data: Any) -> str:
    """One server-sent event: ``event:`` names what ``data`` (JSON, one line) is."""
    return f"event: {event}\ndata: {json.dumps(plain(data), separators=(',', ':'), allow_nan=False)}\n\n"


class Subscription:
    """One page's stream: frames waiting to be sent, and whether the stream has ended."""

    def __init__(self, backlog: int = MAX_BACKLOG):
        self.frames: deque[str] = deque()
        self.backlog = backlog
        self.ended = False
        self._ready = asyncio.Event()

    def put(self, item: str) -> None:
        if self.ended:
            return
        if len(self.frames) >= self.backlog:  # a page that stopped reading: cut it; its browser reconnects
            self.frames.clear()
            self.end()
            return
        self.frames.append(item)
        self._ready.set()

    def end(self) -> None:
        self.ended = True
        self._ready.set()

    async def next(self, timeout_s: float) -> list[str] | None:
        """The frames waiting (``[]`` after ``timeout_s`` with none), or None once the stream has ended."""
        if not self.frames and not self.ended:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            except TimeoutError:
                return []
        self._ready.clear()
        if self.frames:
            out = list(self.frames)
            self.frames.clear()
            return out
        return None if self.ended else []


class ExperimentFeed:
    """One experiment's events: a thread follows the director's stream; the loop keeps and fans them out."""

    def __init__(self, hub: Hub, name: str):
        self.hub = hub
        self.name = name
        self.frames: deque[str] = deque(maxlen=hub.max_events)
        self.subscribers: set[Subscription] = set()
        self.done = False  # the experiment ended and every event was received
        self.calls: list = []  # the director stream's gRPC call, so that an idle feed can cancel it
        self.idle_stopped = False  # its stream was cancelled because no page watched it
        self.thread = threading.Thread(target=self._follow, name=f"dashboard-follow-{name}", daemon=True)

    @property
    def following(self) -> bool:
        return self.thread.is_alive()

    def _follow(self) -> None:
        """The thread: read the director's stream to its end, reconnecting (and skipping what was seen) while
        the director restarts."""
        from fedjax_core.api.client import DirectorUnreachable

        seen, delay = 0, 1.0
        while not self.hub.stopping.is_set():
            try:
                self.calls.clear()  # a reconnection's call replaces the last one
                for i, event in enumerate(self.hub.client.events(self.name, calls=self.calls)):
                    if i < seen:  # a reconnection replays the experiment from its start
                        continue
                    seen += 1
                    delay = 1.0
                    self.hub.call_on_loop(self._publish, frame("metric", event), True, event.experiment_done)
                    if event.experiment_done:
                        return
                return  # the stream ended without 'done' (the director stopped serving it): nothing more comes
            except DirectorUnreachable as exc:
                if self.hub.stopping.is_set() or self.idle_stopped:
                    return
                self.hub.call_on_loop(self._publish, frame("feed", {"ok": False, "error": str(exc)}), False, False)
                if not exc.retryable:
                    return
                self.hub.stopping.wait(delay)
                delay = min(2 * delay, RETRY_MAX_S)
            except Exception as exc:  # noqa: BLE001  (not found, permission denied: told to the page)
                if self.idle_stopped:
                    return
                self.hub.call_on_loop(self._publish, frame("feed", {"ok": False, "error": str(exc)}), False, False)
                return

    def stop_if_idle(self) -> None:
        """On the loop: with no page watching (still), cancel the director stream; a page that opens the
        experiment later starts a new follower, which replays the events."""
        if not self.subscribers and self.following and not self.done:
            self.idle_stopped = True
            for call in self.calls:
                call.cancel()

    def _publish(self, item: str, keep: bool, done: bool) -> None:
        """On the loop: send ``item`` to every page watching; ``keep`` it for pages that open later."""
        if keep:
            self.frames.append(item)
        for sub in self.subscribers:
            sub.put(item)
        if done:
            self.done = True
            for sub in self.subscribers:  # a finished experiment's stream ends: nothing more will come
                sub.end()


class Hub:
    """The dashboard's live state: the federation snapshot, the experiment feeds and every open stream.

    ``start()`` and ``close()`` run on the loop that serves the pages; ``close()`` also closes ``client``
    (which cancels the follower threads' blocking streams).
    """

    def __init__(self, client: DirectorClient, refresh_s: float = 2.0, max_events: int = MAX_EVENTS,
                 max_feeds: int = MAX_FEEDS, follow_idle_s: float = FOLLOW_IDLE_S):
        self.client = client
        self.follow_idle_s = follow_idle_s
        self.refresh_s = refresh_s
        self.max_events = max_events
        self.max_feeds = max_feeds
        self.stopping = threading.Event()  # set at shutdown: followers stop retrying
        self.feeds: OrderedDict[str, ExperimentFeed] = OrderedDict()
        self.watchers: set[Subscription] = set()  # pages watching the federation
        self.snapshot: dict[str, str] = {}  # the latest frame of each kind: director, envoys, experiments
        self.fetched_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task | None = None
        self._wanted = asyncio.Event()  # at least one page watches the federation
        self._poke = asyncio.Event()  # fetch now
        self._ending = False

    # life

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._poller = asyncio.create_task(self._poll(), name="dashboard-poll")

    def end_streams(self) -> None:
        """End every open page stream (and refuse new ones), so that the server can stop at once."""
        self._ending = True
        for sub in [*self.watchers, *(s for feed in self.feeds.values() for s in feed.subscribers)]:
            sub.end()

    async def close(self) -> None:
        self.end_streams()
        self.stopping.set()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await asyncio.to_thread(self.client.close)  # cancels the followers' streams
        threads = [feed.thread for feed in self.feeds.values() if feed.thread.is_alive()]
        await asyncio.to_thread(lambda: [t.join(timeout=5) for t in threads])

    def call_on_loop(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the loop, from any thread (dropped once the loop has gone)."""
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass

    # the federation: registry and experiments, while someone watches

    @asynccontextmanager
    async def watch_federation(self) -> AsyncIterator[Subscription]:
        """A stream of 'director', 'envoys' and 'experiments' frames, starting with the latest of each."""
        sub = Subscription()
        if self._ending:
            sub.end()
        for item in self.snapshot.values():
            sub.put(item)
        self.watchers.add(sub)
        self._wanted.set()
        if time.monotonic() - self.fetched_at > min(1.0, self.refresh_s):
            self._poke.set()
        try:
            yield sub
        finally:
            self.watchers.discard(sub)
            if not self.watchers:
                self._wanted.clear()

    async def _poll(self) -> None:
        while True:
            await self._wanted.wait()
            self._poke.clear()
            self.fetched_at = time.monotonic()
            try:
                envoys, experiments = await asyncio.to_thread(self._fetch)
                frames = {"director": frame("director", {"address": self.client.address, "ok": True, "error": ""}),
                          "envoys": frame("envoys", {"now": time.time(), "envoys": envoys}),
                          "experiments": frame("experiments", {"experiments": experiments})}
            except Exception as exc:  # noqa: BLE001  (the director is down or refuses: say so on the page)
                if self.stopping.is_set():
                    return
                frames = {"director": frame("director", {"address": self.client.address, "ok": False,
                                                         "error": str(exc)})}
            for kind, item in frames.items():
                if self.snapshot.get(kind) != item:
                    self.snapshot[kind] = item
                    for sub in self.watchers:
                        sub.put(item)
            try:
                await asyncio.wait_for(self._poke.wait(), self.refresh_s)
            except TimeoutError:
                pass

    def _fetch(self) -> tuple[list[r.EnvoyEntry], list[r.ExperimentStatus]]:
        return self.client.shard_registry(), self.client.experiments()

    # one experiment

    @asynccontextmanager
    async def watch_experiment(self, name: str) -> AsyncIterator[Subscription]:
        """A stream of experiment ``name``'s 'metric' frames from its first round; it ends after the 'done'
        event. 'feed' frames say when the director's stream broke."""
        feed = self._feed(name)
        sub = Subscription(backlog=len(feed.frames) + MAX_BACKLOG)
        for item in feed.frames:
            sub.put(item)
        if feed.done or self._ending:
            sub.end()
        feed.subscribers.add(sub)
        try:
            yield sub
        finally:
            feed.subscribers.discard(sub)
            if not feed.subscribers and not feed.done and self._loop is not None:
                self._loop.call_later(self.follow_idle_s, feed.stop_if_idle)

    def _feed(self, name: str) -> ExperimentFeed:
        """``name``'s feed, started if needed; a feed whose follower gave up (an error) starts afresh."""
        feed = self.feeds.get(name)
        if feed is None or not (feed.done or feed.following) or feed.idle_stopped:
            feed = ExperimentFeed(self, name)
            self.feeds[name] = feed
            if not self._ending:
                feed.thread.start()
        self.feeds.move_to_end(name)
        idle = [n for n, f in self.feeds.items() if not f.following and not f.subscribers]
        for old in idle[:max(0, len(idle) - self.max_feeds)]:  # forget the least recently opened idle feeds
            del self.feeds[old]
        return feed
