"""Secure aggregation (SecAgg+) with real processes: a director and five envoys on loopback. The unmasked sum
matches plain FedAvg within the quantisation error; nothing the director writes or holds contains a
participant's update; an envoy killed after the key sharing is recovered; too many killed fail the round cleanly
and the experiment goes on, as min_envoys allows."""
from __future__ import annotations

import os
import re
import signal
import threading

import numpy as np
import pytest

from fedjax_core import FLExperiment, ModelInterface, TaskInterface
from fedjax_core import records as r
from fedjax_core.privacy import SecureAggregation
from fl_experiment import SubsetDataset, create_train_state, evaluate, train_epoch
from processes import Stack, alive, set_settings

LIMIT = 128
N = 5
SLOW = 2  # env4 trains this many seconds longer: the others have sent their keys well before the sharing starts
HOLD = "env5"  # stopped after sending its keys until the victims are killed: the round waits in the sharing phase


def tasks(out_dir: str) -> TaskInterface:
    TI = TaskInterface()

    @TI.register_fl_task(model="state", data_loader="dataset", optimizer="optimizer", device="device",
                         round_num="round_num")
    def train(state, dataset, optimizer, device, round_num=0):
        import time

        time.sleep(float(os.environ.get("FEDJAX_TEST_TRAIN_DELAY_S", "0")))
        import jax

        name = os.environ["FEDJAX_TEST_NAME"]
        received = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]
        np.savez(f"{out_dir}/{name}-{round_num}-received-{os.getpid()}.npz", *received)  # the round's model
        new_state, acc = train_epoch(state, dataset, 64)
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(new_state.params)]
        np.savez(f"{out_dir}/{name}-{round_num}-trained-{os.getpid()}.npz", *leaves)
        print(f"SECAGG-TEST trained round={round_num} pid={os.getpid()}", flush=True)
        return new_state, {"train_acc": acc}

    @TI.register_fl_task(model="state", data_loader="dataset", device="device")
    def validate(state, dataset, device):
        return {"validation_accuracy": evaluate(state, dataset)}

    return TI


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("secagg")
    out = workdir / "trained"
    out.mkdir()
    s = Stack(workdir, n_envoys=N)
    for config in s.envoy_configs:
        set_settings(config, sandbox={"write_paths": [str(out)]})
    try:
        s.start_director()
        envoys = [s.start_envoy(i, {"FEDJAX_TEST_NAME": f"env{i + 1}",
                                    "FEDJAX_TEST_TRAIN_DELAY_S": str(SLOW if i == 3 else 0)}) for i in range(N)]
        for e in envoys:
            e.wait_for(r"ENVOY READY")
        s.out = out
        yield s
    finally:
        s.stop()
        print(s.logs())


class Killer:
    """In each round of ``victims`` (round -> envoys), kills each victim's worker once it has sent its encrypted
    shares. So that the round cannot move on to masking before the kill, HOLD's worker is stopped (SIGSTOP) once
    it has sent its keys, and continued once every victim of the round is dead: the sharing phase waits for it."""

    def __init__(self, stack: Stack, victims: dict[int, set[str]]):
        self.stack, self.rounds, self.killed = stack, {k: set(v) for k, v in victims.items()}, []
        self._held: int | None = None
        self._seen = {p.name: len(p.lines) for p in stack.processes}  # what earlier experiments printed is not ours
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        seen = self._seen
        pids: dict[str, int] = {}
        while not self._stop.is_set() and (any(self.rounds.values()) or self._held is not None):
            for p in self.stack.processes:
                lines = p.lines[seen.get(p.name, 0):]
                seen[p.name] = seen.get(p.name, 0) + len(lines)
                for line in lines:
                    if m := re.search(r"SECAGG-TEST trained round=\d+ pid=(\d+)", line):
                        pids[p.name] = int(m.group(1))
                    m = re.search(r"round (\d+): secure aggregation (keys|shares) sent", line)
                    victims = self.rounds.get(int(m.group(1)), set()) if m else set()
                    if m and m.group(2) == "keys" and p.name == HOLD and victims:
                        self._held = pids[p.name]
                        os.kill(self._held, signal.SIGSTOP)
                    if m and m.group(2) == "shares" and p.name in victims:
                        os.kill(pids[p.name], signal.SIGKILL)
                        victims.discard(p.name)
                        self.killed.append((int(m.group(1)), p.name))
                        if not victims and self._held is not None:
                            os.kill(self._held, signal.SIGCONT)
                            self._held = None
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._held is not None and alive(self._held):
            os.kill(self._held, signal.SIGCONT)


def run(stack: Stack, name: str, victims: dict[int, set[str]], **kwargs):
    killer = Killer(stack, victims)
    try:
        exp = FLExperiment(federation=stack.federation(), experiment_name=name)
        exp.start(model_provider=ModelInterface(model=create_train_state(), optimizer=None),
                  task_keeper=tasks(str(stack.out)), data_loader=SubsetDataset(limit=LIMIT), opt_treatment="RESET",
                  device_assignment_policy="CPU_ONLY", **kwargs)
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
    finally:
        killer.stop()
    return exp, killer.killed


