"""The round state machine on its own: no SQLite, no files, no gRPC, no threads."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedjax_core import records as r
from fedjax_core.director.round_machine import (Cancelled, CheckedIn, CloseRound, Completed, DeadlinePassed, Dropped,
                                                Failed, Finish, KeepEnvoys, Note, Phase, Refused, Resumed, RoundState,
                                                UpdateStored, Validated, restore, step)
from fedjax_core.director.rules import Averaging
from fedjax_core.errors import PreconditionError

ENVOYS = ("a", "b", "c", "d")


def train_round(**kw) -> RoundState:
    fields = dict(experiment="exp", round=3, kind=r.TaskKind.TRAIN, participants=("a", "b", "c"), envoys=ENVOYS)
    return RoundState(**{**fields, **kw})


def run(state: RoundState, *events) -> tuple[RoundState, list]:
    effects = []
    for event in events:
        state, more = step(state, event)
        effects.extend(more)
    return state, effects


def test_a_round_closes_once_when_every_participant_uploaded():
    state, effects = run(train_round(), UpdateStored("a"), UpdateStored("b"))
    assert effects == [] and state.pending == {"c"}
    state, effects = run(state, UpdateStored("c"))
    assert effects == [CloseRound()] and state.phase == Phase.CLOSING
    state, effects = run(state, DeadlinePassed(), Resumed(), Validated("a"))
    assert effects == [] and state.phase == Phase.CLOSING


def test_an_envoy_not_asked_or_asked_twice_is_refused_and_changes_nothing():
    state = train_round()
    with pytest.raises(PreconditionError, match="envoy 'd' was not selected for round 3"):
        step(state, UpdateStored("d"))
    state, _ = step(state, UpdateStored("a"))
    with pytest.raises(PreconditionError, match="already sent its update"):
        step(state, UpdateStored("a"))
    assert state.done == {"a"}


def test_a_dropout_leaves_a_note_and_the_round_closes_without_it():
    state, effects = run(train_round(min_envoys=2), UpdateStored("a"), UpdateStored("b"))
    assert effects == []
    state, effects = run(state, Dropped("c", "failed", "OOM\ntraceback"))
    assert effects[0] == Note("c", "envoy 'c' dropped out of round 3: OOM; 2 of 3 continue (the round needs 2)")
    assert effects[1:] == [CloseRound()]
    assert state.dropped == {"c": "OOM\ntraceback"}


def test_a_dropout_that_leaves_too_few_results_fails_the_experiment():
    state, effects = run(train_round(), Dropped("b", "was lost", "no heartbeat"))
    assert effects == [Finish(r.State.FAILED, "envoy 'b' was lost in round 3, leaving fewer than the 3 results the "
                                              "round needs (min_envoys=0: every participant): no heartbeat")]
    assert state.phase == Phase.ENDED
    assert run(state, UpdateStored("a"), Cancelled("late")) == (state, [])  # ended: nothing changes it


def test_the_rule_floor_sets_what_a_round_needs():
    state = train_round(participants=ENVOYS, min_envoys=2, rule_floor=3, rule_name="krum")
    assert state.needed == 3 and state.needed_because == "krum aggregates no fewer than 3 uploads"
    state, _ = run(state, Dropped("a", "failed", "x"))
    state, effects = run(state, Dropped("b", "failed", "y"))
    assert effects[0].state == r.State.FAILED and "krum aggregates no fewer than 3 uploads" in effects[0].error


def test_a_deadline_closes_with_enough_results_and_fails_without():
    state, effects = run(train_round(min_envoys=2, timeout_s=30), UpdateStored("a"), UpdateStored("b"),
                         DeadlinePassed())
    assert effects == [CloseRound()]
    state, effects = run(train_round(min_envoys=2, timeout_s=30), UpdateStored("a"), DeadlinePassed())
    assert effects == [Finish(r.State.FAILED, "round 3 reached its 30s deadline with 1 of 3 envoys reporting, fewer "
                                              "than the 2 it needs (min_envoys=2); no result from: b, c")]


def test_a_refusal_shrinks_the_envoys_and_drops_the_envoy_from_the_round():
    state, effects = run(train_round(min_envoys=2), Refused("b", "not in accept_from"))
    assert effects == [KeepEnvoys(("a", "c", "d")),
                       Note("b", "envoy 'b' refused experiment 'exp': not in accept_from; it drops out of the "
                                 "experiment, 3 of 4 envoys continue")]
    assert state.envoys == ("a", "c", "d") and "b" in state.dropped
    with pytest.raises(PreconditionError, match="not a collaborator"):
        step(state, Refused("b", "again"))
    _, effects = run(train_round(min_envoys=2), Refused("b", "no", future="1 envoys, too few"))
    assert effects == [Finish(r.State.FAILED, "envoy 'b' refused experiment 'exp' in round 3, leaving 1 envoys, too "
                                              "few: no")]


def test_dynamic_averaging_asks_envoys_that_checked_in_to_upload_once_one_diverges():
    state = train_round(averaging=Averaging.DYNAMIC, sync_threshold=1.0)
    state, effects = run(state, CheckedIn("a", 0.5))
    assert state.done == {"a"} and not state.must_upload("a")
    with pytest.raises(PreconditionError, match="must check in first"):
        step(state, UpdateStored("b"))
    state, effects = run(state, CheckedIn("b", 2.0))
    assert state.triggered and state.done == set() and state.must_upload("a") and state.must_upload("b")
    state, effects = run(state, CheckedIn("c", 0.1), UpdateStored("a"), UpdateStored("b"))
    assert effects == []
    state, effects = run(state, UpdateStored("c"))
    assert effects == [CloseRound()]


def test_periodic_rounds_close_on_check_ins_alone():
    state, effects = run(train_round(averaging=Averaging.NEVER), CheckedIn("a", 9.0), CheckedIn("b", 0.0),
                         CheckedIn("c", 1.0))
    assert effects == [CloseRound()] and not state.triggered
    with pytest.raises(PreconditionError, match="averages: upload the update instead"):
        step(train_round(), CheckedIn("a", 0.0))


def test_the_final_validation_closes_on_validations_and_completes():
    state = train_round(kind=r.TaskKind.VALIDATE, participants=("a", "b"))
    with pytest.raises(PreconditionError, match="not open for training updates"):
        step(state, UpdateStored("a"))
    state, effects = run(state, Validated("a"), Validated("d"), Validated("b"))
    assert effects == [CloseRound()]
    state, effects = run(state, Completed())
    assert effects == [Finish(r.State.FINISHED, "")] and state.phase == Phase.ENDED
    with pytest.raises(PreconditionError, match="not a closing final validation"):
        step(train_round(), Completed())


def test_an_update_whose_keeping_began_before_the_deadline_counts_in_the_closing_round():
    state, effects = run(train_round(min_envoys=1), UpdateStored("a"), DeadlinePassed(), UpdateStored("b"))
    assert effects == [CloseRound()] and state.uploaded == {"a", "b"}


def test_restore_then_resumed_closes_a_round_that_had_everything():
    fresh = train_round(participants=("a", "b"))
    state = restore(fresh, uploaded=["a"], history=[Dropped("b", "was lost", "x"), Dropped("z", "failed", "y")])
    assert state.pending == set()
    assert run(state, Resumed())[1] == [CloseRound()]
    assert state.dropped.keys() == {"b"}  # a note about an envoy that owed nothing changes nothing
    assert run(restore(fresh, ["a"], []), Resumed())[1] == []


# ------------------------------------------------------------------------------- properties
def events() -> st.SearchStrategy:
    """Round events, those that end or close a round outright drawn rarely, so most sequences go a while."""
    envoy = st.sampled_from(ENVOYS)
    common = st.one_of(
        st.builds(UpdateStored, envoy), st.builds(CheckedIn, envoy, st.sampled_from([0.0, 0.5, 2.0])),
        st.builds(Validated, envoy), st.builds(Dropped, envoy, st.just("failed"), st.just("x")),
        st.builds(Refused, envoy, st.just("no"), st.sampled_from(["", "", "", "too few"])), st.just(Resumed()))
    rare = st.sampled_from([DeadlinePassed(), Cancelled("stop"), Failed("boom"), Completed()])
    return st.one_of(*[common] * 8, rare)


def rounds() -> st.SearchStrategy:
    return st.builds(
        lambda kind, k, min_envoys, floor, averaging: RoundState(
            experiment="exp", round=1, kind=kind, participants=ENVOYS[:k], envoys=ENVOYS, min_envoys=min_envoys,
            rule_floor=floor if kind == r.TaskKind.TRAIN else 1, averaging=averaging, sync_threshold=1.0),
        st.sampled_from([r.TaskKind.TRAIN, r.TaskKind.VALIDATE]), st.integers(1, 4), st.integers(0, 2),
        st.integers(1, 2), st.sampled_from(list(Averaging)))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds(), st.lists(events(), max_size=20), st.integers(0, 12))
def test_random_events_never_close_twice_never_count_the_unasked_and_a_restart_loses_nothing(start, sequence, cut):
    state, closes, finishes = start, 0, 0
    uploaded, history = [], []  # what the database would hold: stored updates, recorded events in order
    for i, event in enumerate(sequence):
        if i == cut:  # the director restarts: the round is rebuilt from what was kept
            if state.phase != Phase.OPEN:
                break
            fresh = dataclasses.replace(start, envoys=state.envoys)
            restored = restore(fresh, uploaded, history)
            assert restored.uploaded == state.uploaded and restored.done == state.done
            assert restored.dropped.keys() == state.dropped.keys()
            assert dict(restored.checked_in) == dict(state.checked_in) and restored.triggered == state.triggered
            state = restored
        before = state
        try:
            state, effects = step(state, event)
        except PreconditionError:
            assert state is before
            continue
        closes += sum(isinstance(e, CloseRound) for e in effects)
        finishes += sum(isinstance(e, Finish) for e in effects)
        if isinstance(event, UpdateStored):
            uploaded.append(event.envoy)
        elif isinstance(event, CheckedIn):
            history.append(event)
        elif isinstance(event, Validated) and event.envoy in start.participants:  # recorded, counted or not
            history.append(event)
        history += [Dropped(e.envoy, "failed", e.text) for e in effects if isinstance(e, Note)]
        assert closes <= 1 and finishes <= 1
        assert state.done <= set(start.participants) and state.uploaded <= state.done
        assert set(state.dropped) <= set(start.participants)  # what owed and owes() count on
        assert state.owed == bool(state.pending) and state.members == frozenset(start.participants)
        assert all(state.owes(e) == (e in state.pending) for e in ENVOYS)
        assert set(state.envoys) <= set(start.envoys)
        if state.phase == Phase.OPEN:
            assert closes == 0
            claims = isinstance(event, (UpdateStored, CheckedIn, Dropped, Refused, Resumed)) or (
                isinstance(event, Validated) and state.kind == r.TaskKind.VALIDATE)
            assert state.pending or not claims


def test_an_update_kept_while_its_envoy_was_dropped_counts_and_the_envoy_is_back_in():
    state, effects = run(train_round(min_envoys=1), Dropped("b", "was lost", "silent"))
    assert "b" in state.dropped
    with pytest.raises(PreconditionError, match="dropped out of round 3"):
        step(state, CheckedIn("b", 0.0))  # a new result from it is refused...
    state, _ = step(state, UpdateStored("b"))  # ...but one whose keeping had begun is aggregated, so it counts
    assert "b" not in state.dropped and "b" in state.uploaded and state.pending == {"a", "c"}
