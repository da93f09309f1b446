"""The dashboard's app against a fake director client: routes, server-sent events, token, escaping, binding."""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import warnings

import pytest

pytest.importorskip("starlette", reason="the dashboard extra (starlette, uvicorn, plotly) is not installed")
pytest.importorskip("uvicorn", reason="the dashboard extra (starlette, uvicorn, plotly) is not installed")

import httpx  # noqa: E402

with warnings.catch_warnings():  # starlette asks for httpx2 in its test client; httpx is what is installed
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402

from fedjax_core import records as r  # noqa: E402
from fedjax_core.api.client import DirectorUnreachable  # noqa: E402
from fedjax_core.config import ConfigError  # noqa: E402
from fedjax_core.dashboard import command  # noqa: E402
from fedjax_core.dashboard.app import STATIC, create_app, host_name  # noqa: E402
from fedjax_core.dashboard.feed import frame, plain  # noqa: E402
from fedjax_core.local import free_port  # noqa: E402

NASTY = '<img src=x onerror="alert(1)">'


def envoy(name: str, online: bool = True) -> r.EnvoyEntry:
    info = r.ShardInfo(description="cifar shard", sample_shape=("32", "32", "3"), target_shape=("1",),
                       train_size=100, valid_size=20, hostname="host-a", label_counts=(60, 40))
    return r.EnvoyEntry(name=name, shard_info=info, is_online=online, last_seen=time.time())


def round_events(round_: int) -> list[r.MetricEvent]:
    acc = r.MetricEvent(round=round_, envoy="", stage=r.Stage.AGGREGATED,
                        metrics=(r.Metric("validate", "accuracy", 0.5 + round_ / 10),))
    closed = r.MetricEvent(round=round_, envoy="", stage=r.Stage.ROUND, round_time_s=1.5, participants=("env1",),
                           metrics=(r.Metric("round", "bytes_received", 1000.0), r.Metric("privacy", "epsilon", 0.7)))
    return [acc, closed]


class FakeCall:
    """What the dashboard does with a gRPC stream's call: cancel it."""

    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()


class FakeClient:
    """The FederationClient calls the dashboard makes; an experiment's events come from ``streams`` and a
    stream stays open (as a running experiment's does) until ``release`` is set or the client is closed."""

    address = "fake-director:50055"

    def __init__(self):
        self.envoys = [envoy("env1"), envoy(NASTY, online=False)]
        self.statuses = [r.ExperimentStatus(name="exp1", state="finished", current_round=2, rounds=2,
                                            envoys=("env1",), epsilon=0.7, delta=1e-5),
                         r.ExperimentStatus(name="live", state="running", current_round=0, rounds=5,
                                            envoys=("env1",))]
        self.streams = {"exp1": [*round_events(0), *round_events(1),
                                 r.MetricEvent(round=2, envoy="", stage="", experiment_done=True, state="finished")],
                        "live": round_events(0)}
        self.registry_calls = 0
        self.event_calls = 0
        self.fail = False
        self.closed = threading.Event()
        self.release = threading.Event()

    def shard_registry(self):
        self.registry_calls += 1
        if self.fail:
            raise DirectorUnreachable("cannot reach the director at fake-director:50055 (UNAVAILABLE)", True)
        return self.envoys

    def experiments(self):
        return self.statuses

    def events(self, name, calls=None):
        self.event_calls += 1
        if name not in self.streams:
            from fedjax_core.errors import NotFoundError

            raise NotFoundError(f"no experiment named {name!r}")
        call = FakeCall()
        if calls is not None:
            calls.append(call)
        yield from self.streams[name]
        if name == "live":
            while not (self.release.is_set() or self.closed.is_set()):
                if call.cancelled.is_set():
                    raise DirectorUnreachable("cannot reach the director (CANCELLED: Locally cancelled)", False)
                time.sleep(0.01)

    def close(self):
        self.closed.set()


