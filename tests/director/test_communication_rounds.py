"""Compressed and delta updates, compressed downloads, periodic and dynamic averaging, in-process.

Every aggregate is checked against numpy on the decoded values, computed here by hand.
"""
from __future__ import annotations

import numpy as np
import pytest

from fedjax_core import codecs
from fedjax_core import records as r
from fedjax_core.director.core import Director
from fedjax_core.errors import InvalidRequestError, PreconditionError
from fedjax_core.spec import from_flat
from fedjax_core.tensors import assemble, iter_chunks, spec_of
from fedjax_core.model_file import ModelFile
from test_core import round_model

RNG = np.random.default_rng(3)
INITIAL = {"params/w": RNG.standard_normal((4, 3)).astype(np.float32), "params/b": np.zeros(3, np.float32)}
INFO = r.ShardInfo("shard", ("32", "32", "3"), ("1",), 1000, 5)


@pytest.fixture
def director(tmp_path):
    d = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)
    for envoy in ("a", "b"):
        d.register_envoy(envoy, INFO)
    yield d
    d.close()


def submit(d: Director, **overrides) -> None:
    fields = dict(name="exp", rounds=3, opt_treatment="RESET", bundle_size=3,
                  model_spec=tuple(spec_of(n, a) for n, a in INITIAL.items()))
    h = from_flat({**fields, **overrides})
    d.submit_experiment(h, [b"abc"], iter_chunks(INITIAL))


def model(d: Director, round_: int) -> dict[str, np.ndarray]:
    return ModelFile(d.files.model("exp", round_)).arrays()


def trained(scale: float) -> dict[str, np.ndarray]:
    return {"params/w": INITIAL["params/w"] * scale, "params/b": np.full(3, scale - 1, np.float32)}


def encoded(weights: dict, codec: str | None, reference: dict | None):
    wire, encodings = {}, {}
    for name, array in weights.items():
        wire[name], encoding = codecs.encode(name, array, codec, reference[name] if reference else None)
        if encoding is not None:
            encodings[name] = encoding
    return wire, encodings


def upload(d: Director, envoy: str, round_: int, weights: dict, codec=None, reference=None, samples=10) -> int:
    wire, encodings = encoded(weights, codec, reference)
    return d.uploads.accept_update(envoy, "exp", round_, samples, iter_chunks(wire, encodings=encodings))


def comm(d: Director, round_: int) -> dict[str, dict[str, float]]:
    return {e.envoy: {m.name: m.value for m in e.metrics}
            for _, e, _ in d.store.events("exp", round_=round_) if e.stage == r.Stage.COMM}


def round_summary(d: Director, round_: int) -> dict[str, float]:
    return next({m.name: m.value for m in e.metrics}
                for _, e, _ in d.store.events("exp", round_=round_) if e.stage == r.Stage.ROUND)


def test_int8_deltas_are_decoded_against_the_round_model_then_averaged(director):
    submit(director, compression="int8", send_deltas=True)
    a, b = trained(1.1), trained(0.7)
    received = upload(director, "a", 0, a, "int8", INITIAL, samples=10)
    upload(director, "b", 0, b, "int8", INITIAL, samples=30)
    assert received == sum(x.size for x in INITIAL.values())  # one byte per element on the wire

    def decoded(weights):  # numpy by hand: global + (q - zero_point) * scale, per output channel
        out = {}
        for name, (q, enc) in {n: (w, encs[n]) for encs in [encoded(weights, "int8", INITIAL)[1]]
                               for n, w in encoded(weights, "int8", INITIAL)[0].items()}.items():
            out[name] = INITIAL[name].astype(np.float64) + (q.astype(np.float64) - np.array(enc.zero_point)) * np.array(
                enc.scale)
        return out

    want = {n: (decoded(a)[n] * 10 + decoded(b)[n] * 30) / 40 for n in INITIAL}
    got = model(director, 1)
    for name in INITIAL:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got[name], (a[name] * 10 + b[name] * 30) / 40, atol=0.01)  # and near the truth


