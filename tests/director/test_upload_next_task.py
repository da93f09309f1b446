"""UploadUpdate answers with the worker's next task when its header asks (one round trip fewer per round), through
a real server: the answer waits for the round to close, carries the next round's model, and an upload whose
next task cannot be waited for still succeeds."""
from __future__ import annotations

import threading

import numpy as np

from fedjax_core import records as r
from fedjax_core.director.server import create_server
from fedjax_core.envoy.client import EnvoyClient
from test_core import INITIAL, make_director, submit, update


def test_an_upload_answers_with_the_next_task_once_the_round_closes(tmp_path, monkeypatch):
    d = make_director(tmp_path)
    submit(d)
    server, port = create_server(d, "127.0.0.1", 0, None)
    clients = {name: EnvoyClient(name, f"127.0.0.1:{port}", None, retry_s=0) for name in ("a", "b")}
    try:
        server.start()
        tasks = {name: c.wait_task("exp") for name, c in clients.items()}
        assert {t.round for t in tasks.values()} == {0}
        a_done = threading.Event()
        a_upload = threading.Thread(target=lambda: (clients["a"].upload("exp", 0, 10, update(1.0)), a_done.set()))
        a_upload.start()
        assert not a_done.wait(1.0)  # stored, but round 1 is not there yet: the answer waits for it
        assert d.run("exp").state.owes("b") and not d.run("exp").state.owes("a")
        clients["b"].upload("exp", 0, 30, update(5.0))  # the round closes: both answers carry round 1's task
        a_upload.join(30)
        assert a_done.is_set()
        for name, c in clients.items():
            monkeypatch.setattr(c, "_stub", None)  # no WaitTask call: the upload brought the task
            task = c.wait_task("exp")
            assert (task.kind, task.round) == (r.TaskKind.TRAIN, 1)
            model = c.round_model("exp", 1)
            np.testing.assert_allclose(model["params/w"], INITIAL["params/w"] * (10 * 1 + 30 * 5) / 40, rtol=1e-6)
    finally:
        for c in clients.values():
            c.close()
        server.stop(0)
        d.close()


def test_an_upload_that_cannot_wait_for_its_next_task_still_succeeds(tmp_path):
    d = make_director(tmp_path)
    submit(d)
    server, port = create_server(d, "127.0.0.1", 0, None, max_waiting_calls=1)
    a = EnvoyClient("a", f"127.0.0.1:{port}", None, retry_s=0)
    try:
        server.start()
        a.wait_task("exp")
        server.flow._waiting["envoys"] = 1  # every waiting slot taken (by other envoys' long-polls)
        try:
            assert a.upload("exp", 0, 10, update(1.0)) > 0  # stored, answered at once with no task
        finally:
            server.flow._waiting["envoys"] = 0
        assert a._next["exp"].kind == 0 and not d.run("exp").state.owes("a")
        assert a.wait_task("exp", max_wait_s=0.1).kind == r.TaskKind.NONE  # asked with WaitTask: nothing yet
    finally:
        a.close()
        server.stop(0)
        d.close()


def test_a_round_model_inline_is_made_into_messages_once_for_all_its_participants(tmp_path):
    import types

    from fedjax_core import serde
    from fedjax_core.director.servicer import EnvoyServicer
    from fedjax_core.tensors import iter_chunks

    d = make_director(tmp_path)
    servicer = EnvoyServicer(d, types.SimpleNamespace(batches=lambda handle, name: None))
    round_one, round_two = list(iter_chunks(update(1.0))), list(iter_chunks(update(2.0)))
    first = servicer._model_protos(round_one)
    assert servicer._model_protos(round_one) is first  # every participant of the round: the same messages
    second = servicer._model_protos(round_two)
    assert [c for m in first for c in serde.unpacked_chunks(m)] == round_one
    assert [c for m in second for c in serde.unpacked_chunks(m)] == round_two
    for _ in range(20):  # a bounded number of rounds is kept
        servicer._model_protos(list(iter_chunks(update(3.0))))
    assert len(servicer._inline_protos) <= 8
    d.close()


def test_a_small_update_call_over_its_bound_is_refused_with_the_way_to_send_it(tmp_path):
    import grpc

    from fedjax_core import serde
    from fedjax_core.tensors import iter_chunks
    from fedjax_core.transport import SMALL_UPDATE_BYTES, open_channel
    from fedjax_proto import envoy_service_pb2 as env_pb

    d = make_director(tmp_path)
    submit(d)
    server, port = create_server(d, "127.0.0.1", 0, None)
    channel = open_channel(f"127.0.0.1:{port}", None)
    try:
        server.start()
        call = channel.unary_unary("/fedjax.EnvoyService/UploadSmallUpdate",
                                   request_serializer=env_pb.SmallUpdateRequest.SerializeToString,
                                   response_deserializer=env_pb.UploadUpdateResponse.FromString)
        header = env_pb.UploadUpdateRequest.Header(envoy_name="a", experiment_name="exp", round=0, train_sample_count=10)
        big = {"params/w": np.zeros(SMALL_UPDATE_BYTES // 4 + 1, np.float32)}
        request = env_pb.SmallUpdateRequest(header=header, chunks=list(serde.chunk_protos(iter_chunks(big))))
        try:
            call(request, timeout=30)
            raise AssertionError("an oversized small update was taken")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "UploadUpdate's stream" in exc.details()
        assert d.run("exp").state.owes("a")  # nothing of it was kept
        small = env_pb.SmallUpdateRequest(header=header, chunks=list(serde.chunk_protos(iter_chunks(update(1.0)))))
        assert call(small, timeout=30).bytes_received == sum(a.nbytes for a in update(1.0).values())
        assert not d.run("exp").state.owes("a")
    finally:
        channel.close()
        server.stop(0)
        d.close()