def sse_events(text: str) -> list[tuple[str, object]]:
    """(event name, parsed data) of each frame of a text/event-stream body."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":") and ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


@pytest.fixture
def fake():
    return FakeClient()


def test_the_page_and_its_static_files_are_served_without_a_cdn(fake):
    with TestClient(create_app(fake)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "http://" not in page.text and "https://" not in page.text  # everything comes from this server
        for name, kind in [("dashboard.js", "javascript"), ("dashboard.css", "css"), ("plotly.min.js", "javascript")]:
            answer = client.get(f"/static/{name}")
            assert answer.status_code == 200 and kind in answer.headers["content-type"], name
        assert len(client.get("/static/plotly.min.js").content) > 1_000_000  # plotly.js itself, from the plotly package
        assert client.get("/static/../app.py").status_code == 404
        assert client.get("/static/secret.txt").status_code == 404
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
    assert fake.closed.is_set()  # the app owns the client and closes it when it stops


def test_only_get_routes(fake):
    with TestClient(create_app(fake)) as client:
        for path in ("/", "/api/envoys", "/api/experiments", "/api/stream", "/api/events"):
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                assert client.request(method, path).status_code == 405, (method, path)


def test_json_snapshots_carry_the_registry_and_experiments(fake):
    with TestClient(create_app(fake)) as client:
        envoys = client.get("/api/envoys").json()
        assert [e["name"] for e in envoys] == ["env1", NASTY]
        assert envoys[0]["shard_info"]["label_counts"] == [60, 40] and envoys[1]["is_online"] is False
        experiments = client.get("/api/experiments").json()
        assert experiments[0]["epsilon"] == 0.7
        assert experiments[1]["epsilon"] is None  # NaN (no DP) is null: JSON has no NaN
        fake.fail = True
        answer = client.get("/api/envoys")
        assert answer.status_code == 502 and "cannot reach the director" in answer.text


def test_an_ended_experiment_streams_its_events_then_ends(fake):
    with TestClient(create_app(fake)) as client:
        answer = client.get("/api/events", params={"experiment": "exp1"})
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert answer.text.startswith("retry: ")
        events = sse_events(answer.text)
        assert [name for name, _ in events] == ["metric"] * 5
        assert [e["stage"] for _, e in events] == ["aggregated_model_validation", "round"] * 2 + [""]
        assert events[1][1]["metrics"][1] == {"task": "privacy", "name": "epsilon", "value": 0.7}
        assert events[-1][1]["experiment_done"] is True
        calls = fake.event_calls
        again = sse_events(client.get("/api/events", params={"experiment": "exp1"}).text)
        assert again == events and fake.event_calls == calls  # the second page is served from memory
        assert client.get("/api/events").status_code == 400


def test_an_unknown_experiment_is_told_on_the_stream(fake):
    app = create_app(fake)
    with TestClient(app) as client:
        async def first_frames() -> list[str] | None:
            async with app.state.hub.watch_experiment("nope") as sub:
                return await sub.next(5)

        frames = client.portal.call(first_frames)
        assert frames and frames[0].startswith("event: feed") and "no experiment named 'nope'" in frames[0]


def test_frames_are_one_json_line_and_nan_is_null():
    text = frame("metric", r.MetricEvent(round=1, envoy="a\nb", stage=r.Stage.ROUND, round_time_s=float("nan")))
    head, data, end = text.split("\n", 2)
    assert head == "event: metric" and data.startswith("data: ") and end == "\n"
    assert json.loads(data[6:])["round_time_s"] is None and json.loads(data[6:])["envoy"] == "a\nb"
    assert plain({1: (float("inf"), r.Stage.TRAIN)}) == {"1": [None, "train"]}


def test_a_token_is_required_everywhere_but_the_static_files(fake):
    with TestClient(create_app(fake, token="s3cret")) as client:
        for path in ("/", "/api/envoys", "/api/stream", "/api/events?experiment=exp1"):
            refused = client.get(path)
            assert refused.status_code == 401 and "token" in refused.text, path
        assert client.get("/?token=wrong").status_code == 401
        assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/?token=s3cret").status_code == 200
        assert client.get("/api/envoys", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/static/dashboard.js").status_code == 200  # the page's code holds no data
        assert "s3cret" not in client.get("/?token=s3cret").text


def test_a_loopback_dashboard_answers_only_to_loopback_names(fake):
    with TestClient(create_app(fake, allowed_hosts={"127.0.0.1", "localhost", "::1"}),
                    base_url="http://127.0.0.1:8050") as client:
        assert client.get("/").status_code == 200
        assert client.get("/", headers={"host": "localhost:8050"}).status_code == 200
        assert client.get("/", headers={"host": "[::1]:8050"}).status_code == 200
        assert client.get("/", headers={"host": "evil.example:8050"}).status_code == 400  # DNS rebinding
    assert host_name("[::1]:8050") == "::1" and host_name("localhost") == "localhost"


def test_names_reach_the_page_only_as_text():
    """The page is static; names arrive as JSON and the script puts them in with textContent, plotly's
    pseudo-HTML escaped."""
    script = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert "textContent" in script and "name: plotText(" in script
    assert "{{" not in (STATIC / "index.html").read_text()  # no server-side templating of data into HTML


def read_frames(answer: httpx.Response):
    """The (event, data) frames of a streaming text/event-stream answer, as they arrive."""
    buffer = ""
    for chunk in answer.iter_text():
        buffer += chunk
        *blocks, buffer = buffer.split("\n\n")
        yield from sse_events("\n\n".join(blocks) + "\n\n")


def test_the_federation_stream_pushes_snapshots_and_stops_promptly(fake):
    """A real server: the stream starts with the director, envoys and experiments and pushes changes;
    stopping the server ends an open stream at once, and closes the client."""
    app = create_app(fake, refresh_s=0.1)
    port = free_port()
    server = command.make_server(app, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the dashboard did not start"
            time.sleep(0.02)
        with httpx.stream("GET", f"http://127.0.0.1:{port}/api/stream", timeout=10) as answer:
            assert answer.headers["content-type"].startswith("text/event-stream")
            frames = read_frames(answer)
            first = [next(frames) for _ in range(3)]
            assert dict(first)["director"] == {"address": "fake-director:50055", "ok": True, "error": ""}
            assert [e["name"] for e in dict(first)["envoys"]["envoys"]] == ["env1", NASTY]
            assert [x["name"] for x in dict(first)["experiments"]["experiments"]] == ["exp1", "live"]
            fake.envoys = fake.envoys[:1]  # an envoy leaves the registry: the next refresh says so
            for name, data in frames:
                if name == "envoys" and len(data["envoys"]) == 1:
                    break
            started = time.monotonic()
            server.should_exit = True
            list(frames)  # the stream ends
        thread.join(timeout=10)
        assert not thread.is_alive() and time.monotonic() - started < 2.0, "the server did not stop promptly"
        assert fake.closed.is_set()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_registry_is_read_only_while_a_page_watches(fake):
    app = create_app(fake, refresh_s=0.05)
    with TestClient(app):
        time.sleep(0.3)
        assert fake.registry_calls == 0  # no page: no calls to the director


def test_a_live_experiment_fans_out_to_every_page_and_new_pages_get_the_past(fake):
    app = create_app(fake)
    hub = app.state.hub
    with TestClient(app) as client:
        async def watch(count: int) -> list[str]:
            got: list[str] = []
            async with hub.watch_experiment("live") as sub:
                while len(got) < count:
                    batch = await sub.next(5)
                    assert batch is not None
                    got += batch
            return got

        first = client.portal.call(watch, 2)
        assert len(first) == 2 and '"stage":"round"' in first[1]
        later = client.portal.call(watch, 2)  # the follower is still running; the past comes from memory
        assert later == first and fake.event_calls == 1
    assert hub.feeds["live"].thread.is_alive() is False  # closing the app stopped the follower


def test_a_feed_no_page_watches_gives_its_director_stream_back(fake):
    """Each open StreamMetrics holds one of the director's stream slots: a feed left without pages cancels it
    after follow_idle_s, and a page that opens the experiment again starts a new follower."""
    app = create_app(fake)
    hub = app.state.hub
    hub.follow_idle_s = 0.2
    with TestClient(app) as client:
        async def watch_once() -> None:
            async with hub.watch_experiment("live") as sub:
                assert await sub.next(5)

        client.portal.call(watch_once)
        feed = hub.feeds["live"]
        feed.thread.join(timeout=10)  # ends once its stream is cancelled, with no page watching
        assert not feed.thread.is_alive() and feed.idle_stopped and fake.event_calls == 1
        client.portal.call(watch_once)  # opened again: a new follower replays the events
        assert fake.event_calls == 2 and hub.feeds["live"] is not feed


def args_for(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedjax")
    command.add_parser(parser.add_subparsers(dest="component"))
    return parser.parse_args(["dashboard", *argv])


def test_the_command_line_defaults_to_loopback_on_8050():
    args = args_for("-dh", "127.0.0.1", "-dp", "50055", "--disable-tls")
    assert (args.host, args.port, args.director_port, args.action) == ("127.0.0.1", 8050, 50055, "serve")


@pytest.mark.parametrize("argv, needs", [
    (["--host", "0.0.0.0"], "HTTPS (--tls-cert CERT --tls-key KEY) and a token"),
    (["--host", "0.0.0.0", "--token", "t"], "needs HTTPS"),
    (["--host", "0.0.0.0", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "needs a token"),
    (["--tls-cert", "c.pem"], "both --tls-cert and --tls-key"),
    (["--client-ca", "ca.pem"], "add --tls-cert and --tls-key"),
])
def test_serving_beyond_loopback_without_tls_and_auth_is_refused(argv, needs, capsys):
    assert command.run(args_for("-dh", "127.0.0.1", "--disable-tls", *argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedjax dashboard: ") and needs in err, err


def test_a_secured_remote_bind_passes_the_check():
    command.check_page_security("0.0.0.0", "c.pem", "k.pem", "token", None)
    command.check_page_security("10.0.0.5", "c.pem", "k.pem", None, "ca.pem")
    command.check_page_security("::1", None, None, None, None)
    with pytest.raises(ConfigError, match="SSH tunnel"):
        command.check_page_security("192.168.1.4", None, None, None, None)


def test_plaintext_to_a_remote_director_and_missing_certificates_are_refused(capsys):
    assert command.run(args_for("-dh", "director.example", "--disable-tls")) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert command.run(args_for("-dh", "127.0.0.1")) == 2
    assert "--disable-tls" in capsys.readouterr().err  # TLS by default: certificates, or say plaintext


def test_an_unreachable_director_is_said_at_start(capsys):
    assert command.run(args_for("-dh", "127.0.0.1", "-dp", str(free_port()), "--disable-tls")) == 1
    assert "cannot reach the director" in capsys.readouterr().err


def test_the_token_file_and_environment(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("from-file\n")
    assert command.read_token(args_for("--token-file", str(tmp_path / "token"))) == "from-file"
    monkeypatch.setenv(command.TOKEN_ENV, "from-env")
    assert command.read_token(args_for()) == "from-env"
    assert command.read_token(args_for("--token", "given")) == "given"
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        command.read_token(args_for("--token-file", str(tmp_path / "empty")))


def test_a_missing_extra_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    assert command.run(args_for("--disable-tls")) == 2
    assert capsys.readouterr().err.strip() == command.MISSING_EXTRA
