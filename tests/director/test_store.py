"""The director's state: the Store contract, run against both implementations (SqliteStore, MemoryStore), and
what only SQLite does (a database reopened keeps everything)."""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from fedjax_core import records as r
from fedjax_core.errors import AlreadyExistsError
from fedjax_core.director.memory_store import MemoryStore
from fedjax_core.director.store import NewUpdate, SqliteStore
from fedjax_core.director.store_api import Store
from fedjax_core.spec import ExperimentSpec, from_flat


def _info(n: int = 1) -> r.ShardInfo:
    return r.ShardInfo(description=f"cifar10 shard {n} of 2", sample_shape=("32", "32", "3"), target_shape=("1",),
                       train_size=2585 + n, valid_size=508 + n, hostname=f"host{n}", devices=("cuda:0", "cuda:1"))


def _header(name: str, rounds: int = 3) -> ExperimentSpec:
    return from_flat(dict(
        name=name, rounds=rounds, opt_treatment="CONTINUE_GLOBAL", aggregation="fedavg", best_metric="valid_acc",
        best_higher_is_better=False, bundle_size=12345, envoys=("env_one", "env_two"), submitter="api",
        model_spec=(r.TensorSpec("params/Dense_0/kernel", "float32", (256, 10)),
                    r.TensorSpec("opt_state/count", "int32", ())),
    ))


def _event(round_: int, envoy: str, stage: str = r.Stage.TRAIN, value: float = 0.5) -> r.MetricEvent:
    return r.MetricEvent(round=round_, envoy=envoy, stage=stage,
                         metrics=(r.Metric(stage, "acc", value), r.Metric(stage, "loss", 1 / 3)),
                         timestamp=1_700_000_000.25 + round_, round_time_s=0.125 * (round_ + 1))


def add_update(store: Store, experiment: str, round_: int, envoy: str, weight: float, path: Path, nbytes: int,
               events=()) -> list[bool]:
    """One update through ``add_updates``: its events' answer, raised when the store refuses it."""
    (answer,) = store.add_updates(experiment, round_, [NewUpdate(envoy, weight, path, nbytes, events)])
    if isinstance(answer, AlreadyExistsError):
        raise answer
    return answer


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "state" / "director.sqlite"


@pytest.fixture(params=["sqlite", "memory"])
def store(request, path) -> Store:
    """Each contract test runs on both implementations."""
    s: Store = SqliteStore(path) if request.param == "sqlite" else MemoryStore()
    yield s
    s.close()


# ---------------------------------------------------------------------- envoys
def test_upsert_envoy_and_list(store):
    before = time.time()
    store.upsert_envoy("env_two", _info(2))
    store.upsert_envoy("env_one", _info(1))
    envoys = store.envoys()
    assert [name for name, _, _ in envoys] == ["env_one", "env_two"]  # by name
    assert envoys[0][1] == _info(1)
    assert envoys[1][1] == _info(2)
    assert all(before <= seen <= time.time() for _, _, seen in envoys)


def test_upsert_replaces_shard_info(store):
    store.upsert_envoy("env_one", _info(1))
    store.upsert_envoy("env_one", _info(7))
    envoys = store.envoys()
    assert len(envoys) == 1
    assert envoys[0][1] == _info(7)


def test_touch_envoy(store, monkeypatch):
    from fedjax_core.director import store as store_module

    assert store.touch_envoy("ghost") is False
    monkeypatch.setattr(store_module.time, "time", lambda: 1000.0)
    store.upsert_envoy("env_one", _info(1))
    (_, _, first), = store.envoys()
    monkeypatch.setattr(store_module.time, "time", lambda: 2000.0)
    assert store.touch_envoy("env_one") is True
    (_, _, second), = store.envoys()
    assert (first, second) == (1000.0, 2000.0)  # the touch moved last_seen to now
    assert store.envoys()[0][1] == _info(1)


