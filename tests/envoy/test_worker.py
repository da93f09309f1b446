"""The worker: its compiled optimizer init (the same state as optax's own, traced once; op by op for an init
that cannot be traced), CPU-only for a standby that imported JAX, and metric reports sent in the background."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from fedjax_core.envoy.worker import MetricReports
from fedjax_core.runtime.round_runner import OptimizerInit
from fedjax_core.errors import PreconditionError


def _state(tx) -> train_state.TrainState:
    params = {"dense": {"kernel": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "bias": jnp.ones(3, jnp.bfloat16)}}
    return train_state.TrainState.create(apply_fn=lambda *a: None, params=params, tx=tx)


def _assert_same(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape and getattr(g, "weak_type", False) == getattr(w, "weak_type", False)
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_compiled_init_matches_optax_and_traces_once():
    traces = []
    inner = optax.adam(1e-3)

    def init(params):
        traces.append(1)
        return inner.init(params)

    tx = optax.GradientTransformation(init, inner.update)
    state, fresh = _state(tx), OptimizerInit()
    traces.clear()  # TrainState.create ran it once
    for _ in range(3):  # one RESET per round
        _assert_same(fresh(state), inner.init(state.params))
    assert len(traces) == 1  # compiled in the first round, reused after


def test_an_init_that_branches_on_values_runs_op_by_op():
    calls = []

    def init(params):
        calls.append(1)
        scale = 2.0 if float(params["dense"]["kernel"].sum()) > 0 else 1.0  # needs concrete values: not traceable
        return jax.tree.map(lambda p: jnp.full_like(p, scale), params)

    state, fresh = _state(optax.GradientTransformation(init, lambda u, s, p=None: (u, s))), OptimizerInit()
    calls.clear()
    for _ in range(2):
        got = fresh(state)
        assert float(got["dense"]["kernel"][0, 0]) == 2.0
    assert len(calls) == 3  # the failed trace, then eagerly in both rounds


def test_eager_when_asked():
    calls = []
    inner = optax.sgd(0.1, momentum=0.9)

    def init(params):
        calls.append(isinstance(params["dense"]["kernel"], jax.core.Tracer))
        return inner.init(params)

    state = _state(optax.GradientTransformation(init, inner.update))
    calls.clear()
    _assert_same(OptimizerInit(eager=True)(state), inner.init(state.params))
    assert calls == [False]


def test_cpu_only_reaches_a_jax_that_a_standby_imported_already():
    script = ("import jax; from fedjax_core.envoy.worker import cpu_only; cpu_only(); "
              "import os; print(jax.config.jax_platforms, os.environ['JAX_PLATFORMS'], jax.default_backend())")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "cpu", "cpu"]


class _SlowDirector:
    """Answers report_metrics once released; records the order; refuses the stages in ``refuse``."""

    envoy_name = "env1"

    def __init__(self, refuse=()):
        self.release, self.got, self.refuse = threading.Event(), [], set(refuse)

    def report_metrics(self, experiment, round_, stage, metrics, sample_count):
        assert self.release.wait(30)
        self.got.append((round_, stage))
        if stage in self.refuse:
            raise PreconditionError(f"round {round_} is not open")


def test_metric_reports_do_not_hold_up_the_next_task_and_keep_their_order():
    director = _SlowDirector()
    reports = MetricReports(director)
    for stage in ("aggregated_model_validation", "train", "locally_tuned_model_validation"):
        reports.send("exp", 3, stage, {"t": {"acc": 0.5}}, 10)  # returns while the director has not answered
    assert director.got == []
    director.release.set()
    reports.wait()
    assert director.got == [(3, "aggregated_model_validation"), (3, "train"), (3, "locally_tuned_model_validation")]


def test_waiting_on_reports_raises_the_first_refusal_unless_told_not_to(capsys):
    director = _SlowDirector(refuse={"train", "locally_tuned_model_validation"})
    director.release.set()
    reports = MetricReports(director)
    for stage in ("aggregated_model_validation", "train", "locally_tuned_model_validation"):
        reports.send("exp", 1, stage, {}, 1)
    with pytest.raises(PreconditionError, match="round 1 is not open"):
        reports.wait()
    reports.send("exp", 2, "train", {}, 1)
    reports.wait(raise_first=False)  # a task failed already: that is what gets reported, this is logged
    assert director.got[-1] == (2, "train")
    assert "[worker env1] a metric report was not taken: round 2 is not open" in capsys.readouterr().err
    reports.wait()  # nothing left


def test_the_standby_imports_start_no_jax_backend():
    # were a backend started before the experiment's policy is known, cpu_only() would no longer take
    script = ("import importlib, jax; from fedjax_core.envoy.start_worker import STANDBY_IMPORTS\n"
              "for m in STANDBY_IMPORTS: importlib.import_module(m)\n"
              "from jax._src import xla_bridge; print(len(xla_bridge._backends))")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0"]
