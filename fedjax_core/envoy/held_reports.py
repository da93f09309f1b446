"""A worker's metric reports held for the round's upload, so that a quick round is two calls, not five.

When the director says so (``Task.reports_with_upload``), a round's reports wait here and ride in its
upload's header. A report held longer than ``hold_s`` (a round whose training takes a while) is sent on
its own then, so the notebook still sees each envoy's validation of the round's model while it trains.
The upload waits for any such send in flight and raises its failure, as it waited for every report
before; a round that ends without an upload sends what is held (``send_now``).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from fedjax_core import records as r

Key = tuple[str, int]  # (experiment, round)


class HeldReports:
    def __init__(self, send: Callable[[str, int, r.StageReport], None], hold_s: float = 2.0):
        self._send = send  # one ReportMetrics call
        self.hold_s = hold_s
        self._batching: dict[str, int] = {}  # experiment -> the round whose reports ride in its upload
        self._held: dict[Key, list[r.StageReport]] = {}
        self._timers: dict[Key, threading.Timer] = {}
        self._failed: dict[Key, Exception] = {}  # the first failure of a report sent on its own
        self._lock = threading.Lock()  # the dicts
        self._sending = threading.Lock()  # a send of held reports, or the upload that takes them

    def round_started(self, experiment: str, round_: int, batch: bool) -> None:
        """A new task: an earlier round's reports are of no use now (it went on without them)."""
        with self._lock:
            for key in [key for key in self._held if key[0] == experiment]:
                self._drop(key)
            if batch:
                self._batching[experiment] = round_
            else:
                self._batching.pop(experiment, None)

    def hold(self, experiment: str, round_: int, report: r.StageReport) -> bool:
        """Keep ``report`` for the round's upload; False when this round's reports go one call each."""
        key = (experiment, round_)
        with self._lock:
            if self._batching.get(experiment) != round_:
                return False
            self._held.setdefault(key, []).append(report)
            if key not in self._timers:
                timer = threading.Timer(self.hold_s, self._send_late, (key,))
                timer.daemon = True
                self._timers[key] = timer
                timer.start()
        return True

    @contextlib.contextmanager
    def for_upload(self, experiment: str, round_: int) -> Iterator[list[r.StageReport]]:
        """The reports the round's upload carries; they are let go once the upload went through (on a failure they
        stay for ``send_now``). Raises the failure of a report sent on its own, as the upload's."""
        key = (experiment, round_)
        with self._sending:
            with self._lock:
                self._cancel_timer(key)
                failed = self._failed.pop(key, None)
                held = list(self._held.get(key, ()))
            if failed is not None:
                raise failed
            yield held
            with self._lock:
                self._drop(key)

    def send_now(self, experiment: str, round_: int) -> None:
        """Send what is held for a round that ends without an upload (a task failed), one call each."""
        key = (experiment, round_)
        with self._sending:
            with self._lock:
                held = self._held.get(key, [])
                self._drop(key)
                self._batching.pop(experiment, None)
            for report in held:
                self._send(experiment, round_, report)

    def _send_late(self, key: Key) -> None:
        """On the timer's thread: the round is taking a while, so its reports so far go now."""
        with self._sending:
            with self._lock:
                if self._timers.get(key) is None:
                    return  # the upload or a new round took them meanwhile
                del self._timers[key]
                held = self._held.pop(key, [])
            try:
                for report in held:
                    self._send(*key, report)
            except Exception as exc:  # noqa: BLE001  (the upload raises it, as it raised a report's failure)
                with self._lock:
                    self._failed.setdefault(key, exc)

    def _cancel_timer(self, key: Key) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _drop(self, key: Key) -> None:
        self._cancel_timer(key)
        self._held.pop(key, None)
        self._failed.pop(key, None)
