"""One experiment's round as a pure state machine: ``step(state, event) -> (state, effects)``.

The director feeds it what happened (an update was stored, an envoy checked in, reported its
validation, dropped out, refused the experiment; the deadline passed; the experiment was
cancelled or failed; the director restarted) and carries out what comes back (close the round,
finish the experiment, record a dropout note, keep a shrunk envoy list). Nothing here touches
SQLite, files, gRPC, threads or clocks, so every rule of a round is tested on its own.

One path closes a round: every event that can complete it goes through :func:`_claim_close`,
which yields :class:`CloseRound` once and moves the round to CLOSING; after that only the
director's outcome (next round, or :class:`Finish`) changes anything. A request the round
cannot take raises :class:`PreconditionError` and leaves the state as it was.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType

from fedjax_core import records as r
from fedjax_core.director.rules import Averaging
from fedjax_core.errors import PreconditionError


class Phase(StrEnum):
    OPEN = "open"  # taking results
    CLOSING = "closing"  # every result is in (or the deadline passed): the director aggregates it
    ENDED = "ended"  # the experiment finished, failed or was cancelled


_EMPTY: Mapping = MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class RoundState:
    """Round ``round`` of ``experiment``: who was asked, who answered, who left. Replaced, never changed."""

    experiment: str
    round: int
    kind: r.TaskKind  # TRAIN, or VALIDATE for the final validation of the last model
    participants: tuple[str, ...]  # the envoys this round waits for
    envoys: tuple[str, ...]  # every envoy still in the experiment (those that refused it are gone)
    min_envoys: int = 0  # results a round needs (0: every participant)
    rule_floor: int = 1  # the fewest uploads the aggregation rule can aggregate (training rounds)
    rule_name: str = "fedavg"
    averaging: Averaging = Averaging.ALWAYS
    sync_threshold: float = 0.0  # dynamic averaging: a divergence above it makes everyone upload
    timeout_s: float = 0.0  # the round's deadline, for the message that cites it (0: none)
    done: frozenset[str] = frozenset()  # envoys whose result is in (an update, a check-in, a validation)
    uploaded: frozenset[str] = frozenset()  # envoys whose update is stored
    dropped: Mapping[str, str] = dataclasses.field(default_factory=lambda: _EMPTY)  # envoy -> why it left
    checked_in: Mapping[str, float] = dataclasses.field(default_factory=lambda: _EMPTY)  # envoy -> divergence
    triggered: bool = False  # dynamic averaging: a divergence crossed the threshold, so everyone uploads
    phase: Phase = Phase.OPEN
    # the participants as a set, made once per round (``replace`` hands it on): with thousands of envoys, one
    # result must not cost a pass over all of them. done and dropped only ever hold participants.
    members: frozenset[str] = frozenset()

    def __post_init__(self):
        if len(self.members) != len(self.participants):
            object.__setattr__(self, "members", frozenset(self.participants))

    @property
    def pending(self) -> frozenset[str]:
        """Participants that still owe this round a result."""
        return self.members - self.done - frozenset(self.dropped)

    def owes(self, envoy: str) -> bool:
        """Whether ``envoy`` still owes this round a result (``envoy in pending``, without building it)."""
        return envoy in self.members and envoy not in self.done and envoy not in self.dropped

    @property
    def owed(self) -> bool:
        """Whether any participant still owes a result (``bool(pending)``, counted rather than built)."""
        resolved = len(self.done) + sum(1 for envoy in self.dropped if envoy not in self.done)
        return resolved < len(self.members)

    @property
    def needed(self) -> int:
        """Results the round needs: min_envoys (every participant when 0), and in a training round no fewer
        than its rule aggregates (Krum: more than 2f + 2)."""
        return max(self.min_envoys or len(self.participants), self.rule_floor, 1)

    @property
    def needed_because(self) -> str:
        if self.rule_floor > (self.min_envoys or len(self.participants)):
            return f"{self.rule_name} aggregates no fewer than {self.rule_floor} uploads"
        return f"min_envoys={self.min_envoys}" if self.min_envoys else "min_envoys=0: every participant"

    @property
    def open(self) -> bool:
        return self.phase == Phase.OPEN

    def must_upload(self, envoy: str) -> bool:
        """Whether ``envoy``, having checked in, must now upload its model (dynamic averaging triggered)."""
        return self.triggered and envoy in self.checked_in and envoy not in self.uploaded


# ------------------------------------------------------------------------------------ events
@dataclasses.dataclass(frozen=True)
class UpdateStored:
    """``envoy``'s update for this round is checked and kept (the director stored it first)."""
    envoy: str


