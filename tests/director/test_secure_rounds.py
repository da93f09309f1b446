"""The director's side of a secure round: the step each participant is told, the phases moving on as everyone
still in the round takes theirs, and a round that can no longer be unmasked counting those left as done."""
from __future__ import annotations

import numpy as np
import pytest

from fedjax_core import records as r
from fedjax_core.aggregation import ArraySource
from fedjax_core.director.secure_rounds import SecureRound, secure_leaves
from fedjax_core.errors import PreconditionError
from fedjax_core.records import TensorSpec
from fedjax_core.runtime.secure_upload import update_vector
from fedjax_core.secagg.protocol import Client
from fedjax_core.model_file import ModelFile
from fedjax_core.spec import SecureAggregation

LEAVES = [TensorSpec("params/w", "float32", (3, 2)), TensorSpec("params/b", "float32", (2,))]
NAMES = ["a", "b", "c", "d", "e"]


def new_round(weight_scale=0.01) -> SecureRound:
    return SecureRound("exp", 0, NAMES, SecureAggregation(threshold=0.5, clip_range=1.0, bits=32),
                       secure_leaves(LEAVES + [TensorSpec("params/step", "int32", ())]), weight_scale, 7)


def test_a_round_walks_its_phases_and_unmasks_the_weighted_mean_change():
    sr = new_round()
    assert sr.size == 9 and [s.name for s in sr.leaves] == ["params/b", "params/w"]
    setup = sr.setup_step()
    clients = {n: Client(n, sr.setup) for n in NAMES}
    rng = np.random.default_rng(0)
    glob = {"params/w": rng.normal(size=(3, 2)).astype(np.float32), "params/b": np.zeros(2, np.float32)}
    sizes = {"a": 100, "b": 50, "c": 100, "d": 25, "e": 100}
    trained = {n: {k: v + rng.normal(size=v.shape).astype(np.float32) * 0.1 for k, v in glob.items()} for n in NAMES}
    for n in NAMES:
        assert sr.task_step(n) is None and not sr.trained(n)  # trains first
        sr.add(n, "keys", r.SecAggKeys(*clients[n].advertise()))
    assert sr.advance(frozenset(NAMES)) == (True, []) and sr.task_step("a").phase == "share"
    for n in NAMES:
        keys = {m: (k.cipher_pk, k.mask_pk) for m, k in sr.task_step(n).keys.items()}
        sr.add(n, "shares", items=clients[n].share(keys))
    sr.advance(frozenset(NAMES))
    alive = frozenset(NAMES) - {"d"}  # d drops after sharing
    for n in sorted(alive):
        weight = min(1.0, sizes[n] * setup.weight_scale)
        vector = update_vector(trained[n], glob, ["params/b", "params/w"], weight, setup.clip_range)
        sr.add_masked(n, clients[n].mask(vector, sr.task_step(n).ciphertexts))
    with pytest.raises(PreconditionError, match="out of turn"):
        sr.add("a", "keys", r.SecAggKeys(b"x" * 32, b"y" * 32))
    assert sr.advance(alive) == (True, [])
    step = sr.task_step("a")
    assert step.phase == "unmask" and "d" in step.dropped
    for n in sorted(alive):
        s = sr.task_step(n)
        sr.add(n, "reveal", items=clients[n].reveal(s.survivors, s.dropped))
    upload, summed = sr.aggregate(ArraySource(glob))
    assert summed == 4
    w = {n: sizes[n] / 100 for n in alive}
    for name in glob:
        want = glob[name] + sum(w[n] * (trained[n][name].astype(np.float64) - glob[name]) for n in alive) / sum(w.values())
        got = upload.tensors.read_into(name, 0, np.empty(glob[name].size, np.float32)).reshape(glob[name].shape)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_round_that_can_no_longer_be_unmasked_says_why_and_lets_the_others_finish():
    sr = new_round()
    clients = share_keys(sr, NAMES)
    alive = frozenset({"a", "b"})  # three dropped after sharing: each survivor keeps one neighbour, needs three
    for n in sorted(alive):
        sr.add_masked(n, clients[n].mask(np.zeros(sr.size), sr.task_step(n).ciphertexts))
    moved, finish = sr.advance(alive)
    assert moved and finish == ["a", "b"]
    assert "kept fewer than the 3 neighbours needed to rebuild masks" in sr.failed
    assert sr.task_step("a") is None