def test_uncompressed_deltas_average_to_the_same_model_as_weights(director):
    submit(director, send_deltas=True)
    a, b = trained(1.1), trained(0.7)
    upload(director, "a", 0, a, None, INITIAL)
    upload(director, "b", 0, b, None, INITIAL)
    got = model(director, 1)
    for name in INITIAL:
        np.testing.assert_allclose(got[name], (a[name] + b[name]) / 2, rtol=1e-6)


@pytest.mark.parametrize("settings, codec, deltas, match", [
    (dict(send_deltas=True), None, False, "arrived as weights; this experiment sends deltas"),
    (dict(compression="int8"), "fp16", False, "arrived as fp16; this experiment's codec is int8"),
    (dict(compression="bf16"), "bf16", True, "arrived as a delta; this experiment sends weights"),
])
def test_an_upload_encoded_against_the_experiments_settings_is_refused(director, settings, codec, deltas, match):
    submit(director, **settings)
    with pytest.raises(InvalidRequestError, match=match):
        upload(director, "a", 0, trained(1.1), codec, INITIAL if deltas else None)
    assert not list((director.state_dir / "incoming").iterdir())  # nothing spooled is left
    upload(director, "a", 0, trained(1.1), settings.get("compression"), INITIAL if settings.get("send_deltas")
           else None)  # the envoy may still send a good one


def test_compressed_downloads_travel_as_int8_and_bytes_are_counted_per_envoy(director):
    submit(director, compression="int8", compress_downloads=True)
    specs = {}
    arrays = assemble(round_model(director, "a", "exp", 0), specs)
    assert {s.dtype for s in specs.values()} == {"int8"}
    for name, array in arrays.items():
        np.testing.assert_allclose(codecs.decode(array, specs[name].encoding), INITIAL[name],
                                   atol=max(specs[name].encoding.scale) / 2 + 1e-7)
    upload(director, "a", 0, trained(1.1), "int8")
    upload(director, "b", 0, trained(0.9), "int8")
    elements = sum(x.size for x in INITIAL.values())
    assert comm(director, 0) == {"a": {"bytes_uploaded": elements, "bytes_downloaded": elements, "model_messages": 2},
                                 "b": {"bytes_uploaded": elements, "bytes_downloaded": 0, "model_messages": 1}}
    summary = round_summary(director, 0)
    assert (summary["bytes_received"], summary["bytes_sent"], summary["model_messages"]) == (2 * elements, elements, 3)


def test_periodic_averaging_keeps_the_model_between_averagings(director):
    submit(director, sync="periodic", sync_every=2, rounds=4)
    task = director.workers.current_task("a", "exp")
    assert task.check_in and task.from_global
    with pytest.raises(PreconditionError, match="must check in first"):
        upload(director, "a", 0, trained(1.1))
    assert director.workers.check_in("a", "exp", 0, 0.5) is False
    assert director.workers.check_in("b", "exp", 0, 99.0) is False  # no threshold: periodic never averages early
    assert director.catalog.experiment_status("exp").current_round == 1
    assert model(director, 1)["params/w"].tobytes() == INITIAL["params/w"].tobytes()
    assert round_summary(director, 0)["averaged"] == 0
    task = director.workers.current_task("a", "exp")
    assert task.round == 1 and not task.check_in and not task.from_global  # round 1 averages what they kept
    upload(director, "a", 1, trained(1.2))
    upload(director, "b", 1, trained(0.8))
    np.testing.assert_allclose(model(director, 2)["params/w"], INITIAL["params/w"], rtol=1e-6)
    assert round_summary(director, 1)["averaged"] == 1
    assert director.workers.current_task("a", "exp").from_global  # round 2 starts from the new average