@dataclasses.dataclass(frozen=True)
class CheckedIn:
    """Periodic or dynamic averaging: ``envoy`` trained this round; its model is ``divergence`` away."""
    envoy: str
    divergence: float


@dataclasses.dataclass(frozen=True)
class Validated:
    """``envoy`` reported its validation of the final model (the last round)."""
    envoy: str


@dataclasses.dataclass(frozen=True)
class Dropped:
    """``envoy`` failed this round or went silent (``what``: 'failed', 'was lost'); ``reason`` says why."""
    envoy: str
    what: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Refused:
    """``envoy`` refuses the experiment; ``future`` is '' when the envoys left can run the rounds to come,
    else why they cannot (the director sizes the rounds; the machine does not know the header)."""
    envoy: str
    reason: str
    future: str = ""


@dataclasses.dataclass(frozen=True)
class DeadlinePassed:
    pass


@dataclasses.dataclass(frozen=True)
class Cancelled:
    reason: str


@dataclasses.dataclass(frozen=True)
class Failed:
    """Something outside the round (a task's fatal error, the director's disk) ends the experiment."""
    error: str


@dataclasses.dataclass(frozen=True)
class Completed:
    """The final validation round closed: the experiment is finished."""


@dataclasses.dataclass(frozen=True)
class Resumed:
    """The director restarted and restored the round: it may already have every result."""


Event = (UpdateStored | CheckedIn | Validated | Dropped | Refused | DeadlinePassed | Cancelled | Failed | Completed
         | Resumed)


# ----------------------------------------------------------------------------------- effects
@dataclasses.dataclass(frozen=True)
class CloseRound:
    """Aggregate the round and start the next one (or finish after the final validation)."""


@dataclasses.dataclass(frozen=True)
class Finish:
    """End the experiment in ``state`` (failed, cancelled) with ``error``."""
    state: r.State
    error: str


@dataclasses.dataclass(frozen=True)
class Note:
    """Record (and stream to the notebook) that ``envoy`` dropped out: ``text`` says who, why, what next."""
    envoy: str
    text: str


@dataclasses.dataclass(frozen=True)
class KeepEnvoys:
    """Store the experiment's shrunk envoy list: a restarted director keeps the refusing envoy out."""
    envoys: tuple[str, ...]


Effect = CloseRound | Finish | Note | KeepEnvoys


# ------------------------------------------------------------------------------------ checks
def check_result(state: RoundState, envoy: str, round_: int, in_flight: bool = False) -> None:
    """Refuse an update or a check-in the round cannot take. ``in_flight``: an update whose keeping began
    before the round started closing or the envoy was dropped (it is kept, and the close aggregates it)."""
    if state.kind != r.TaskKind.TRAIN or round_ != state.round or not (
            state.open or (in_flight and state.phase == Phase.CLOSING)):
        raise PreconditionError(f"round {round_} of {state.experiment!r} is not open for training updates")
    if envoy not in state.members:
        raise PreconditionError(f"envoy {envoy!r} was not selected for round {round_} of {state.experiment!r}")
    if envoy in state.done:
        raise PreconditionError(f"envoy {envoy!r} already sent its update for round {round_}")
    if envoy in state.dropped and not in_flight:
        raise PreconditionError(f"envoy {envoy!r} dropped out of round {round_}; it rejoins at the next round")