def share_keys(sr: SecureRound, names) -> dict[str, Client]:
    """Every participant named through the keys and shares steps; their protocol clients."""
    clients = {n: Client(n, sr.setup) for n in names}
    for n in names:
        sr.add(n, "keys", r.SecAggKeys(*clients[n].advertise()))
    sr.advance(frozenset(names))
    for n in names:
        keys = {m: (k.cipher_pk, k.mask_pk) for m, k in sr.task_step(n).keys.items()}
        sr.add(n, "shares", items=clients[n].share(keys))
    sr.advance(frozenset(names))
    return clients


def play_round(sr: SecureRound, vectors: dict[str, np.ndarray]) -> None:
    """Every participant of ``sr`` through every step, with the given vectors."""
    clients = share_keys(sr, list(vectors))
    for n, v in vectors.items():
        sr.add_masked(n, clients[n].mask(v, sr.task_step(n).ciphertexts))
    sr.advance(frozenset(vectors))
    for n in vectors:
        s = sr.task_step(n)
        sr.add(n, "reveal", items=clients[n].reveal(s.survivors, s.dropped))


def test_a_server_optimizer_steps_on_the_unmasked_mean_as_on_the_plain_one():
    from fedjax_core.aggregation import RoundUpdates, Upload
    from fedjax_core.director import closer
    from fedjax_core.director.round_models import MemoryRoundModels
    from fedjax_core.strategies import FedAdam

    rng = np.random.default_rng(5)
    glob = {"params/w": rng.normal(size=(3, 2)).astype(np.float32), "params/b": rng.normal(size=2).astype(np.float32)}
    trained = {n: {k: v + rng.normal(size=v.shape).astype(np.float32) * 0.05 for k, v in glob.items()} for n in NAMES}

    def next_model(uploads):
        models = MemoryRoundModels()
        with models.model_writer("e", 0) as writer:
            for k, v in glob.items():
                writer.add_array(k, v)
            writer.commit()
        updates = RoundUpdates(LEAVES)
        for upload in uploads:
            updates.add(upload)
        closer.write_next_model(models, "e", 0, FedAdam(eta=0.1), updates)
        out = models.model("e", 1)
        return {k: out.read_into(k, 0, np.empty(v.size, np.float32)) for k, v in glob.items()}

    plain = next_model([Upload(n, 100.0, ArraySource(trained[n])) for n in NAMES])
    sr = new_round()
    play_round(sr, {n: update_vector(trained[n], glob, list(glob), 1.0, 1.0) for n in NAMES})
    secure = next_model([sr.aggregate(ArraySource(glob))[0]])
    for k in glob:
        np.testing.assert_allclose(secure[k], plain[k], atol=1e-5)


def test_central_dp_noise_on_a_secure_sum_is_z_c_over_the_envoys_summed():
    from fedjax_core.aggregation import RoundUpdates, Upload
    from fedjax_core.director import closer
    from fedjax_core.director.round_models import MemoryRoundModels
    from fedjax_core.spec import ClipOn, Privacy, PrivacyMode
    from fedjax_core.strategies import FedAvg

    glob = {"params/w": np.zeros((400, 250), np.float32)}
    models = MemoryRoundModels()
    with models.model_writer("e", 0) as writer:
        writer.add_array("params/w", glob["params/w"])
        writer.commit()
    updates = RoundUpdates([TensorSpec("params/w", "float32", (400, 250))])
    updates.add(Upload("the secure sum of 5 envoys", 5.0, ArraySource(glob)))
    privacy = Privacy(mode=PrivacyMode.CENTRAL, clipping_norm=2.0, noise_multiplier=1.5, delta=1e-5,
                      clip_on=ClipOn.ENVOY)
    metrics = closer.write_next_model(models, "e", 0, FedAvg(), updates, privacy, per_round=5, summed=5)
    noise = models.model("e", 1).read_into("params/w", 0, np.empty(100_000, np.float32))
    assert metrics["noise_std"] == pytest.approx(1.5 * 2.0 / 5)
    assert np.std(noise) == pytest.approx(1.5 * 2.0 / 5, rel=0.02)


