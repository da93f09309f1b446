"""The deadline watch: one thread that turns passing time into round events.

It sleeps on the director's condition until the earliest of every running round's deadline
(round_timeout_s) and every pending participant's heartbeat timeout (envoy_timeout_s), or
until something changes, then feeds the round machine ``DeadlinePassed`` or ``Dropped``.
Nothing polls: a change (a round opening, a heartbeat) wakes it to recompute. A round that
closes is closed on a thread of its own, so one experiment's aggregation never delays
another's deadlines.
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable

from fedjax_core.director.round_machine import CloseRound, DeadlinePassed, Dropped, Event
from fedjax_core.director.rounds import Run

log = logging.getLogger("fedjax.director")


def next_due(runs: Iterable[Run], silent_until: Callable[[str], float]) -> tuple[float, Run, str | None] | None:
    """The earliest ``(when, run, envoy)``: ``envoy`` None for a round's deadline, else a pending participant
    that falls silent then; None when no round is open."""
    best = None
    for run in runs:
        if not run.state.open:
            continue
        if run.spec.deadline.round_timeout_s:
            start = run.started_at
            if run.secure is not None and run.secure.deadline_rearmed_at is not None:
                start = run.secure.deadline_rearmed_at  # a secure round's later steps get a deadline of their own
            candidate = (start + run.spec.deadline.round_timeout_s, run, None)
            best = candidate if best is None or candidate[0] < best[0] else best
        for envoy in sorted(run.state.pending):
            candidate = (silent_until(envoy), run, envoy)
            if best is None or candidate[0] < best[0]:
                best = candidate
    return best


class DeadlineWatch:
    def __init__(self, cond: threading.Condition, runs: Callable[[], Iterable[Run]],
                 silent_until: Callable[[str, float], float], envoy_timeout_s: float, timer: Callable[[], float],
                 closed: Callable[[], bool], act: Callable[[Run, Event], object],
                 after: Callable[[Run, object], None], fail: Callable[[Run, Exception], None]):
        self._cond, self._runs, self._silent_until = cond, runs, silent_until
        self.envoy_timeout_s = envoy_timeout_s
        self._timer, self._closed = timer, closed
        self._act, self._after, self._fail = act, after, fail  # the director's: under the lock, then outside it
        self._thread = threading.Thread(target=self._watch, daemon=True, name="round-deadlines")

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _watch(self) -> None:
        """An error fails the experiment it hit and the watch goes on: later rounds need their deadlines."""
        while self._handle_due():
            pass

    def _handle_due(self) -> bool:
        run = None
        try:
            with self._cond:
                due = self._wait_due()
                if due is None:
                    return False
                run, lost = due
                event = DeadlinePassed() if lost is None else Dropped(lost, "was lost", (
                    f"no heartbeat for {self.envoy_timeout_s:g}s (settings.envoy_timeout_s); it rejoins when it is "
                    "back"))
                effects = self._act(run, event)
            if any(isinstance(effect, CloseRound) for effect in effects):
                threading.Thread(target=self._carry_out, args=(run, effects), daemon=True,
                                 name=f"close-{run.name}").start()
            else:
                self._after(run, effects)
        except Exception as exc:
            log.exception("the round-deadline watch hit an error")
            if run is not None:
                self._fail(run, exc)
        return True

    def _carry_out(self, run: Run, effects) -> None:
        try:
            self._after(run, effects)
        except Exception as exc:
            log.exception("closing round %d of %r after its deadline hit an error", run.round, run.name)
            self._fail(run, exc)

    def _wait_due(self) -> tuple[Run, str | None] | None:
        """Under the lock: wait until a round's deadline passes or a pending participant falls silent.

        Within one phase of the same rounds, a change can only put deadlines off (a heartbeat, a participant
        done), never bring one closer (but for what _rounds_signature holds): the earliest is recomputed, over
        every pending participant, only when the rounds move or when it comes due, not at each of the many
        changes of a round with many envoys."""
        due, seen = None, None
        while not self._closed():
            runs = list(self._runs())
            now_seen = _rounds_signature(runs)
            if now_seen != seen or (due is not None and due[0] <= self._timer()):
                due = next_due(runs, lambda envoy: self._silent_until(envoy, self.envoy_timeout_s))
                seen = now_seen
            if due is None:
                self._cond.wait()
                continue
            when, run, envoy = due
            left = when - self._timer()
            if math.isinf(left) or left > 0:
                self._cond.wait(timeout=None if math.isinf(left) else left)
                continue
            return run, envoy
        return None


def _rounds_signature(runs: list[Run]) -> tuple:
    """What, when it changes, can bring a deadline closer: the runs, their rounds, phases, members and deadline
    starts, and dynamic averaging's trigger (which has envoys that checked in owe an upload again)."""
    return tuple((id(run), run.round, run.state.phase, id(run.state.members), run.state.triggered, run.started_at,
                  run.secure.deadline_rearmed_at if run.secure is not None else None) for run in runs)