# ----------------------------------------------------------------- experiments
def test_add_and_read_experiment(store):
    h = _header("exp1")
    store.add_experiment(h)
    row = store.experiment("exp1")
    assert row is not None
    assert row.spec == h
    assert row.state == "queued"
    assert row.envoys == ()
    assert row.current_round == 0 and row.best_round == -1 and row.best_value is None
    assert row.best_metric == "valid_acc"
    assert row.error == ""
    assert store.experiment("nope") is None


def test_experiment_names_are_unique(store):
    store.add_experiment(_header("exp1"))
    with pytest.raises(AlreadyExistsError, match="experiment 'exp1' already exists"):
        store.add_experiment(_header("exp1"))
    assert len(store.experiments()) == 1


def test_update_experiment(store):
    store.add_experiment(_header("exp1"))
    store.update_experiment("exp1", state="running", envoys=("env_two", "env_one"), current_round=2,
                            best_round=1, best_value=0.8125, error="", started_at=12.5)
    row = store.experiment("exp1")
    assert row.state == "running"
    assert row.envoys == ("env_two", "env_one")
    assert (row.current_round, row.best_round, row.best_value) == (2, 1, 0.8125)
    status = row.status()
    assert status == r.ExperimentStatus(name="exp1", state="running", current_round=2, rounds=3,
                                        envoys=("env_two", "env_one"), best_round=1, best_value=0.8125,
                                        error="", submitted_at=row.submitted_at, best_metric="valid_acc",
                                        submitter=row.spec.submitter, started_at=12.5)


def test_experiment_state_reads_the_state_alone(store):
    assert store.experiment_state("exp1") is None
    store.add_experiment(_header("exp1"))
    assert store.experiment_state("exp1") == store.experiment("exp1").state
    store.update_experiment("exp1", state="finished")
    assert store.experiment_state("exp1") == "finished" and store.experiment_state("exp2") is None


def test_status_without_best_value_is_nan(store):
    store.add_experiment(_header("exp1"))
    status = store.experiment("exp1").status()
    assert status.best_value != status.best_value  # NaN


def test_experiments_listed_in_submission_order_and_filtered_by_state(store):
    names = ["zeta", "alpha", "mid"]
    for n in names:
        store.add_experiment(_header(n))
    store.update_experiment("alpha", state="running")
    store.update_experiment("zeta", state="finished")
    assert [row.name for row in store.experiments()] == names  # submission order, not alphabetical
    assert [row.name for row in store.experiments("queued")] == ["mid"]
    assert [row.name for row in store.experiments("running")] == ["alpha"]
    assert [row.name for row in store.experiments("finished")] == ["zeta"]
    assert store.experiments("failed") == []
    submitted = [row.submitted_at for row in store.experiments()]
    assert submitted == sorted(submitted)


def test_experiment_pages_follow_submission_order_and_the_submitter(store):
    for i, name in enumerate(["zeta", "alpha", "mid", "beta", "omega"]):
        store.add_experiment(dataclasses.replace(_header(name), submitter="alice" if i % 2 else "bob"))
    first = store.experiments_page(after=0, limit=2)
    assert [row.name for _, row in first] == ["zeta", "alpha"]
    assert [row.name for _, row in store.experiments_page(after=first[-1][0], limit=10)] == ["mid", "beta", "omega"]
    assert [row.name for _, row in store.experiments_page(0, -1, submitter="alice")] == ["alpha", "beta"]
    assert store.experiments_page(0, -1, submitter="carol") == []


def test_status_participants_are_the_latest_rounds_only(store):
    store.add_experiment(_header("long", rounds=3000))
    for round_ in range(1500):
        store.record_participants("long", round_, (f"env{round_ % 7}",))
    latest = store.participants("long", last=1000)
    assert list(latest) == list(range(500, 1500)) and latest[1499] == ("env1",)


