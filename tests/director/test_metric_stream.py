"""The notebook's metric stream (metric_stream.event_lists) through a real server: a burst of reports goes in
a few looks, the first of them at once."""
from __future__ import annotations

import threading

import grpc

from fedjax_core import records as r
from fedjax_core.director import metric_stream
from fedjax_core.director.server import create_server
from fedjax_proto import federation_service_pb2 as fed_pb
from fedjax_proto import federation_service_pb2_grpc as fed_grpc
from test_core import make_director, submit

STAGES = (r.Stage.AGGREGATED, r.Stage.TRAIN, r.Stage.LOCAL)


def test_a_burst_of_reports_reaches_a_following_stream_in_few_messages(tmp_path, monkeypatch):
    monkeypatch.setattr(metric_stream, "SETTLE_S", 3.0)  # far longer than the burst takes, on any machine
    d = make_director(tmp_path)
    submit(d)
    server, port = create_server(d, "127.0.0.1", 0, None)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    batches: list[list[str]] = []
    first_arrived = threading.Event()
    try:
        server.start()
        call = fed_grpc.FederationServiceStub(channel).StreamMetricBatches(
            fed_pb.StreamMetricsRequest(experiment_name="exp"), timeout=60)

        def follow() -> None:
            for batch in call:
                batches.append([e.stage for e in batch.events])
                first_arrived.set()
                if sum(map(len, batches)) == 2 * len(STAGES):
                    return

        reader = threading.Thread(target=follow)
        reader.start()
        d.workers.report_metrics("a", "exp", 0, STAGES[0], (r.Metric("t", "acc", 0.5),), 10)
        assert first_arrived.wait(30)  # the first event of the burst goes at once, not after the settling time
        for envoy, stage in [("a", s) for s in STAGES[1:]] + [("b", s) for s in STAGES]:
            d.workers.report_metrics(envoy, "exp", 0, stage, (r.Metric("t", "acc", 0.5),), 10)
        reader.join(30)
        assert not reader.is_alive()
        assert batches == [[STAGES[0]], [*STAGES[1:], *STAGES]]  # the rest of the burst in one look
        call.cancel()
    finally:
        channel.close()
        server.stop(0)
        d.close()
