"""settings.event_loop: the director's gRPC server runs on uvloop when it is installed, or on asyncio's loop."""
from __future__ import annotations

import asyncio

import pytest

from fedjax_core.director.server import create_server
from fedjax_core.envoy.client import EnvoyClient
from test_core import INFO, make_director

uvloop = pytest.importorskip("uvloop", reason="uvloop comes with fedjax-core on Linux and macOS")


@pytest.mark.parametrize("kind, loop_type", [("auto", uvloop.Loop), ("uvloop", uvloop.Loop),
                                             ("asyncio", asyncio.BaseEventLoop)])
def test_the_server_runs_on_the_loop_asked_for_and_serves(tmp_path, kind, loop_type):
    director = make_director(tmp_path)
    server, port = create_server(director, "127.0.0.1", 0, None, event_loop=kind)
    client = EnvoyClient("newcomer", f"127.0.0.1:{port}", None, retry_s=0)
    try:
        server.start()
        assert isinstance(server.loop, loop_type)
        assert (kind == "asyncio") != isinstance(server.loop, uvloop.Loop)
        assert client.register(INFO, retry_s=0) == 60  # calls answered through that loop
        assert client.heartbeat() is True
    finally:
        client.close()
        server.stop(0)
        director.close()
