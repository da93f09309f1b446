"""The round engine in-process: strategies with server state, sampling, per-round config, and a
fold that runs outside the lock every other call needs."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from fedjax_core import records as r
from fedjax_core import strategies as s
from fedjax_core.director.core import Director
from fedjax_core.director.rules import select_participants
from fedjax_core.errors import InvalidRequestError, PreconditionError
from fedjax_core.spec import ExperimentSpec, from_flat
from fedjax_core.tensors import iter_chunks, spec_of
from fedjax_core.model_file import ModelFile
from test_core import round_model

INITIAL = {"params/w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "params/b": np.zeros(4, np.float32),
           "step": np.array(0, np.int32)}
INFO = r.ShardInfo("shard", ("32", "32", "3"), ("1",), 10, 5)


def make_director(tmp_path, envoys=("a", "b")) -> Director:
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)
    for envoy in envoys:
        d.register_envoy(envoy, INFO)
    return d


def reopen(d: Director, tmp_path) -> Director:
    d.close()
    return Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)


def header(name="exp", strategy: s.Strategy = s.FedAvg(), **overrides) -> ExperimentSpec:
    agg, params = strategy.to_wire()
    fields = dict(name=name, rounds=3, opt_treatment="CONTINUE_GLOBAL", bundle_size=3, aggregation=agg,
                  aggregation_params=params, model_spec=tuple(spec_of(n, a) for n, a in INITIAL.items()))
    return from_flat({**fields, **overrides})


def submit(d: Director, h: ExperimentSpec) -> None:
    d.submit_experiment(h, [b"abc"], iter_chunks(INITIAL))


def update(envoy: str, round_: int) -> dict[str, np.ndarray]:
    """A deterministic upload per envoy and round."""
    rng = np.random.default_rng([ord(envoy[0]), round_])
    return {"params/w": rng.standard_normal((3, 4)).astype(np.float32),
            "params/b": rng.standard_normal(4).astype(np.float32), "step": np.array(round_ + 1, np.int32)}


def model_file(tmp_path, round_: int, name="exp") -> dict[str, np.ndarray]:
    return ModelFile(tmp_path / "state" / "experiments" / name / f"model_round_{round_:04d}.fjm").arrays()


def play_round(d: Director, round_: int, envoys=("a", "b"), name="exp") -> None:
    for envoy in envoys:
        d.uploads.accept_update(envoy, name, round_, 10 + ord(envoy[0]), iter_chunks(update(envoy, round_)))


@pytest.mark.parametrize("strategy", [s.FedAdam(eta=0.05), s.FedYogi(), s.FedAvgM(), s.FedMedian()], ids=repr)
def test_a_restart_between_rounds_resumes_bit_identically(tmp_path, strategy):
    straight = make_director(tmp_path / "straight")
    submit(straight, header(strategy=strategy))
    for t in range(3):
        play_round(straight, t)
    want = model_file(tmp_path / "straight", 3)

    d = make_director(tmp_path / "restarted")
    submit(d, header(strategy=strategy))
    play_round(d, 0)
    play_round(d, 1, envoys=("a",))
    d = reopen(d, tmp_path / "restarted")  # killed with one update of round 1 folded
    play_round(d, 1, envoys=("b",))
    d = reopen(d, tmp_path / "restarted")
    play_round(d, 2)
    got = model_file(tmp_path / "restarted", 3)
    assert d.catalog.experiment_status("exp").current_round == 3
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    assert not np.array_equal(got["params/w"], model_file(tmp_path / "straight", 3)["params/w"] * 0)
    straight.close()
    d.close()


def test_server_state_is_written_beside_each_round_model(tmp_path):
    d = make_director(tmp_path)
    submit(d, header(strategy=s.FedAdam()))
    play_round(d, 0)
    exp = tmp_path / "state" / "experiments" / "exp"
    state = ModelFile(exp / "server_state_round_0001.fjm")
    assert sorted(state.names()) == ["m/params/b", "m/params/w", "v/params/b", "v/params/w"]
    assert not (exp / "model_round_0000.fjm").exists() and not (exp / "round_0000").exists()
    d.close()


def test_krum_that_cannot_work_is_refused_at_submission(tmp_path):
    d = make_director(tmp_path)
    with pytest.raises(InvalidRequestError, match="needs more than 2 uploads per round, but rounds can close with 2"):
        submit(d, header(strategy=s.Krum()))
    d.close()


@pytest.mark.parametrize("overrides, message", [
    (dict(aggregation="fedsgd"), "unknown aggregation 'fedsgd'"),
    (dict(aggregation="fedadam", aggregation_params='{"eta": -1}'), "eta must be > 0"),
    (dict(envoys_per_round=3), "envoys_per_round=3, but the experiment has 2 envoys"),
    (dict(envoys_fraction=1.5), r"fraction must be in \(0, 1\]"),
    (dict(envoys_per_round=1, envoys_fraction=0.5), "not both"),
    (dict(envoys_per_round=1, min_envoys=2, round_timeout_s=5), "min_envoys=2 is more than the 1 envoys"),
    (dict(round_config="[{}]"), r"one entry per training round \(3\)"),
    (dict(round_config='[1, 2, 3]'), "must map task names"),
    (dict(round_config="x" * (1 << 21)), "at most"),
    (dict(round_config="[" * 100_000 + "]" * 100_000), "not valid JSON"),
])
def test_bad_round_settings_are_refused_at_submission(tmp_path, overrides, message):
    d = make_director(tmp_path)
    with pytest.raises(InvalidRequestError, match=message):
        submit(d, header(**overrides))
    assert d.catalog.experiments() == []
    d.close()


def test_sampling_selects_what_the_seed_says_and_records_it(tmp_path):
    envoys = ("a", "b", "c", "d")
    d = make_director(tmp_path, envoys)
    submit(d, header(envoys_per_round=2, sampling_seed=1234))
    for t in range(3):
        chosen = select_participants(envoys, 2, 1234, t)
        left_out = sorted(set(envoys) - set(chosen))
        assert d.workers.current_task(left_out[0], "exp").kind == r.TaskKind.NONE  # sits the round out
        with pytest.raises(PreconditionError, match=f"was not selected for round {t}"):
            d.uploads.accept_update(left_out[0], "exp", t, 10, iter_chunks(update(left_out[0], t)))
        assert d.workers.current_task(chosen[0], "exp").kind == r.TaskKind.TRAIN
        play_round(d, t, envoys=chosen)
    status = d.catalog.experiment_status("exp")
    assert status.participants == {t: select_participants(envoys, 2, 1234, t) for t in range(3)}
    assert len(set(status.participants.values())) > 1  # the seed draws different pairs
    summaries = [e for _, e, _ in d.store.events("exp") if e.stage == r.Stage.ROUND]
    assert [e.participants for e in summaries] == list(status.participants.values())
    # after the last round every envoy validates the final model
    assert {e: d.workers.current_task(e, "exp").kind for e in envoys} == dict.fromkeys(envoys, r.TaskKind.VALIDATE)
    d.close()


def test_a_fraction_samples_floor_of_it_and_at_least_one(tmp_path):
    d = make_director(tmp_path, ("a", "b", "c"))
    submit(d, header(envoys_fraction=0.2, sampling_seed=5))
    assert len(d.catalog.experiment_status("exp").participants[0]) == 1
    d.close()


def test_round_config_reaches_each_rounds_task(tmp_path):
    d = make_director(tmp_path)
    config = [{"train": {"lr": 0.1 / (t + 1)}} for t in range(3)]
    submit(d, header(round_config=json.dumps(config)))
    for t in range(3):
        task = d.workers.current_task("a", "exp")
        assert (task.round, json.loads(task.task_kwargs)) == (t, config[t])
        play_round(d, t)
    assert json.loads(d.workers.current_task("a", "exp").task_kwargs) == config[2]  # final validation: the last round's
    d.close()


def test_a_paused_fold_blocks_neither_heartbeats_nor_registry_reads(tmp_path, monkeypatch):
    d = make_director(tmp_path, ("a", "b", "c"))
    submit(d, header(envoys=("a", "b")))
    in_fold, release = threading.Event(), threading.Event()
    keep = d.engine.keep

    def paused_keep(run, spooled):  # holds the round's keep_lock, as keeping a large update does
        if "a" in [update.envoy for update in spooled]:
            in_fold.set()
            assert release.wait(30), "the test never released the fold"
        return keep(run, spooled)

    monkeypatch.setattr(d.engine, "keep", paused_keep)
    uploader = threading.Thread(target=play_round, args=(d, 0, ("a",)))
    uploader.start()
    try:
        assert in_fold.wait(30), "the fold did not start"
        answers = {}

        def calls():
            answers["heartbeat"] = d.heartbeat("c")
            answers["registry"] = sorted(e.name for e in d.catalog.shard_registry())
            answers["status"] = d.catalog.experiment_status("exp").state
            answers["task"] = d.workers.current_task("b", "exp").kind
            d.workers.report_metrics("b", "exp", 0, r.Stage.TRAIN, (r.Metric("train", "acc", 0.5),), 10)
            answers["metrics"] = True

        caller = threading.Thread(target=calls)
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), "a call waited for the fold in progress"
        assert answers == {"heartbeat": True, "registry": ["a", "b", "c"], "status": "running",
                           "task": r.TaskKind.TRAIN, "metrics": True}
    finally:
        release.set()
        uploader.join(30)
    play_round(d, 0, ("b",))
    assert d.catalog.experiment_status("exp").current_round == 1
    d.close()


def test_a_paused_close_blocks_neither_heartbeats_nor_status(tmp_path, monkeypatch):
    d = make_director(tmp_path)
    submit(d, header())
    in_close, release = threading.Event(), threading.Event()
    real_close = d.engine.close

    def paused_close(run):
        in_close.set()
        assert release.wait(30)
        return real_close(run)

    monkeypatch.setattr(d.engine, "close", paused_close)
    closer = threading.Thread(target=play_round, args=(d, 0))
    closer.start()
    try:
        assert in_close.wait(30)
        result = {}
        caller = threading.Thread(target=lambda: result.update(hb=d.heartbeat("a"), st=d.catalog.experiment_status("exp"),
                                                               task=d.workers.current_task("a", "exp").kind))
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), "a call waited for the round to close"
        assert result["hb"] and result["st"].current_round == 0 and result["task"] == r.TaskKind.NONE
    finally:
        release.set()
        closer.join(30)
    assert d.catalog.experiment_status("exp").current_round == 1
    d.close()


def pause_close(d: Director, monkeypatch):
    """Make the next round close wait for ``release``; returns (in_close, release) events."""
    in_close, release = threading.Event(), threading.Event()
    real_close = d.engine.close

    def paused_close(run):
        in_close.set()
        if not release.wait(30):  # the test blocked on the close it paused: make that visible
            in_close.timed_out = True
        return real_close(run)

    in_close.timed_out = False
    monkeypatch.setattr(d.engine, "close", paused_close)
    return in_close, release


def test_a_round_model_asked_for_while_the_round_closes_is_refused_and_old_files_go_after(tmp_path, monkeypatch):
    d = make_director(tmp_path)
    submit(d, header())
    in_close, release = pause_close(d, monkeypatch)
    closer = threading.Thread(target=play_round, args=(d, 0))
    closer.start()
    try:
        assert in_close.wait(30)
        with pytest.raises(PreconditionError, match=r"round 0 is not open: the current round of 'exp' is 0 \(closing\)"):
            round_model(d, "a", "exp", 0)
        assert len(list(d.catalog.model_chunks("exp", "last"))) > 0  # the last model is still there to download
    finally:
        release.set()
        closer.join(30)
    assert not in_close.timed_out
    exp = tmp_path / "state" / "experiments" / "exp"
    assert not (exp / "model_round_0000.fjm").exists() and (exp / "model_round_0001.fjm").exists()
    assert len(round_model(d, "a", "exp", 1)) > 0
    d.close()


def test_a_cancel_while_a_round_closes_does_not_advance_it(tmp_path, monkeypatch):
    d = make_director(tmp_path)
    submit(d, header(envoys_per_round=1, sampling_seed=3))
    in_close, release = pause_close(d, monkeypatch)
    chosen = d.catalog.experiment_status("exp").participants[0]
    closer = threading.Thread(target=play_round, args=(d, 0, chosen))
    closer.start()
    try:
        assert in_close.wait(30)
        assert d.cancel_experiment("exp").state == "cancelled"  # answers without waiting for the close
    finally:
        release.set()
        closer.join(30)
    assert not in_close.timed_out
    status = d.catalog.experiment_status("exp")
    assert (status.state, status.current_round, len(status.participants)) == ("cancelled", 0, 1)
    assert not (tmp_path / "state" / "experiments" / "exp" / "round_0000").exists()
    d.close()


def test_an_experiment_sized_on_online_envoys_waits_for_them_instead_of_failing(tmp_path):
    now = [1000.0]
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=1,
                 clock=lambda: now[0])
    for envoy in ("a", "b"):
        d.register_envoy(envoy, INFO)
    submit(d, header(name="first", envoys=("a", "b")))
    submit(d, header(name="second", envoys_per_round=2))  # two online now; queued behind "first"
    d.store.touch_envoy("a")
    with d.store._lock, d.store._db:  # "b" was last seen long ago: offline
        d.store._db.execute("UPDATE envoys SET last_seen = 0 WHERE name = 'b'")
    now[0] = d.store.envoys()[0][2]  # "a" seen just now
    d.cancel_experiment("first")
    assert d.catalog.experiment_status("second").state == "queued"  # waits: only one envoy is online
    d.heartbeat("b")
    assert d.catalog.experiment_status("second").state == "running"
    d.close()


def wait_until(condition, timeout_s=30.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_deadlines_and_round_times_follow_the_monotonic_timer_not_the_wall_clock(tmp_path):
    wall, timer = [1_000_000.0], [50.0]
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60,
                 clock=lambda: wall[0], timer=lambda: timer[0])
    for envoy in ("a", "b"):
        d.register_envoy(envoy, INFO)
    submit(d, header(round_timeout_s=30, min_envoys=1))
    play_round(d, 0, envoys=("a",))
    wall[0] -= 3 * 24 * 3600  # the wall clock steps back three days (NTP, a VM resume...)
    timer[0] += 31  # while 31 s pass
    with d.lock:
        d.lock.notify_all()  # the watcher recomputes its deadline
    wait_until(lambda: d.catalog.experiment_status("exp").current_round == 1)
    summary = next(e for _, e, _ in d.store.events("exp") if e.stage == r.Stage.ROUND)
    assert summary.round_time_s == pytest.approx(31.0)
    d.close()


def test_an_experiment_waiting_for_an_offline_envoy_does_not_block_the_queue(tmp_path):
    now = [1000.0]
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=1,
                 clock=lambda: now[0])
    for envoy in ("a", "b", "c"):
        d.register_envoy(envoy, INFO)
    now[0] += 10  # everyone's heartbeat is old now...
    for envoy in ("a", "b"):
        d.heartbeat(envoy)  # ...except a's and b's (the store's own clock is the real one)
    now[0] = max(seen for _, _, seen in d.store.envoys())
    with d.store._lock, d.store._db:
        d.store._db.execute("UPDATE envoys SET last_seen = 0 WHERE name = 'c'")
    submit(d, header(name="needs-c", envoys=("a", "c")))
    submit(d, header(name="has-its-envoys", envoys=("a", "b")))
    assert d.catalog.experiment_status("needs-c").state == "queued"
    assert d.catalog.experiment_status("has-its-envoys").state == "running"  # went ahead of the waiting one
    d.cancel_experiment("has-its-envoys")
    d.heartbeat("c")
    assert d.catalog.experiment_status("needs-c").state == "running"
    d.close()


def test_a_second_daemon_under_an_online_name_is_refused_and_a_silent_ones_name_is_freed(tmp_path):
    from fedjax_core.errors import AlreadyExistsError

    now = [1000.0]
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=1,
                 clock=lambda: now[0])
    now[0] = 0
    d.register_envoy("a", INFO, "first")
    now[0] = max(seen for _, _, seen in d.store.envoys())  # just heard from
    with pytest.raises(AlreadyExistsError, match="an envoy named 'a' is already online"):
        d.register_envoy("a", INFO, "second")
    assert d.heartbeat("a", "second") is False  # the twin cannot keep the name alive either
    assert d.heartbeat("a", "first") is True
    d.register_envoy("a", INFO, "first")  # the holder re-registers (after a director restart, say)
    now[0] += 10  # the first daemon went silent: its name is free again
    d.register_envoy("a", INFO, "second")
    assert d.heartbeat("a", "second") is True
    d.close()


def test_an_update_weighs_at_most_the_train_size_its_envoy_registered(tmp_path):
    d = make_director(tmp_path)  # a and b registered 10 training samples each
    submit(d, header())
    d.uploads.accept_update("a", "exp", 0, 2**62, iter_chunks({**update("a", 0), "params/b": np.zeros(4, np.float32)}))
    d.uploads.accept_update("b", "exp", 0, 10, iter_chunks({**update("b", 0), "params/b": np.ones(4, np.float32)}))
    np.testing.assert_allclose(model_file(tmp_path, 1)["params/b"], 0.5)  # 10 : 10, not 2**62 : 10
    d.close()


def test_a_non_finite_update_is_refused_naming_the_tensor(tmp_path):
    d = make_director(tmp_path)
    submit(d, header())
    bad = {**update("a", 0), "params/w": np.full((3, 4), np.nan, np.float32)}
    with pytest.raises(InvalidRequestError, match="non-finite values in 'params/w'"):
        d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(bad))
    play_round(d, 0)  # nothing of it was kept: the round goes on with good updates
    assert np.isfinite(model_file(tmp_path, 1)["params/w"]).all()
    d.close()


def test_one_upload_at_a_time_per_envoy_and_round(tmp_path):
    d = make_director(tmp_path)
    submit(d, header())
    second_result = {}

    def chunks_with_a_second_upload():
        chunks = list(iter_chunks(update("a", 0)))
        yield chunks[0]
        try:
            d.uploads.accept_update("a", "exp", 0, 10, iter_chunks(update("a", 0)))
        except PreconditionError as exc:
            second_result["error"] = str(exc)
        yield from chunks[1:]

    d.uploads.accept_update("a", "exp", 0, 10, chunks_with_a_second_upload())
    assert second_result["error"] == "an upload from envoy 'a' for round 0 is already in progress"
    d.close()


@pytest.mark.parametrize("info, message", [
    (r.ShardInfo("x" * 5000, ("32", "32", "3"), ("1",), 10, 5), "shard description is 5000 characters"),
    (r.ShardInfo("s", ("32", "32", "3"), ("1",), 10, 5, devices=("cpu",) * 100), "devices has 100 entries"),
    (r.ShardInfo("s", ("32", "32", "3"), ("1",), -1, 5), "cannot be negative"),
    (r.ShardInfo("s", ("32", "32", "3"), ("1",), 10, 5, label_counts=(1,) * 70000), "label_counts has 70000"),
])
def test_oversized_or_negative_shard_info_is_refused(tmp_path, info, message):
    d = make_director(tmp_path)
    with pytest.raises(InvalidRequestError, match=message):
        d.register_envoy("c", info)
    assert "c" not in [name for name, _, _ in d.store.envoys()]
    d.close()


def test_metric_reports_and_error_texts_are_bounded(tmp_path):
    d = make_director(tmp_path)
    submit(d, header())
    with pytest.raises(InvalidRequestError, match="reported 300 metrics at once; at most 256"):
        d.workers.report_metrics("a", "exp", 0, r.Stage.TRAIN, tuple(r.Metric("t", f"m{i}", 1.0) for i in range(300)), 10)
    with pytest.raises(InvalidRequestError, match="metric name"):
        d.workers.report_metrics("a", "exp", 0, r.Stage.TRAIN, (r.Metric("t", "m" * 1000, 1.0),), 10)
    d.workers.report_failure("a", "exp", "boom " * 10_000)
    error = d.catalog.experiment_status("exp").error
    assert len(error) < 17_000 and "more characters cut by the director" in error
    d.close()


def test_a_model_over_the_size_cap_is_refused_at_submission(tmp_path):
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60,
                 max_model_bytes=32)
    d.register_envoy("a", INFO)
    with pytest.raises(InvalidRequestError, match=r"settings.max_model_bytes"):
        submit(d, header(envoys=("a",)))
    d.close()


def test_files_left_by_a_crash_are_swept_at_start_up(tmp_path):
    d = make_director(tmp_path)
    submit(d, header(strategy=s.FedAdam()))
    play_round(d, 0)
    play_round(d, 1, envoys=("a",))  # round 1 in progress, one update spooled
    exp = tmp_path / "state" / "experiments" / "exp"
    stale = [exp / "round_0000", exp / "model_round_0000.fjm", exp / "server_state_round_0000.fjm",
             exp / "model_round_0002.fjm.partial", tmp_path / "state" / "incoming" / ".a-123.fjm"]
    stale[0].mkdir()
    (stale[0] / "a.fjm").write_bytes(b"x")
    for path in stale[1:]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    d = reopen(d, tmp_path)
    assert [p for p in stale if p.exists()] == []
    kept = sorted(p.name for p in exp.iterdir())
    assert kept == ["bundle.bin", "model_round_0001.fjm", "round_0001", "server_state_round_0001.fjm"]
    play_round(d, 1, envoys=("b",))  # the spooled update of round 1 survived and is counted
    assert d.catalog.experiment_status("exp").current_round == 2
    d.close()


def test_a_dropout_survives_a_restart_and_the_round_closes_with_the_others(tmp_path):
    d = make_director(tmp_path, ("a", "b", "c"))
    submit(d, header(min_envoys=2))
    d.workers.report_failure("c", "exp", "ValueError: bad batch", round_=0)
    assert d.workers.current_task("c", "exp").kind == r.TaskKind.NONE  # out of this round
    with pytest.raises(PreconditionError, match="dropped out of round 0"):
        d.uploads.accept_update("c", "exp", 0, 10, iter_chunks(update("c", 0)))
    with pytest.raises(PreconditionError, match="has gone on without envoy 'c'"):
        d.workers.report_failure("c", "exp", "again", round_=0)
    play_round(d, 0, envoys=("a",))
    d = reopen(d, tmp_path)  # killed with a dropped and b pending
    assert d.catalog.experiment_status("exp").current_round == 0
    play_round(d, 0, envoys=("b",))
    assert d.catalog.experiment_status("exp").current_round == 1  # closed with a and b
    assert d.workers.current_task("c", "exp").kind == r.TaskKind.TRAIN  # c rejoins round 1
    notes = [e.note for _, e, _ in d.store.events("exp") if e.stage == r.Stage.DROPOUT]
    assert notes == ["envoy 'c' dropped out of round 0: ValueError: bad batch; 2 of 3 continue (the round needs 2)"]
    d.close()


def test_a_failure_outside_a_round_still_ends_the_experiment(tmp_path):
    d = make_director(tmp_path)
    submit(d, header(min_envoys=1))
    d.workers.report_failure("a", "exp", "ModuleNotFoundError: no module named 'mine'")  # the worker cannot start
    status = d.catalog.experiment_status("exp")
    assert status.state == "failed" and status.error == "envoy 'a' failed: ModuleNotFoundError: no module named 'mine'"
    d.close()


def test_a_participant_whose_heartbeats_stop_drops_out_and_rejoins_when_back(tmp_path):
    timer = [0.0]
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60,
                 timer=lambda: timer[0], envoy_timeout_s=30)
    for envoy in ("a", "b"):
        d.register_envoy(envoy, INFO)
    submit(d, header(min_envoys=1))
    play_round(d, 0, envoys=("a",))
    timer[0] = 20
    d.heartbeat("a")  # a keeps beating; b has been silent since t=0
    timer[0] = 31
    with d.lock:
        d.lock.notify_all()
    wait_until(lambda: d.catalog.experiment_status("exp").current_round == 1)  # closed with a alone
    notes = [e.note for _, e, _ in d.store.events("exp") if e.stage == r.Stage.DROPOUT]
    assert notes[:1] == ["envoy 'b' dropped out of round 0: no heartbeat for 30s (settings.envoy_timeout_s); it rejoins "
                     "when it is back; 1 of 2 continue (the round needs 1)"]
    # still silent when round 1 starts: out of round 1 at once, without waiting another 30 s
    wait_until(lambda: [e.round for _, e, _ in d.store.events("exp") if e.stage == r.Stage.DROPOUT] == [0, 1])
    d.heartbeat("b")  # back
    play_round(d, 1, envoys=("a",))
    assert d.catalog.experiment_status("exp").current_round == 2
    assert d.workers.current_task("b", "exp").kind == r.TaskKind.TRAIN  # it takes part in round 2
    d.close()


def test_an_experiment_too_big_for_the_online_envoys_but_not_the_registered_ones_waits_in_the_queue(tmp_path):
    """Krum(f=0) needs 3 uploads a round: with 3 envoys registered and 2 online it is queued (the docs' promise),
    and starts when the third comes back; with only 2 registered at all it is refused at submission."""
    now = [1000.0]
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=1,
                 clock=lambda: now[0])
    for envoy in ("a", "b", "c"):
        d.register_envoy(envoy, INFO)
    with d.store._lock, d.store._db:  # "c" was last seen long ago: offline
        d.store._db.execute("UPDATE envoys SET last_seen = 0 WHERE name = 'c'")
    d.registry._seen.pop("c")
    submit(d, header(strategy=s.Krum(num_malicious_clients=0)))
    assert d.catalog.experiment_status("exp").state == "queued"
    d.heartbeat("c")
    assert d.catalog.experiment_status("exp").state == "running" and d.catalog.experiment_status("exp").envoys == ("a", "b", "c")
    d.close()


def test_a_heartbeat_from_memory_does_what_the_full_one_does_and_leaves_the_rest_to_it(tmp_path):
    """The event loop answers most heartbeats from memory; a refusal, a database write that is due or an envoy
    coming back online go the full way, untouched."""
    now, timer = [1000.0], [0.0]
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=1,
                 clock=lambda: now[0], timer=lambda: timer[0])
    d.register_envoy("a", INFO, "daemon-1")
    now[0], timer[0] = 1001.0, 1.0
    assert d.heartbeat_in_memory("a", "daemon-1")
    assert d.registry.silent_until("a", 30) == 31.0  # heard at 1.0, as a full heartbeat would have it
    assert not d.heartbeat_in_memory("a", "daemon-2")  # another daemon's claim: the full heartbeat refuses it
    assert d.heartbeat("a", "daemon-2") is False
    assert not d.heartbeat_in_memory("ghost", "x")  # never registered
    now[0] = 1001.0 + 31  # last_seen persisted 31 s ago: the database's turn (and offline by now: 2.5 periods)
    assert not d.heartbeat_in_memory("a", "daemon-1")
    assert d.heartbeat("a", "daemon-1") is True
    assert d.registry._persisted_seen["a"] == now[0]  # the full heartbeat wrote last_seen to the database
    now[0] += 1
    assert d.heartbeat_in_memory("a", "daemon-1")
    now[0] += 3  # silent 3 s = 3 periods: offline; coming back may start a queued experiment
    assert not d.heartbeat_in_memory("a", "daemon-1")
    d.close()