# --------------------------------------------------------------------- updates
def test_updates_add_list_drop(store, tmp_path):
    add_update(store, "exp1", 0, "env_one", 2585.0, tmp_path / "u1.fjm", 1000)
    add_update(store, "exp1", 0, "env_two", 2586.0, tmp_path / "u2.fjm", 2000)
    add_update(store, "exp1", 1, "env_one", 10.0, tmp_path / "u3.fjm", 3000)
    add_update(store, "exp2", 0, "env_one", 11.0, tmp_path / "u4.fjm", 4000)
    got = sorted(store.updates("exp1", 0))
    assert got == [("env_one", 2585.0, tmp_path / "u1.fjm", 1000), ("env_two", 2586.0, tmp_path / "u2.fjm", 2000)]
    assert all(isinstance(p, Path) for _, _, p, _ in got)
    assert store.updates("exp1", 1) == [("env_one", 10.0, tmp_path / "u3.fjm", 3000)]
    store.drop_updates("exp1", 0)
    assert store.updates("exp1", 0) == []
    assert len(store.updates("exp1", 1)) == 1  # other rounds and experiments untouched
    assert len(store.updates("exp2", 0)) == 1


def test_an_envoy_has_one_update_per_round(store, tmp_path):
    add_update(store, "exp1", 0, "env_one", 1.0, tmp_path / "a", 1)
    with pytest.raises(AlreadyExistsError, match="keeps an update of envoy 'env_one' for round 0 already"):
        add_update(store, "exp1", 0, "env_one", 2.0, tmp_path / "b", 2)
    assert store.updates("exp1", 0) == [("env_one", 1.0, tmp_path / "a", 1)]