def check_upload(state: RoundState, envoy: str, round_: int, in_flight: bool = False) -> None:
    """Refuse an upload the round did not ask for: outside rounds that always average, only an envoy told
    so at check-in (or by a SYNC task) uploads."""
    check_result(state, envoy, round_, in_flight)
    if state.averaging != Averaging.ALWAYS and not (state.triggered and envoy in state.checked_in):
        raise PreconditionError(f"round {round_} of {state.experiment!r} averages only when the director asks: "
                                f"envoy {envoy!r} must check in first")


def check_check_in(state: RoundState, envoy: str, round_: int) -> None:
    check_result(state, envoy, round_)
    if state.averaging == Averaging.ALWAYS:
        raise PreconditionError(f"round {round_} of {state.experiment!r} averages: upload the update instead")
    if envoy in state.checked_in:
        raise PreconditionError(f"envoy {envoy!r} already checked in for round {round_}")


# -------------------------------------------------------------------------------------- step
def step(state: RoundState, event: Event) -> tuple[RoundState, tuple[Effect, ...]]:
    """The round after ``event``, and what the director must do about it."""
    if state.phase == Phase.ENDED:
        return state, ()
    match event:
        case UpdateStored(envoy):
            check_upload(state, envoy, state.round, in_flight=True)
            dropped = MappingProxyType({e: why for e, why in state.dropped.items() if e != envoy})
            return _claim_close(dataclasses.replace(state, done=state.done | {envoy},
                                                    uploaded=state.uploaded | {envoy}, dropped=dropped))
        case CheckedIn(envoy, divergence):
            check_check_in(state, envoy, state.round)
            return _claim_close(_checked_in(state, envoy, divergence))
        case Validated(envoy):
            if state.kind != r.TaskKind.VALIDATE or not state.owes(envoy) or not state.open:
                return state, ()  # a late report of an envoy that dropped out changes nothing
            return _claim_close(dataclasses.replace(state, done=state.done | {envoy}))
        case Dropped(envoy, what, reason):
            return _drop(state, envoy, what, reason)
        case Refused(envoy, reason, future):
            return _refuse(state, envoy, reason, future)
        case DeadlinePassed():
            return _deadline(state)
        case Cancelled(reason):
            return _end(state, Finish(r.State.CANCELLED, reason))
        case Failed(error):
            return _end(state, Finish(r.State.FAILED, error))
        case Completed():
            if state.phase != Phase.CLOSING or state.kind != r.TaskKind.VALIDATE:
                raise PreconditionError(f"round {state.round} of {state.experiment!r} is not a closing final "
                                        "validation")
            return _end(state, Finish(r.State.FINISHED, ""))
        case Resumed():
            return _claim_close(state)
    raise TypeError(f"not a round event: {event!r}")


def _claim_close(state: RoundState, effects: tuple[Effect, ...] = ()) -> tuple[RoundState, tuple[Effect, ...]]:
    """The one place a round closes: once, when it is open and owes nothing."""
    if not state.open or state.owed:
        return state, effects
    return dataclasses.replace(state, phase=Phase.CLOSING), effects + (CloseRound(),)


def _end(state: RoundState, finish: Finish) -> tuple[RoundState, tuple[Effect, ...]]:
    return dataclasses.replace(state, phase=Phase.ENDED), (finish,)


def _checked_in(state: RoundState, envoy: str, divergence: float) -> RoundState:
    """Dynamic averaging: the first divergence over the threshold triggers an average, and envoys that
    checked in earlier owe an upload again (their next task is SYNC)."""
    checked_in = {**state.checked_in, envoy: divergence}
    triggered, done = state.triggered, state.done
    if state.averaging == Averaging.DYNAMIC and divergence > state.sync_threshold and not triggered:
        triggered = True
        done = done - (frozenset(state.checked_in) - state.uploaded)
    if not triggered:
        done = done | {envoy}
    return dataclasses.replace(state, checked_in=MappingProxyType(checked_in), triggered=triggered, done=done)


def _without(state: RoundState, envoy: str, reason: str) -> RoundState:
    return dataclasses.replace(state, dropped=MappingProxyType({**state.dropped, envoy: reason}))