def test_an_envoy_does_not_mask_an_update_with_nan():
    with pytest.raises(RuntimeError, match="NaN or infinite values: this envoy does not send it"):
        update_vector({"params/w": np.array([np.nan, 1.0], np.float32)}, {"params/w": np.zeros(2, np.float32)},
                      ["params/w"], 1.0, 1.0)


def test_the_director_drops_at_the_deadline_only_those_behind_and_sums_the_others(tmp_path):
    """In-process director, four envoys, min_envoys=3: at the deadline "d" has not even sent its keys; it is dropped
    and the other three go through every step to a model that is the mean of their changes."""
    import dataclasses

    from fedjax_core.director.round_machine import DeadlinePassed
    from fedjax_core.tensors import iter_chunks
    from test_core import INFO, header, make_director, submit

    d = make_director(tmp_path)
    for envoy in ("c", "d"):
        d.register_envoy(envoy, INFO)
    spec = dataclasses.replace(header(round_timeout_s=60, min_envoys=3, rounds=1), opt_treatment=r.OptTreatment.RESET,
                               secure=SecureAggregation(True, 0.5, 1.0, 32))
    submit(d, spec)
    glob = {"params/w": np.arange(6, dtype=np.float32).reshape(2, 3), "params/b": np.zeros(3, np.float32)}
    trained = {e: {k: v + np.float32(0.01 * (i + 1)) for k, v in glob.items()} for i, e in enumerate("abc")}
    clients = {}
    for e in "abc":
        task = d.workers.current_task(e, "exp")
        assert task.kind == r.TaskKind.TRAIN and task.secagg.phase == "setup"
        s = task.secagg
        setup = protocol_setup(s)
        clients[e] = (Client(e, setup), update_vector(trained[e], glob, list(glob), 1.0, s.clip_range))
        d.workers.secure_step(e, "exp", 0, "keys", r.SecAggKeys(*clients[e][0].advertise()))
    assert d.workers.current_task("a", "exp").kind == r.TaskKind.NONE  # waits for "d"
    run = d.run("exp")
    with d.lock:
        effects = d.act(run, DeadlinePassed())
    d.after(run, effects)
    dropouts = [e for _, e, _ in d.store.events("exp") if e.stage == r.Stage.DROPOUT]
    assert [e.envoy for e in dropouts] == ["d"] and "secure aggregation keys by the round's deadline" in dropouts[0].note
    from fedjax_core.director.deadlines import next_due

    when, _, _ = next_due([run], lambda envoy: float("inf"))
    assert when == run.secure.deadline_rearmed_at + 60 > run.started_at + 60  # the next steps get a deadline anew
    for e in "abc":
        step = d.workers.current_task(e, "exp").secagg
        assert step.phase == "share" and set(step.keys) == set("abc") - {e}
        keys = {m: (k.cipher_pk, k.mask_pk) for m, k in step.keys.items()}
        d.workers.secure_step(e, "exp", 0, "shares", items=clients[e][0].share(keys))
    for e in "abc":
        step = d.workers.current_task(e, "exp").secagg
        masked = clients[e][0].mask(clients[e][1], step.ciphertexts)
        d.uploads.accept_update(e, "exp", 0, 1, iter_chunks({"secagg/masked": masked}))
    for e in "abc":
        step = d.workers.current_task(e, "exp").secagg
        d.workers.secure_step(e, "exp", 0, "reveal", items=clients[e][0].reveal(step.survivors, step.dropped))
    status = d.catalog.experiment_status("exp")
    assert status.current_round == 1, status
    model = ModelFile(tmp_path / "state" / "experiments" / "exp" / "model_round_0001.fjm").arrays()
    for k in glob:
        np.testing.assert_allclose(model[k], glob[k] + 0.02, atol=1e-6)  # the mean of +0.01, +0.02, +0.03
    np.testing.assert_array_equal(model["step"], 0)  # not uploaded under RESET: the round's model's
    d.close()


def protocol_setup(s: r.SecAggStep):
    from fedjax_core.secagg import protocol

    return protocol.setup("exp/0", s.participants, s.threshold, s.bits, s.clip_range, s.size, s.seed)