def test_dynamic_averaging_asks_an_envoy_that_checked_in_under_the_threshold_to_upload(director):
    submit(director, sync="dynamic", sync_threshold=1.0)
    assert director.workers.check_in("a", "exp", 0, 0.2) is False  # under: a keeps its model
    assert director.workers.current_task("a", "exp").kind == r.TaskKind.NONE
    assert director.workers.check_in("b", "exp", 0, 3.0) is True  # over: everyone uploads
    assert director.workers.current_task("a", "exp").kind == r.TaskKind.SYNC
    upload(director, "b", 0, trained(0.5))
    upload(director, "a", 0, trained(1.5))
    np.testing.assert_allclose(model(director, 1)["params/w"], INITIAL["params/w"], rtol=1e-6)
    assert round_summary(director, 0)["averaged"] == 1 and round_summary(director, 0)["check_ins"] == 2


def test_dynamic_averaging_under_the_threshold_moves_no_weights(director):
    submit(director, sync="dynamic", sync_threshold=1.0, compression="fp16")
    assert director.workers.check_in("a", "exp", 0, 0.2) is False
    assert director.workers.check_in("b", "exp", 0, 0.9) is False
    assert round_summary(director, 0)["averaged"] == 0
    assert all(c["model_messages"] == 0 and c["bytes_uploaded"] == 0 for c in comm(director, 0).values())
    assert director.workers.current_task("b", "exp").check_in is True  # round 1 checks again
    events = [e for _, e, _ in director.store.events("exp", round_=0) if e.stage == r.Stage.SYNC_CHECK]
    assert {e.envoy: e.metrics[0].value for e in events} == {"a": 0.2, "b": 0.9}


def test_a_triggered_dynamic_round_survives_a_director_restart(tmp_path, director):
    submit(director, sync="dynamic", sync_threshold=1.0)
    director.workers.check_in("a", "exp", 0, 0.2)
    director.workers.check_in("b", "exp", 0, 3.0)
    upload(director, "b", 0, trained(0.5))
    director.close()
    restarted = Director(tmp_path / "state", tmp_path / "logs", ["32", "32", "3"], ["1"], health_check_period=60)
    try:
        assert restarted.workers.current_task("a", "exp").kind == r.TaskKind.SYNC
        upload(restarted, "a", 0, trained(1.5))
        assert restarted.catalog.experiment_status("exp").current_round == 1
    finally:
        restarted.close()


@pytest.mark.parametrize("divergence", [float("nan"), float("inf"), -1.0])
def test_a_divergence_that_is_not_a_squared_distance_is_refused(director, divergence):
    submit(director, sync="dynamic", sync_threshold=1.0)
    with pytest.raises(InvalidRequestError, match="finite number >= 0"):
        director.workers.check_in("a", "exp", 0, divergence)


def test_check_in_is_refused_in_a_round_that_always_averages(director):
    submit(director)
    with pytest.raises(PreconditionError, match="averages: upload the update instead"):
        director.workers.check_in("a", "exp", 0, 0.1)


def test_a_server_optimizer_starts_its_state_even_when_round_0_does_not_average(director):
    from fedjax_core.strategies import FedAdam

    name, params = FedAdam(eta=0.1).to_wire()
    submit(director, sync="periodic", sync_every=2, rounds=2, aggregation=name, aggregation_params=params)
    director.workers.check_in("a", "exp", 0, 0.1)
    director.workers.check_in("b", "exp", 0, 0.1)
    upload(director, "a", 1, trained(1.5))
    upload(director, "b", 1, trained(1.5))
    assert director.catalog.experiment_status("exp").current_round == 2
    assert not np.allclose(model(director, 2)["params/w"], INITIAL["params/w"])


@pytest.mark.parametrize("settings, match", [
    (dict(compression="zip"), "compression='zip' is not a codec"),
    (dict(compress_downloads=True), "compress_downloads=True needs a codec"),
    (dict(sync="sometimes"), "sync 'sometimes' is not one of"),
    (dict(sync="periodic", sync_every=0), r"Periodic\(every=0\) must be between 1"),
    (dict(sync="dynamic", sync_threshold=float("nan")), "must be a finite number > 0"),
    (dict(sync="periodic", sync_every=1, envoys_per_round=1), "cannot be combined with envoys_per_round"),
])
def test_bad_communication_settings_are_refused_at_submission(director, settings, match):
    with pytest.raises(InvalidRequestError, match=match):
        submit(director, **settings)
