"""Experiments side by side on one director: real director and envoy processes on loopback.

Experiments whose envoys do not overlap run at the same time; an envoy runs up to its
params.max_experiments workers at once, and an experiment that needs a busy envoy waits in the
queue; a director killed with two experiments mid-round resumes both.
"""
from __future__ import annotations

import contextlib
import os
import signal

import jax
import numpy as np
import pytest

from fedjax_core import FLExperiment, ModelInterface
from fedjax_core import records as r
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import Stack, wait_until

LIMIT = 64  # samples per split per envoy: these tests are about scheduling, not learning
WAIT_S = 300
RESUMED = 14  # rounds of the two experiments the director is killed under


def start(fed, name: str, envoys: tuple[str, ...], rounds: int = 2) -> FLExperiment:
    exp = FLExperiment(federation=fed, experiment_name=name)
    exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
              data_loader=SubsetDataset(limit=LIMIT), rounds_to_train=rounds, opt_treatment="CONTINUE_GLOBAL",
              device_assignment_policy="CPU_ONLY", envoys=envoys)
    return exp


def finish(*experiments: FLExperiment) -> None:
    for exp in experiments:
        status = exp.wait(timeout_s=WAIT_S)
        assert status.state == "finished", (exp.experiment_name, status.error)


def event_times(fed, name: str) -> list[float]:
    """When each of the experiment's events happened (the director's clock): its first report to its end."""
    return [e.timestamp for e in fed.client.events(name) if e.stage]


def overlap(fed, first: str, second: str) -> bool:
    a, b = event_times(fed, first), event_times(fed, second)
    return min(a) < max(b) and min(b) < max(a)


def params(exp: FLExperiment) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(exp.get_last_model().params)]


@contextlib.contextmanager
def federation(stack: Stack):
    """The stack started, and a notebook connected to it; every process stopped after, its logs shown on failure."""
    try:
        stack.start()
        fed = stack.federation()
        yield fed
        fed.close()
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


@pytest.mark.slow  # about a minute; make test keeps the scheduler's side-by-side rules (tests/director) and restarts
def test_disjoint_and_shared_envoys_run_side_by_side_and_a_restart_resumes_them(tmp_path):
    stack = Stack(tmp_path, n_envoys=4, envoy_params={"max_experiments": 2})
    with federation(stack) as fed:
        alone = start(fed, "alone", ("env1", "env2"))
        finish(alone)

        # the same experiment again beside one on the other envoys, and one sharing its envoys (max_experiments 2)
        twin, other, shared = (start(fed, "twin", ("env1", "env2")), start(fed, "other", ("env3", "env4")),
                               start(fed, "shared", ("env1", "env2")))
        finish(twin, other, shared)
        assert overlap(fed, "twin", "other") and overlap(fed, "twin", "shared")
        for a, b in zip(params(alone), params(twin), strict=True):
            np.testing.assert_array_equal(a, b)  # its neighbours changed nothing in it
        assert not all(np.array_equal(a, b) for a, b in zip(params(twin), params(other)))  # other shards, other model

        # a director killed while two experiments are mid-experiment resumes both (enough rounds that the first
        # cannot finish while the second, submitted after it, compiles its first: about 2 s a round here)
        first, second = start(fed, "first", ("env1", "env2"), RESUMED), start(fed, "second", ("env3", "env4"), RESUMED)
        wait_until(lambda: all(e.get_experiment_status().current_round >= 1 for e in (first, second)), WAIT_S,
                   "both experiments to close a round")
        os.killpg(stack.director.proc.pid, signal.SIGKILL)
        stack.director.proc.wait()
        stack.start_director()
        assert [e.get_experiment_status().state for e in (first, second)] == ["running", "running"]
        finish(first, second)
        for exp in (first, second):
            per_round = {e.round for e in fed.client.events(exp.experiment_name) if e.stage == r.Stage.ROUND}
            assert per_round == set(range(RESUMED)), (exp.experiment_name, per_round)  # each training round closed


def test_with_max_experiments_1_the_second_waits_for_the_first_then_finishes(tmp_path):
    stack = Stack(tmp_path, n_envoys=2)
    with federation(stack) as fed:
        busy, waiting = start(fed, "busy", ("env1", "env2"), rounds=3), start(fed, "waiting", ("env1", "env2"))
        wait_until(lambda: busy.get_experiment_status().state != "queued", WAIT_S, "the first to start")
        assert waiting.get_experiment_status().state == "queued"
        finish(busy, waiting)
        assert max(event_times(fed, "busy")) < min(event_times(fed, "waiting"))
        assert "waits for its envoys (busy with as many experiments as they run at once" in stack.director.output()
