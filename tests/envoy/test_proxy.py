"""The daemon's worker proxy lets the current worker through, and nobody else: not a process an earlier
experiment left behind (its token is old), not another experiment's name; its refusals name no experiment."""
from __future__ import annotations

import grpc
import pytest

from fedjax_core.envoy.client import EnvoyClient
from fedjax_core.envoy.proxy import WorkerProxy
from fedjax_core.errors import FedError


@pytest.fixture
def proxy(tmp_path):
    upstream = grpc.insecure_channel("127.0.0.1:9")  # nothing listens: a call that gets through is UNAVAILABLE
    p = WorkerProxy("env1", upstream, tmp_path / "proxy").start()
    p.token = p.admit("secret-experiment")
    yield p
    p.stop()
    upstream.close()


def call(proxy: WorkerProxy, token: str | None, experiment: str = "secret-experiment") -> grpc.RpcError:
    client = EnvoyClient("env1", proxy.target, None, retry_s=0, token=token)
    try:
        with pytest.raises((grpc.RpcError, FedError)) as caught:
            client.report_failure(experiment, "x")
        return caught.value
    finally:
        client.close()


@pytest.mark.parametrize("token", [None, "an-old-token"])
def test_a_caller_without_the_current_token_is_refused_and_learns_no_name(proxy, token):
    refused = call(proxy, token)
    text = str(refused)
    assert "current workers only" in text and "secret-experiment" not in text


def test_the_current_worker_gets_through_for_its_experiment_only(proxy):
    assert "current workers only" not in str(call(proxy, proxy.token))  # forwarded (and nothing upstream)
    assert "for its worker's experiment only" in str(call(proxy, proxy.token, experiment="other"))
    proxy.revoke(proxy.token)  # the worker exited
    assert "current workers only" in str(call(proxy, proxy.token))


def test_workers_of_experiments_side_by_side_each_get_through_for_their_own_only(proxy):
    other = proxy.admit("second-experiment")
    assert "current workers only" not in str(call(proxy, other, experiment="second-experiment"))
    assert "for its worker's experiment only" in str(call(proxy, other))  # not the first one's experiment
    assert "for its worker's experiment only" in str(call(proxy, proxy.token, experiment="second-experiment"))
    proxy.revoke(other)
    assert "current workers only" in str(call(proxy, other, experiment="second-experiment"))
    assert "current workers only" not in str(call(proxy, proxy.token))


def test_a_small_update_is_checked_like_a_streamed_one(proxy):
    import numpy as np

    def upload(token: str | None, experiment: str = "secret-experiment") -> str:
        client = EnvoyClient("env1", proxy.target, None, retry_s=0, token=token)
        try:
            with pytest.raises((grpc.RpcError, FedError, ConnectionError)) as caught:
                client.upload(experiment, 0, 10, {"w": np.ones(3, np.float32)})
            assert client._small_uploads  # the proxy took UploadSmallUpdate: the client never fell back
            return str(caught.value)
        finally:
            client.close()

    assert "current workers only" in upload("an-old-token")
    assert "for its worker's experiment only" in upload(proxy.token, experiment="other")
    forwarded = upload(proxy.token)
    assert "UNAVAILABLE" in forwarded and "UNIMPLEMENTED" not in forwarded  # forwarded (and nothing upstream)