def saved(stack: Stack, envoy: str, round_: int, what: str = "trained") -> list[np.ndarray]:
    """What ``envoy``'s task saved in ``round_``: the model it ``received`` or the one it ``trained``."""
    [path] = sorted(stack.out.glob(f"{envoy}-{round_}-{what}-*.npz"))[-1:]
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def flat(leaves) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def last_model(exp) -> np.ndarray:
    import jax

    return flat(jax.tree_util.tree_leaves(exp.get_last_model().params))


def memory_of(pid: int) -> bytes:
    """Every readable mapping of a process (its heap, its gRPC buffers), as one string of bytes."""
    out = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if "r" not in perms:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                out.append(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                continue
    return b"".join(out)


def test_secure_rounds_sum_the_survivors_recover_a_dropout_fail_cleanly_and_never_show_the_director_an_update(
        stack):
    """Round 0: env2 is killed after sharing; the other four are summed. Round 1: env1 and env3 are killed after
    sharing, leaving each survivor too few neighbours: the round fails, the model stays, and min_envoys=3 lets the
    experiment go on to its final validation."""
    import jax

    initial = flat(jax.tree_util.tree_leaves(create_train_state().params))
    settings = SecureAggregation(threshold=0.5, clip_range=0.5, bits=32)
    exp, killed = run(stack, "secure", {0: {"env2"}, 1: {"env1", "env3"}}, rounds_to_train=2, min_envoys=3,
                      secure_aggregation=settings)
    status = exp.get_experiment_status()
    assert status.state == "finished", stack.logs()
    assert sorted(killed) == [(0, "env2"), (1, "env1"), (1, "env3")]
    dropouts = [e for e in exp.history if e.stage == r.Stage.DROPOUT]
    assert sorted((e.round, e.envoy) for e in dropouts) == [(0, "env2"), (1, "env1"), (1, "env3")]
    step = 2 * 0.5 / ((2 ** 32 - 1) // N)  # the quantisation step; the sum of n envoys errs by less than n steps
    names = [f"env{i}" for i in range(1, N + 1)]

    np.testing.assert_allclose(flat(saved(stack, "env4", 0, "received")), initial)
    changes = [flat(saved(stack, e, 0)) - initial for e in ["env1", "env3", "env4", "env5"]]
    assert max(np.abs(c).max() for c in changes) < 0.5  # within clip_range: only quantisation moves the sum
    model_1 = flat(saved(stack, "env4", 1, "received"))
    np.testing.assert_allclose(model_1, initial + np.mean(changes, axis=0), rtol=0, atol=4 * step + 1e-7)
    np.testing.assert_array_equal(last_model(exp), model_1)  # round 1 failed: the model stayed
    summary = {e.round: e for e in exp.history if e.stage == r.Stage.ROUND}
    averaged = {k: dict((m.name, m.value) for m in e.metrics)["averaged"] for k, e in summary.items()}
    assert averaged == {0: 1, 1: 0}
    assert "the secure aggregation of round 1 failed" in summary[1].note
    assert "kept fewer than the 3 neighbours needed to rebuild masks" in summary[1].note
    assert "the model stays as it was and the experiment goes on" in summary[1].note
    final = [e for e in exp.history if e.stage == r.Stage.AGGREGATED and e.envoy and e.round == 2]
    assert len(final) == N  # every envoy validated the final model

    # no participant's update, as trained weights (float32, what a plain upload carries) or as the change the
    # envoy masks (float64), is in any file under the director's state dir or anywhere in the director's memory
    start = jax.tree_util.tree_leaves(create_train_state().params)
    big = max(range(len(start)), key=lambda i: start[i].size)
    needles = []
    for round_, envoy in [(0, e) for e in names] + [(1, e) for e in names]:
        received, kernel = saved(stack, envoy, round_, "received")[big].ravel(), saved(stack, envoy, round_)[big].ravel()
        needles.append(kernel[1000:1008].astype(np.float32).tobytes())
        needles.append((kernel[1000:1004].astype(np.float64) - received[1000:1004].astype(np.float64)).tobytes())
    files = [p for p in (stack.workdir / "director_state").rglob("*") if p.is_file()]
    disk = b"".join(p.read_bytes() for p in files)
    memory = memory_of(stack.director.proc.pid)
    assert len(memory) > 10 << 20
    for needle in needles:
        assert needle not in disk and needle not in memory
    model_bytes = np.asarray(jax.tree_util.tree_leaves(exp.get_last_model().params)[big]).ravel()[1000:1008].tobytes()
    assert model_bytes in disk  # the search finds what the director does keep: the aggregated model
