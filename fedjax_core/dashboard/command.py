"""``fedjax dashboard``: serve the read-only live page of a federation.

    fedjax dashboard -dh DIRECTOR -dp 50055 -rc root_ca.crt -pc api.crt -pk api.key [--port 8050]
    fedjax dashboard -dh 127.0.0.1 -dp 50055 --disable-tls

It talks to the director as an ``api`` client (the director gains no port and no code path). The page is
served on 127.0.0.1; any other interface needs HTTPS (--tls-cert, --tls-key) and either a token (--token,
--token-file or $FEDJAX_DASHBOARD_TOKEN) or client certificates (--client-ca).
"""
from __future__ import annotations

import argparse
import importlib
import os
import ssl
import sys
from pathlib import Path

from fedjax_core.config import ConfigError

MISSING_EXTRA = "fedjax dashboard needs the dashboard extra: pip install 'fedjax-core[dashboard]'"
EXTRA = ("starlette", "uvicorn", "plotly")
TOKEN_ENV = "FEDJAX_DASHBOARD_TOKEN"


def _port(value: str) -> int:
    from fedjax_core.cli import _port as port

    return port(value)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``dashboard`` subcommand to ``fedjax``'s subparsers (its handler: :func:`run`)."""
    p = subparsers.add_parser("dashboard", help="a read-only live web page of the federation",
                              description=__doc__.split("\n\n")[0])
    p.set_defaults(action="serve")
    director = p.add_argument_group("the director (read as an api client)")
    director.add_argument("-dh", "--director-host", default="localhost")
    director.add_argument("-dp", "--director-port", type=_port, default=50055)
    director.add_argument("--disable-tls", action="store_true", help="plaintext gRPC to the director (loopback only)")
    director.add_argument("--allow-remote-plaintext", action="store_true",
                          help="with --disable-tls, allow a director that is not on loopback")
    director.add_argument("-rc", "--root-cert-path", help="the federation's root CA")
    director.add_argument("-pc", "--public-cert-path", help="an api (or admin) certificate (`fedjax pki certify "
                                                            "--role api`); an admin one sees every experiment")
    director.add_argument("-pk", "--private-key-path", help="its private key")
    page = p.add_argument_group("the page")
    page.add_argument("--host", default="127.0.0.1", help="interface to serve on (default 127.0.0.1; any other "
                                                          "needs --tls-cert/--tls-key and --token or --client-ca)")
    page.add_argument("--port", type=_port, default=8050)
    page.add_argument("--refresh-s", type=float, default=2.0,
                      help="how often the registry and experiments are read while a page is open")
    page.add_argument("--tls-cert", help="HTTPS certificate (PEM) for the page")
    page.add_argument("--tls-key", help="its private key (PEM)")
    page.add_argument("--token", help=f"require this token (?token= or Authorization: Bearer); visible in `ps`: "
                                      f"prefer --token-file or ${TOKEN_ENV}")
    page.add_argument("--token-file", help="read the token from this file")
    page.add_argument("--client-ca", help="require browser certificates signed by this CA (PEM)")
    return p


def read_token(args) -> str | None:
    """The token from --token, --token-file or $FEDJAX_DASHBOARD_TOKEN (in that order), or None."""
    if args.token:
        return args.token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def check_page_security(host: str, tls_cert: str | None, tls_key: str | None, token: str | None,
                        client_ca: str | None) -> None:
    """Loopback needs nothing; any other interface needs HTTPS and a token or client certificates."""
    from fedjax_core.transport import is_loopback

    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key")
    if client_ca and not tls_cert:
        raise ConfigError("--client-ca checks browser certificates over HTTPS: add --tls-cert and --tls-key")
    if is_loopback(host):
        return
    if not tls_cert or not (token or client_ca):
        missing = " and ".join(filter(None, ["HTTPS (--tls-cert CERT --tls-key KEY)" if not tls_cert else "",
                                             "a token (--token-file FILE, or --token) or browser certificates "
                                             "(--client-ca CA)" if not (token or client_ca) else ""]))
        raise ConfigError(f"--host {host} is not a loopback address, so anyone who can reach it would read the "
                          f"federation: serving there needs {missing}. Or keep the default --host 127.0.0.1 and "
                          "reach it through an SSH tunnel (ssh -L 8050:127.0.0.1:8050 HOST)")


def make_server(app, host: str, port: int, tls_cert: str | None = None, tls_key: str | None = None,
                client_ca: str | None = None, announce: bool = False):
    """A uvicorn server for ``app`` that ends the pages' event streams first when it stops, so it stops at
    once (``server.run()`` serves; ``server.should_exit = True`` stops it)."""
    import uvicorn

    scheme = "https" if tls_cert else "http"
    shown = f"[{host}]" if ":" in host else host

    class DashboardServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and announce:
                print(f"DASHBOARD READY at {scheme}://{shown}:{port}/", flush=True)

        async def shutdown(self, sockets=None) -> None:
            app.state.hub.end_streams()
            await super().shutdown(sockets)

    tls = {}
    if tls_cert:
        tls = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key}
        if client_ca:
            tls.update(ssl_ca_certs=client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3, lifespan="on", **tls)
    return DashboardServer(config)


def run(args) -> int:
    """Serve the dashboard until SIGINT/SIGTERM; 2 with a message on a configuration problem."""
    for module in EXTRA:
        try:
            importlib.import_module(module)
        except ImportError:
            print(MISSING_EXTRA, file=sys.stderr)
            return 2
    from fedjax_core.api.client import DirectorUnreachable, FederationClient
    from fedjax_core.cli import _check_plaintext, _tls
    from fedjax_core.dashboard.app import LOOPBACK_NAMES, create_app
    from fedjax_core.errors import FedError
    from fedjax_core.transport import is_loopback

    try:
        token = read_token(args)
        check_page_security(args.host, args.tls_cert, args.tls_key, token, args.client_ca)
        _check_plaintext(args, args.director_host, "talk to a director at")
        tls = _tls(args, None, Path.cwd())
    except ConfigError as exc:
        print(f"fedjax dashboard: {exc}", file=sys.stderr)
        return 2
    client = FederationClient(args.director_host, args.director_port, tls)
    try:
        client.shard_registry()
    except (DirectorUnreachable, FedError, OSError) as exc:
        client.close()
        print(f"fedjax dashboard: {exc}", file=sys.stderr)
        return 1
    allowed = {*LOOPBACK_NAMES, args.host} if is_loopback(args.host) else None
    app = create_app(client, token=token, refresh_s=args.refresh_s, allowed_hosts=allowed)
    make_server(app, args.host, args.port, args.tls_cert, args.tls_key, args.client_ca, announce=True).run()
    return 0
