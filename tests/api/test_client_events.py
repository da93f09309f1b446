"""The notebook's metric stream: many events to a message from a director that has StreamMetricBatches, one
an event from one that has only StreamMetrics, the same events either way (fake directors on loopback)."""
from __future__ import annotations

import grpc
import pytest

from fedjax_core import records as r
from fedjax_core import serde
from fedjax_core.api.client import DirectorUnreachable, FederationClient
from fedjax_proto import federation_service_pb2 as fed_pb
from fedjax_proto import federation_service_pb2_grpc as fed_grpc
from processes import fake_servers

EVENTS = [r.MetricEvent(round=0, envoy=f"env{i}", stage=r.Stage.TRAIN, metrics=(r.Metric("train", "loss", i / 4),),
                        timestamp=100.0 + i) for i in range(5)]
DONE = r.MetricEvent(round=1, envoy="", stage="", experiment_done=True, state=r.State.FINISHED, timestamp=200.0)


class OldDirector(fed_grpc.FederationServiceServicer):
    """A director from before StreamMetricBatches (the generated base answers UNIMPLEMENTED)."""

    def __init__(self):
        self.calls = []

    def StreamMetrics(self, request, context):
        self.calls.append(("StreamMetrics", request.snapshot))
        for event in EVENTS + [DONE]:
            yield serde.metric_event_to_proto(event)


class NewDirector(OldDirector):
    def __init__(self, fail_after: int | None = None):
        super().__init__()
        self.fail_after = fail_after

    def StreamMetricBatches(self, request, context):
        self.calls.append(("StreamMetricBatches", request.snapshot))
        yield fed_pb.MetricEventBatch(events=[serde.metric_event_to_proto(e) for e in EVENTS[:3]])
        if self.fail_after is not None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "gone mid-stream")
        yield fed_pb.MetricEventBatch(events=[serde.metric_event_to_proto(e) for e in EVENTS[3:] + [DONE]])


@pytest.fixture
def serve():
    with fake_servers(fed_grpc.add_FederationServiceServicer_to_server,
                      lambda port: FederationClient("127.0.0.1", port, None)) as start:
        yield start


@pytest.mark.parametrize("follow", [True, False])
def test_batches_and_single_events_give_the_same_stream(serve, follow):
    new, old = NewDirector(), OldDirector()
    batched = list(serve(new).events("exp", follow=follow))
    single = list(serve(old).events("exp", follow=follow))
    assert batched == single == EVENTS + [DONE]
    assert new.calls == [("StreamMetricBatches", not follow)]  # no second call when the first one works
    assert old.calls == [("StreamMetrics", not follow)]  # asked once for batches (refused), then this


def test_calls_are_handed_out_for_cancelling(serve):
    calls = []
    assert list(serve(OldDirector()).events("exp", calls=calls)) == EVENTS + [DONE]
    assert len(calls) == 2  # the refused batch stream, then the single-event one: cancel() reaches the live one


def test_a_failure_after_events_arrived_is_not_taken_for_an_old_director(serve):
    director = NewDirector(fail_after=3)
    seen = []
    with pytest.raises(DirectorUnreachable, match="gone mid-stream"):
        for event in serve(director).events("exp"):
            seen.append(event)
    assert seen == EVENTS[:3]  # nothing repeated from a second stream
    assert [name for name, _ in director.calls] == ["StreamMetricBatches"]