# ---------------------------------------------------------------------- events
def test_events_add_and_list(store):
    e0 = _event(0, "env_one", r.Stage.AGGREGATED, 0.1)
    e1 = _event(0, "env_one", r.Stage.TRAIN, 0.2)
    e2 = _event(1, "", r.Stage.ROUND, 0.3)
    store.add_event("exp1", e0, weight=508)
    store.add_event("exp1", e1, weight=2585)
    store.add_event("exp2", _event(0, "env_two"))
    store.add_event("exp1", e2)
    rows = store.events("exp1")
    assert [ev for _, ev, _ in rows] == [e0, e1, e2]
    assert [w for _, _, w in rows] == [508.0, 2585.0, 0.0]
    ids = [i for i, _, _ in rows]
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_events_after_id(store):
    events = [_event(k // 2, f"env{k % 2}", value=k / 10) for k in range(6)]
    for e in events:
        store.add_event("exp1", e)
    rows = store.events("exp1")
    cut = rows[2][0]
    assert [ev for _, ev, _ in store.events("exp1", after_id=cut)] == events[3:]
    assert store.events("exp1", after_id=rows[-1][0]) == []


def test_events_round_filter(store):
    events = [_event(k // 2, f"env{k % 2}", value=k / 10) for k in range(6)]
    for e in events:
        store.add_event("exp1", e)
    assert [ev for _, ev, _ in store.events("exp1", round_=1)] == events[2:4]
    assert [ev for _, ev, _ in store.events("exp1", round_=0)] == events[:2]
    first_round_2 = store.events("exp1", round_=2)[0][0]
    assert [ev for _, ev, _ in store.events("exp1", after_id=first_round_2, round_=2)] == events[5:]
    assert store.events("exp1", round_=9) == []


# --------------------------------------------------------------------- restart
def test_data_survives_close_and_reopen(path, tmp_path):
    s = SqliteStore(path)
    s.upsert_envoy("env_one", _info(1))
    s.add_experiment(_header("exp1", rounds=5))
    s.add_experiment(_header("exp2"))
    s.update_experiment("exp1", state="running", envoys=("env_one",), current_round=3, best_round=2,
                        best_value=0.75, error="")
    add_update(s, "exp1", 3, "env_one", 2585.0, tmp_path / "u.fjm", 4096)
    e = _event(2, "", r.Stage.ROUND, 0.75)
    s.add_event("exp1", e, weight=3)
    s.close()

    s2 = SqliteStore(path)
    try:
        assert s2.envoys()[0][:2] == ("env_one", _info(1))
        assert [row.name for row in s2.experiments()] == ["exp1", "exp2"]
        row = s2.experiment("exp1")
        assert row.spec == _header("exp1", rounds=5)
        assert (row.state, row.envoys, row.current_round, row.best_round, row.best_value) == \
            ("running", ("env_one",), 3, 2, 0.75)
        assert s2.experiments("running")[0].name == "exp1"
        assert s2.updates("exp1", 3) == [("env_one", 2585.0, tmp_path / "u.fjm", 4096)]
        (first_id, ev, w), = s2.events("exp1")
        assert ev == e and w == 3.0
        # New rows keep counting after the old ones.
        s2.add_event("exp1", _event(3, "env_one"))
        s2.add_experiment(_header("exp3"))
        assert s2.events("exp1")[-1][0] > first_id
        assert [row.name for row in s2.experiments()] == ["exp1", "exp2", "exp3"]
    finally:
        s2.close()


def test_store_creates_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "director.sqlite"
    s = SqliteStore(path)
    s.close()
    assert path.is_file()


def test_envoy_names_are_the_registered_ones_sorted(store):
    for name in ("zed", "amy", "kim"):
        store.upsert_envoy(name, _info())
    assert store.envoy_names() == ["amy", "kim", "zed"] == [name for name, _, _ in store.envoys()]


# ------------------------------------------------------- the contract, pinned on both
def test_envoys_page_by_name(store):
    for name in ("eve", "bob", "dan", "amy", "cat"):
        store.upsert_envoy(name, _info())
    assert [name for name, _, _ in store.envoys(limit=2)] == ["amy", "bob"]
    assert [name for name, _, _ in store.envoys(after="bob", limit=2)] == ["cat", "dan"]
    assert [name for name, _, _ in store.envoys(after="dan")] == ["eve"]
    assert store.envoys(after="eve") == [] and store.envoys(limit=0) == []
    assert store.envoy("ghost") is None
    info, seen = store.envoy("cat")
    assert info == _info() and seen == store.envoys(after="bob", limit=1)[0][2]


def test_an_experiment_name_is_claimed_once_even_when_racing(store):
    outcomes: list[str] = []

    def claim(k: int) -> None:
        try:
            store.add_experiment(dataclasses.replace(_header("race"), submitter=f"user{k}"), state="submitting")
            outcomes.append(f"user{k}")
        except AlreadyExistsError as exc:
            assert str(exc) == "experiment 'race' already exists; choose another experiment_name"
            outcomes.append("refused")

    threads = [threading.Thread(target=claim, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o != "refused"]
    assert len(outcomes) == 8 and len(winners) == 1
    (row,) = store.experiments()
    assert row.state == "submitting" and row.spec.submitter == winners[0]


def test_experiment_numbers_only_grow_and_are_never_reused(store):
    for name in ("a", "b"):
        store.add_experiment(_header(name))
    (seq_a, _), (seq_b, _) = store.experiments_page(after=0, limit=-1)
    store.delete_experiment("b")
    assert store.experiment("b") is None and [row.name for row in store.experiments()] == ["a"]
    store.add_experiment(_header("b"))  # the name is free again, and comes last
    store.add_experiment(_header("c"))
    page = store.experiments_page(after=0, limit=-1)
    assert [row.name for _, row in page] == ["a", "b", "c"]
    assert page[0][0] == seq_a and seq_b < page[1][0] < page[2][0]
    assert [row.name for _, row in store.experiments_page(after=page[1][0], limit=5)] == ["c"]
    assert store.experiments_page(after=page[2][0], limit=5) == []


def test_abandon_submissions_drops_only_unfinished_ones(store):
    store.add_experiment(_header("done"))
    store.add_experiment(_header("cut1"), state="submitting")
    store.add_experiment(_header("cut2"), state="submitting")
    store.update_experiment("done", state="running")
    assert store.abandon_submissions() == ["cut1", "cut2"]
    assert [row.name for row in store.experiments()] == ["done"]
    assert store.abandon_submissions() == []


def test_update_experiment_keeps_every_column(store):
    store.add_experiment(_header("exp1"))
    store.update_experiment("exp1", envoy_sizes={"env_one": [2586, 509]}, bundle_sha256="ab" * 32,
                            started_at=5.0, finished_at=6.0, best_metric="valid_loss")
    row = store.experiment("exp1")
    assert row.envoy_sizes == {"env_one": (2586, 509)} and row.best_metric == "valid_loss"
    assert store.bundle_sha256("exp1") == "ab" * 32 and store.bundle_sha256("nope") == ""
    store.update_experiment("nope", state="running")  # an unknown experiment: nothing happens
    assert store.experiment("nope") is None
    with pytest.raises(Exception, match="no (such )?column"):
        store.update_experiment("exp1", colour="blue")
    assert store.experiment("exp1") == row


def test_updates_come_back_in_the_order_they_were_kept(store, tmp_path):
    for envoy in ("zed", "amy", "kim"):
        add_update(store, "exp1", 0, envoy, 1.5, tmp_path / envoy, 7)
    assert [envoy for envoy, *_ in store.updates("exp1", 0)] == ["zed", "amy", "kim"]
    store.drop_update("exp1", 0, "zed")
    store.drop_update("exp1", 0, "ghost")  # nothing to drop
    add_update(store, "exp1", 0, "zed", 2.5, tmp_path / "zed2", 8)  # kept again: now the last
    assert store.updates("exp1", 0) == [("amy", 1.5, tmp_path / "amy", 7), ("kim", 1.5, tmp_path / "kim", 7),
                                        ("zed", 2.5, tmp_path / "zed2", 8)]
    assert store.updates("exp1", 1) == [] and store.updates("exp2", 0) == []


def test_the_first_record_of_a_rounds_participants_wins(store):
    assert store.record_participants("exp1", 0, ("b", "a")) == ("b", "a")
    assert store.record_participants("exp1", 0, ("c",)) == ("b", "a")  # a restart samples again: ignored
    assert store.record_participants("exp1", 1, ()) == ()
    store.record_participants("exp2", 0, ("z",))
    store.record_participants("exp1", 2, ("c",))
    assert store.participants("exp1", last=-1) == {0: ("b", "a"), 1: (), 2: ("c",)}
    assert list(store.participants("exp1", last=2).items()) == [(1, ()), (2, ("c",))]  # oldest first
    assert store.participants("exp1", last=0) == {} and store.participants("nope", last=5) == {}


def test_an_event_is_recorded_once_under_growing_ids(store):
    first = _event(0, "env_one", value=0.25)
    assert store.add_event("exp1", first, weight=3) is True
    assert store.add_event("exp1", _event(0, "env_one", value=0.75), weight=9) is False  # same round, envoy, stage
    assert store.add_event("exp1", _event(0, "env_one", r.Stage.AGGREGATED)) is True
    assert store.add_event("exp2", _event(0, "env_one")) is True  # another experiment's
    assert store.add_event("exp1", _event(0, "env_two")) is True
    rows = store.events("exp1")
    assert [(ev, w) for _, ev, w in rows][0] == (first, 3.0)  # the first one stays, weight and all
    assert len(rows) == 3
    (other_id, _, _), = store.events("exp2")
    ids = [i for i, _, _ in rows]
    assert ids == sorted(ids) and ids[0] < other_id < ids[2]  # one sequence across experiments


def test_an_event_keeps_what_the_store_persists(store):
    sent = dataclasses.replace(_event(2, "", r.Stage.ROUND), experiment_done=True, state="finished",
                               participants=("a", "b"), note="b dropped out")
    store.add_event("exp1", sent)
    (_, got, weight), = store.events("exp1")
    assert got == dataclasses.replace(sent, experiment_done=False, state="") and weight == 0.0


def test_concurrent_events_are_each_recorded_once(store):
    def report(k: int) -> None:
        for round_ in range(20):
            store.add_event("exp1", _event(round_, f"env{k % 4}"))  # two threads per envoy race

    threads = [threading.Thread(target=report, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = store.events("exp1")
    assert len(rows) == 80 and len({i for i, _, _ in rows}) == 80
    assert sorted((ev.round, ev.envoy) for _, ev, _ in rows) == sorted((n, f"env{k}") for n in range(20)
                                                                        for k in range(4))


def test_a_director_runs_on_an_injected_memory_store(tmp_path):
    from fedjax_core.director.core import Director

    memory = MemoryStore()
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60,
                 store=memory)
    d.register_envoy("env_one", _info(1))
    d.close()
    assert d.store is memory and memory.envoy("env_one")[0] == _info(1)
    assert not (tmp_path / "state" / "director.sqlite").exists()  # no database was made
    again = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60,
                     store=memory)  # a restart on the same store: the registry is still there
    try:
        assert again.registry.sizes(["env_one", "ghost"]) == {"env_one": (2586, 509), "ghost": (0, 0)}
    finally:
        again.close()


def _audit(action: str, actor: str, experiment: str = "", ts: float = 100.0) -> r.AuditEntry:
    return r.AuditEntry(action=action, actor=actor, peer="ipv4:127.0.0.1:5", experiment=experiment,
                        detail='{"k": 1}', timestamp=ts)


def test_audit_entries_are_numbered_and_read_by_time_id_and_viewer(store):
    ids = [store.add_audit(_audit("submit", "alice", "exp_a", 100.0), owner="alice"),
           store.add_audit(_audit("refuse", "carol", "exp_b", 101.0)),  # carol's refused try at bob's later name
           store.add_audit(_audit("submit", "bob", "exp_b", 102.0), owner="bob"),
           store.add_audit(_audit("download", "ops", "exp_a", 103.0), owner="alice"),
           store.add_audit(_audit("register", "env1", "", 104.0))]
    assert ids == [1, 2, 3, 4, 5]
    everything = store.audit()
    assert [e.id for e in everything] == ids and everything[0] == dataclasses.replace(
        _audit("submit", "alice", "exp_a", 100.0), id=1)
    assert [e.id for e in store.audit(since=102.0)] == [3, 4, 5]
    assert [e.id for e in store.audit(after_id=3, limit=1)] == [4]
    # a viewer reads what it did and what was done to its experiments, not another's refusal under its name
    assert [e.id for e in store.audit(viewer="alice")] == [1, 4]
    assert [e.id for e in store.audit(viewer="bob")] == [3]
    assert [e.id for e in store.audit(viewer="carol")] == [2]


def test_the_audit_table_refuses_changes(path):
    store = SqliteStore(path)
    store.add_audit(_audit("submit", "alice"))
    for sql in ("UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"):
        with pytest.raises(Exception, match="the audit trail is append-only"):
            store._write(sql)
    assert [e.actor for e in store.audit()] == ["alice"]
    store.close()


def test_an_update_and_the_reports_it_carried_are_kept_together_or_not_at_all(store, tmp_path):
    reports = [(_event(0, "env_one", r.Stage.AGGREGATED, 0.1), 5.0), (_event(0, "env_one", r.Stage.TRAIN, 0.2), 10.0)]
    assert add_update(store, "exp1", 0, "env_one", 1.0, tmp_path / "a", 1, reports) == [True, True]
    assert [(e.stage, w) for _, e, w in store.events("exp1")] == [(r.Stage.AGGREGATED, 5.0), (r.Stage.TRAIN, 10.0)]
    again = [(_event(0, "env_one", r.Stage.LOCAL, 0.3), 5.0)]
    with pytest.raises(AlreadyExistsError):  # a second update for the round: neither it nor its reports kept
        add_update(store, "exp1", 0, "env_one", 2.0, tmp_path / "b", 2, again)
    assert [e.stage for _, e, _ in store.events("exp1")] == [r.Stage.AGGREGATED, r.Stage.TRAIN]
    assert store.updates("exp1", 0) == [("env_one", 1.0, tmp_path / "a", 1)]
    recorded = [(_event(0, "env_two", r.Stage.TRAIN, 0.4), 10.0)]
    store.add_events("exp1", recorded)  # reported by ReportMetrics before its upload failed and came again
    assert add_update(store, "exp1", 0, "env_two", 1.0, tmp_path / "c", 1, recorded) == [False]
    assert add_update(store, "exp1", 1, "env_two", 1.0, tmp_path / "d", 1) == []


def test_sqlite_keeps_an_update_and_its_reports_in_one_transaction(path, tmp_path):
    """The connection autocommits each statement, so a transaction must be explicit: a report that cannot be
    written takes the update row and the reports before it back out, and add_events keeps all or none."""
    s = SqliteStore(path)
    broken = r.MetricEvent(round=0, envoy="env_one", stage=r.Stage.LOCAL, metrics=(r.Metric("t", "acc", object()),))
    with pytest.raises(TypeError):
        add_update(s, "exp1", 0, "env_one", 1.0, tmp_path / "a", 1, [(_event(0, "env_one"), 1.0), (broken, 1.0)])
    assert s.updates("exp1", 0) == [] and s.events("exp1") == []
    with pytest.raises(TypeError):
        s.add_events("exp1", [(_event(0, "env_two"), 1.0), (broken, 1.0)])
    assert s.events("exp1") == []
    statements: list[str] = []
    s._db.set_trace_callback(statements.append)
    assert add_update(s, "exp1", 0, "env_one", 1.0, tmp_path / "a", 1, [(_event(0, "env_one"), 1.0)]) == [True]
    assert [q.split()[0] for q in statements] == ["BEGIN", "INSERT", "INSERT", "COMMIT"]  # one commit, one sync
    s.close()
    reopened = SqliteStore(path)
    assert reopened.updates("exp1", 0) == [("env_one", 1.0, tmp_path / "a", 1)] and len(reopened.events("exp1")) == 1
    reopened.close()


def test_add_updates_keeps_each_update_of_a_batch_but_a_second_one(store, tmp_path):
    """A batch is one write: every update and its reports kept, but the one an envoy already has, which keeps
    nothing of itself and leaves the others kept."""
    add_update(store, "exp1", 0, "env_two", 1.0, tmp_path / "first", 1)
    answers = store.add_updates("exp1", 0, [
        NewUpdate("env_one", 2.0, tmp_path / "a", 10, [(_event(0, "env_one"), 2.0)]),
        NewUpdate("env_two", 3.0, tmp_path / "b", 20, [(_event(0, "env_two", value=0.9), 3.0)]),
        NewUpdate("env_three", 4.0, tmp_path / "c", 30, [(_event(0, "env_three"), 4.0), (_event(0, "env_one"), 1.0)]),
    ])
    assert answers[0] == [True] and isinstance(answers[1], AlreadyExistsError) and answers[2] == [True, False]
    assert "env_two" in str(answers[1])
    assert store.updates("exp1", 0) == [("env_two", 1.0, tmp_path / "first", 1), ("env_one", 2.0, tmp_path / "a", 10),
                                        ("env_three", 4.0, tmp_path / "c", 30)]
    assert sorted(e.envoy for _, e, _ in store.events("exp1")) == ["env_one", "env_three"]  # env_two's report: not kept


def test_sqlite_keeps_a_batch_of_updates_in_one_transaction(path, tmp_path):
    s = SqliteStore(path)
    statements: list[str] = []
    s._db.set_trace_callback(statements.append)
    batch = [NewUpdate(f"env_{i}", 1.0, tmp_path / str(i), 1, [(_event(0, f"env_{i}"), 1.0)]) for i in range(3)]
    assert s.add_updates("exp1", 0, batch) == [[True]] * 3
    assert [q.split()[0] for q in statements] == ["BEGIN"] + ["INSERT"] * 6 + ["COMMIT"]  # one commit, one sync
    s.close()
    reopened = SqliteStore(path)
    assert [u[0] for u in reopened.updates("exp1", 0)] == ["env_0", "env_1", "env_2"]
    reopened.close()
