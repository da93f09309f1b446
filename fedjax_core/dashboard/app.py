"""The dashboard's web app (Starlette): one static page, its scripts, JSON snapshots and server-sent events.

Only GET routes: the page reads the federation, it never changes it. Every name shown comes from the
director as JSON and is put in the page with ``textContent`` (``static/dashboard.js``), never as HTML.

    GET /                            the page (static/index.html)
    GET /static/{file}               its script, style sheet and plotly.js (from the installed plotly package)
    GET /api/envoys, /api/experiments  the shard registry and the experiment list, as JSON
    GET /api/stream                  server-sent events: 'director', 'envoys', 'experiments' as they change
    GET /api/events?experiment=NAME  server-sent events: that experiment's 'metric' events from its start
"""
from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedjax_core.dashboard.feed import DirectorClient, Hub, Subscription, plain

STATIC = Path(__file__).resolve().parent / "static"
KEEPALIVE_S = 15.0  # a comment line this often keeps idle streams open through proxies and finds gone pages
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}

# Scripts only from this server; plotly sets inline styles; the page talks only to this server.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                 b"img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                 b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the token may sit in the page's address
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


def plotly_js() -> Path:
    """plotly.js as shipped inside the installed ``plotly`` package (no CDN, no copy in this repository)."""
    path = resources.files("plotly") / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js is missing from the installed plotly package ({path}): "
                                "pip install 'fedjax-core[dashboard]'")
    return Path(str(path))


class Guard:
    """ASGI middleware: the security headers on every answer; with a ``token``, every request but the static
    files must carry it (``?token=`` or ``Authorization: Bearer``); with ``allowed_hosts``, the Host header
    must name one of them (a page on another site cannot reach a loopback dashboard by DNS rebinding)."""

    def __init__(self, app: ASGIApp, token: str | None = None, allowed_hosts: set[str] | None = None):
        self.app = app
        self.token = token.encode() if token else None
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None and host_name(headers.get("host", "")) not in self.allowed_hosts:
            return PlainTextResponse("this dashboard answers only to its own address (the Host header names "
                                     "another)", status_code=400)
        if self.token is None or scope["path"].startswith("/static/"):  # static files hold no data
            return None
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given and hmac.compare_digest(given.encode(), self.token):
            return None
        return PlainTextResponse("this dashboard needs its token: open it as https://HOST:PORT/?token=TOKEN, or "
                                 "send the header 'Authorization: Bearer TOKEN'", status_code=401,
                                 headers={"www-authenticate": "Bearer"})


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8050`` -> ``::1``, ``localhost:80`` -> ``localhost``."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


async def sse(sub: Subscription) -> AsyncIterator[str]:
    """A subscription's frames as a text/event-stream body, with keep-alive comments while idle."""
    yield "retry: 2000\n\n"  # how long a browser waits before it reconnects
    while (frames := await sub.next(KEEPALIVE_S)) is not None:
        yield "".join(frames) if frames else ": keep-alive\n\n"


def sse_response(watch) -> StreamingResponse:
    """Stream the frames of ``watch`` (a Hub.watch_* context) until it ends or the page goes."""
    async def body() -> AsyncIterator[str]:
        async with watch as sub:
            async for chunk in sse(sub):
                yield chunk

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


def create_app(client: DirectorClient, token: str | None = None, refresh_s: float = 2.0,
               allowed_hosts: set[str] | None = None) -> Starlette:
    """The dashboard of the director behind ``client`` (a FederationClient, or a fake with its methods).

    The app owns ``client`` and closes it on shutdown. ``token``: required on every request but the static
    files. ``refresh_s``: how often the registry and experiment list are read while a page is open.
    ``allowed_hosts``: the Host header names it answers to (None: any).
    """
    hub = Hub(client, refresh_s=refresh_s)
    static = {"dashboard.js": (STATIC / "dashboard.js", "text/javascript"),
              "dashboard.css": (STATIC / "dashboard.css", "text/css"),
              "plotly.min.js": (plotly_js(), "text/javascript")}

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def static_file(request: Request) -> Response:
        found = static.get(request.path_params["name"])
        if found is None:
            return PlainTextResponse("no such file", status_code=404)
        return FileResponse(found[0], media_type=found[1])

    async def ask_director(call) -> Response:
        try:
            return JSONResponse(plain(await asyncio.to_thread(call)))
        except Exception as exc:  # noqa: BLE001  (unreachable, refused: the director's words, as a 502)
            return PlainTextResponse(f"the director did not answer: {exc}", status_code=502)

    async def envoys(request: Request) -> Response:
        return await ask_director(client.shard_registry)

    async def experiments(request: Request) -> Response:
        return await ask_director(client.experiments)

    async def stream(request: Request) -> Response:
        return sse_response(hub.watch_federation())

    async def events(request: Request) -> Response:
        name = request.query_params.get("experiment", "")
        if not name:
            return PlainTextResponse("say which experiment: /api/events?experiment=NAME", status_code=400)
        return sse_response(hub.watch_experiment(name))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        try:
            yield
        finally:
            await hub.close()

    app = Starlette(routes=[Route("/", index), Route("/static/{name}", static_file),
                            Route("/api/envoys", envoys), Route("/api/experiments", experiments),
                            Route("/api/stream", stream), Route("/api/events", events)],
                    lifespan=lifespan)
    app.state.hub = hub
    app.add_middleware(Guard, token=token, allowed_hosts=allowed_hosts)
    return app
