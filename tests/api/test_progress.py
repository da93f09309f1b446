"""The rows stream_metrics returns: one per round, aggregated metrics keyed by stage and name."""
from types import SimpleNamespace

from fedjax_core import records as r
from fedjax_core.api.progress import MetricsView


def view():
    experiment = SimpleNamespace(get_experiment_status=lambda: SimpleNamespace(envoys=("a", "b"), rounds=1))
    return MetricsView(experiment, log_dir=None, progress=False, live_table=False)


def test_rows_collect_aggregates_and_round_times():
    v = view()
    v.add(r.MetricEvent(0, "a", r.Stage.TRAIN, (r.Metric("train", "acc", 0.5),)))  # per envoy: not in rows
    v.add(r.MetricEvent(0, "", r.Stage.AGGREGATED, (r.Metric("validate", "acc", 0.1),)))
    v.add(r.MetricEvent(0, "", r.Stage.TRAIN, (r.Metric("train", "acc", 0.2),)))
    v.add(r.MetricEvent(0, "", r.Stage.ROUND, (r.Metric("round", "time_s", 1.25),), round_time_s=1.25))
    v.add(r.MetricEvent(1, "", r.Stage.AGGREGATED, (r.Metric("validate", "acc", 0.3),)))
    assert v.rows == [{"round": 0, "agg_val/acc": 0.1, "train/acc": 0.2, "round_time_s": 1.25},
                      {"round": 1, "agg_val/acc": 0.3}]


def test_same_metric_name_from_two_tasks_keeps_both():
    v = view()
    v.add(r.MetricEvent(0, "", r.Stage.AGGREGATED, (r.Metric("validate", "acc", 0.1),
                                                      r.Metric("validate_ema", "acc", 0.4))))
    assert v.rows == [{"round": 0, "agg_val/validate.acc": 0.1, "agg_val/validate_ema.acc": 0.4}]


def test_a_sampled_round_says_who_took_part():
    v = view()
    v.add(r.MetricEvent(0, "", r.Stage.ROUND, (), round_time_s=1.0, participants=("b",)))
    v.add(r.MetricEvent(1, "", r.Stage.ROUND, (), round_time_s=1.0, participants=("a", "b")))  # everyone: no column
    assert v.rows == [{"round": 0, "round_time_s": 1.0, "participants": "b"}, {"round": 1, "round_time_s": 1.0}]


def test_progress_bars_count_the_rounds_participants_and_number_rounds_from_one():
    status = SimpleNamespace(envoys=("a", "b", "c"), rounds=2, participants={0: ("a",), 1: ("b", "c")})
    v = MetricsView(SimpleNamespace(get_experiment_status=lambda: status), log_dir=None, progress=True,
                    live_table=False)
    v.add(r.MetricEvent(0, "a", r.Stage.AGGREGATED, ()))
    assert (v._bar.total, v._bar.desc) == (3, "round 0 (1 of 2)")
    v.add(r.MetricEvent(1, "b", r.Stage.AGGREGATED, ()))
    assert (v._bar.total, v._bar.desc) == (6, "round 1 (2 of 2)")
    v.add(r.MetricEvent(2, "b", r.Stage.AGGREGATED, ()))
    assert (v._bar.total, v._bar.desc) == (3, "final validation")
    v.close()


def test_a_private_round_shows_its_epsilon_and_an_early_stop_makes_the_next_validation_final(capsys):
    status = SimpleNamespace(envoys=("a", "b"), rounds=5)
    v = MetricsView(SimpleNamespace(get_experiment_status=lambda: status), log_dir=None, progress=False,
                    live_table=True)
    v.add(r.MetricEvent(0, "", r.Stage.ROUND, (r.Metric("privacy", "epsilon", 1.5),), round_time_s=1.0))
    v.add(r.MetricEvent(1, "", r.Stage.ROUND, (r.Metric("privacy", "epsilon", 2.5),
                                                r.Metric("privacy", "training_stopped", 1)),
                        round_time_s=1.0, note="training stops after round 1: round 2 would raise epsilon"))
    v.add(r.MetricEvent(2, "", r.Stage.AGGREGATED, (r.Metric("validate", "acc", 0.7),)))
    assert [row.get("epsilon") for row in v.rows] == [1.5, 2.5, None]
    out = capsys.readouterr().out
    assert "training stops after round 1" in out
    assert "round=2, agg_val/acc=0.7000" in out  # shown as the final validation, not left waiting for round 2