def _drop(state: RoundState, envoy: str, what: str, reason: str) -> tuple[RoundState, tuple[Effect, ...]]:
    """``envoy`` leaves the round, or the experiment ends when the round can no longer get what it needs."""
    if not state.open or not state.owes(envoy):
        raise PreconditionError(f"round {state.round} of {state.experiment!r} has gone on without envoy {envoy!r}")
    left = len(state.participants) - len(state.dropped) - 1
    if left < state.needed:
        return _end(state, Finish(r.State.FAILED, (
            f"envoy {envoy!r} {what} in round {state.round}, leaving fewer than the {state.needed} results the round "
            f"needs ({state.needed_because}): {reason}")))
    note = (f"envoy {envoy!r} dropped out of round {state.round}: {reason.splitlines()[0] if reason else what}; "
            f"{left} of {len(state.participants)} continue (the round needs {state.needed})")
    return _claim_close(_without(state, envoy, reason), (Note(envoy, note),))


def _refuse(state: RoundState, envoy: str, reason: str, future: str) -> tuple[RoundState, tuple[Effect, ...]]:
    """``envoy`` leaves the round in progress (if it owes it a result) and the experiment's envoys, so later
    rounds neither sample it nor ask it to validate. The experiment ends only when the rounds can no longer
    reach what they need."""
    if envoy not in state.envoys:
        raise PreconditionError(f"envoy {envoy!r} is not a collaborator of experiment {state.experiment!r}")
    remaining = tuple(e for e in state.envoys if e != envoy)
    in_round = state.open and state.owes(envoy)
    floor = max(state.min_envoys, state.rule_floor, 1)
    if in_round and len(state.participants) - len(state.dropped) - 1 < floor:
        future = f"fewer than the {floor} results round {state.round} needs ({state.needed_because})"
    elif not remaining:
        future = "no envoy at all"
    if future:
        return _end(state, Finish(r.State.FAILED, (
            f"envoy {envoy!r} refused experiment {state.experiment!r} in round {state.round}, leaving {future}: "
            f"{reason}")))
    state = dataclasses.replace(state, envoys=remaining)
    if in_round:
        state = _without(state, envoy, reason)
    note = (f"envoy {envoy!r} refused experiment {state.experiment!r}: {reason}; it drops out of the experiment, "
            f"{len(remaining)} of {len(remaining) + 1} envoys continue")
    return _claim_close(state, (KeepEnvoys(remaining), Note(envoy, note)))


def _deadline(state: RoundState) -> tuple[RoundState, tuple[Effect, ...]]:
    if not state.open:
        return state, ()
    if len(state.done) >= state.needed:
        return dataclasses.replace(state, phase=Phase.CLOSING), (CloseRound(),)
    missing = ", ".join(sorted(set(state.participants) - state.done))
    return _end(state, Finish(r.State.FAILED, (
        f"round {state.round} reached its {state.timeout_s:g}s deadline with {len(state.done)} of "
        f"{len(state.participants)} envoys reporting, fewer than the {state.needed} it needs "
        f"({state.needed_because}); no result from: {missing}")))


# ---------------------------------------------------------------------------------- restart
def restore(state: RoundState, uploaded: Iterable[str],
            history: Iterable[CheckedIn | Dropped | Validated]) -> RoundState:
    """A fresh round put back as the director left it, from what its database kept: the stored updates,
    then the round's check-ins, dropout notes and final validations in the order they were recorded,
    each counted as it was then (a note about an envoy that owed nothing, or a validation from one
    that had dropped out, changed nothing). Feed :class:`Resumed` next, which closes it if nothing is owed."""
    state = dataclasses.replace(state, uploaded=frozenset(uploaded), done=frozenset(uploaded))
    for fact in history:
        envoy = fact.envoy
        if isinstance(fact, CheckedIn):
            if envoy in state.participants and envoy not in state.checked_in and envoy not in state.dropped:
                state = _checked_in(state, envoy, fact.divergence)
        elif state.owes(envoy):
            if isinstance(fact, Dropped):
                state = _without(state, envoy, fact.reason)
            elif state.kind == r.TaskKind.VALIDATE:
                state = dataclasses.replace(state, done=state.done | {envoy})
    return state
