"""``fedjax`` (also ``python -m fedjax_core``): start a director or an envoy, or make certificates.

    fedjax director start -c director_config.yaml [--disable-tls]
    fedjax envoy start -n NAME -c envoy_config.yaml -dh HOST -dp PORT [--disable-tls]
    fedjax envoy review -c envoy_config.yaml [-n NAME] [--approve NAME | --refuse NAME [--reason TEXT]]
    fedjax pki init|certify ...    # certify --role director|envoy|api|admin: see fedjax_core.pki
    fedjax envoys list | experiments list|show|logs|cancel|pull | audit   # an operator's view: fedjax_core.commands
    fedjax dashboard -dh HOST -dp PORT [--port 8050]                        # a live web page: fedjax_core.dashboard
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from fedjax_core import commands
from fedjax_core.commands import port_number as _port
from fedjax_core.config import ConfigError, DirectorConfig, EnvoyConfig, load_config, resolve_path


def _start_args(parser: argparse.ArgumentParser) -> None:
    """Options every `start` command takes: TLS, and the log level (also accepted after the subcommand)."""
    parser.add_argument("--log-level", dest="start_log_level", choices=LOG_LEVELS,
                        help="log level (default: $FEDJAX_LOG_LEVEL or INFO)")
    parser.add_argument("--disable-tls", action="store_true", help="plaintext gRPC (trusted networks only)")
    parser.add_argument("--allow-remote-plaintext", action="store_true",
                        help="with --disable-tls, allow a host other than loopback (anyone on the network can "
                             "then read the traffic and impersonate parties)")
    parser.add_argument("--root-cert-path", "-rc", help="federation root CA (overrides the config's tls section)")
    parser.add_argument("--public-cert-path", "-pc", help="this party's certificate (overrides the config's)")
    parser.add_argument("--private-key-path", "-pk", help="this party's private key (overrides the config's)")
    parser.add_argument("--log-file", help="also write the log to this file, rotated at --log-max-mb (keeping "
                                           "--log-backups older files beside it)")
    parser.add_argument("--log-max-mb", type=float, default=50.0, help="rotate --log-file past this size (default 50)")
    parser.add_argument("--log-backups", type=int, default=5, help="rotated log files kept (default 5)")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ROLES = ("director", "envoy", "api")  # fedjax_core.pki.ROLES, without importing cryptography for --help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjax", description="Federated learning for JAX/Flax: director, envoys, PKI.")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default: $FEDJAX_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="component", required=True)

    director = sub.add_parser("director", help="the coordinating service").add_subparsers(dest="action", required=True)
    d_start = director.add_parser("start", help="serve until stopped (SIGTERM/SIGINT)")
    d_start.add_argument("-c", "--director-config-path", dest="config", required=True)
    d_start.add_argument("-p", "--listen-port", type=_port, help="overrides settings.listen_port")
    d_start.add_argument("--listen-host", help="overrides settings.listen_host")
    _start_args(d_start)
    d_gc = director.add_parser("gc", help="remove the files of old ended experiments (their metrics stay)")
    d_gc.add_argument("-c", "--director-config-path", dest="config", required=True)
    d_gc.add_argument("--keep", type=int, help="ended experiments whose files stay, newest first "
                                              "(default: settings.keep_experiments)")

    envoy = sub.add_parser("envoy", help="a data owner's daemon").add_subparsers(dest="action", required=True)
    e_start = envoy.add_parser("start", help="register the shard and run experiments until stopped")
    e_start.add_argument("-n", "--shard-name", dest="name", required=True)
    e_start.add_argument("-c", "--envoy-config-path", dest="config", required=True)
    e_start.add_argument("-dh", "--director-host", default="localhost")
    e_start.add_argument("-dp", "--director-port", type=_port, default=50055)
    _start_args(e_start)
    e_review = envoy.add_parser(
        "review", help="list experiments held for review (settings.review: manual), approve or refuse one",
        description="Without --approve/--refuse: list the experiments the envoy holds, with their submitter, "
                    "bundle sha256, tasks and package versions. The running daemon applies a decision within a "
                    "few seconds; it is bound to the bundle that was reviewed.")
    e_review.add_argument("-c", "--envoy-config-path", dest="config", required=True)
    e_review.add_argument("-n", "--shard-name", dest="name",
                          help="the envoy's name (needed only when several envoys share the config's work_dir)")
    decide = e_review.add_mutually_exclusive_group()
    decide.add_argument("--approve", metavar="EXPERIMENT", help="run this experiment")
    decide.add_argument("--refuse", metavar="EXPERIMENT", help="refuse it: the envoy drops out of it")
    e_review.add_argument("--reason", default="", help="with --refuse: told to the experiment's submitter")

    defaults = argparse.ArgumentDefaultsHelpFormatter
    pki = sub.add_parser("pki", help="certificates for mTLS").add_subparsers(dest="action", required=True)
    p_init = pki.add_parser("init", help="create the federation's root CA", formatter_class=defaults,
                            description="Create the federation's root CA (root_ca.crt, root_ca.key) in --dir.")
    p_init.add_argument("--dir", default="pki", help="folder for the CA and certificates")
    p_cert = pki.add_parser(
        "certify", help="issue a certificate for one party", formatter_class=defaults,
        description="Issue a certificate and key signed by the root CA in --dir, with the party's role: one "
                    "for the director (--role director, named as its host), one per envoy (--role envoy, named "
                    "as the envoy), and one named 'api' for the notebook (--role api; Federation(..., "
                    "api_cert='pki/api.crt', api_private_key='pki/api.key')), and optionally admin ones (--role "
                    "admin: see and cancel every experiment). The director checks roles: only envoy certificates "
                    "may act as envoys, only api and admin certificates may use the notebook API, and only a "
                    "director certificate can serve.")
    p_cert.add_argument("--dir", default="pki", help="folder holding the root CA (from `fedjax pki init`); "
                                                     "NAME.crt and NAME.key are written there")
    p_cert.add_argument("--name", required=True, help="the party's name: the director's host name, an envoy's "
                                                      "name, or 'api' for the notebook")
    p_cert.add_argument("--role", choices=ROLES, default=argparse.SUPPRESS,
                        help="what the certificate may do (default: api for --name api, envoy for any other "
                             "name; the director's certificate needs --role director)")
    p_cert.add_argument("--san", action="append", default=[],
                        help="extra DNS name or IP the director is dialled at (repeatable; --role director only)")
    commands.add_parsers(sub)
    _add_dashboard(sub)
    return parser


def _add_dashboard(sub) -> None:
    """``fedjax dashboard``; its options come from the dashboard package, which needs the dashboard extra only
    to run (its parser is plain argparse)."""
    from fedjax_core.dashboard import command

    command.add_parser(sub)


def _tls(args, config_tls, config_dir: Path):
    """The party's TLS files, or None for plaintext; logs which was chosen and why.

    Each of --root-cert-path, --public-cert-path and --private-key-path overrides its
    counterpart in the config's ``tls:`` section on its own.
    """
    from fedjax_core.transport import TLSFiles

    log = logging.getLogger("fedjax")
    if args.disable_tls:
        log.info("plaintext gRPC: --disable-tls was given")
        return None
    flags = {"root_certificate": args.root_cert_path, "certificate": args.public_cert_path,
             "private_key": args.private_key_path}
    names = {"root_certificate": "--root-cert-path", "certificate": "--public-cert-path",
             "private_key": "--private-key-path"}
    paths = {}
    for key, flag_value in flags.items():
        if flag_value:
            paths[key] = Path(flag_value).resolve()
        elif config_tls is not None:
            paths[key] = resolve_path(getattr(config_tls, key), config_dir)
    missing = [names[key] for key in flags if key not in paths]
    if len(missing) == 3:
        raise ConfigError("TLS is on by default, but no certificates were given: add a `tls:` section to the "
                          "config (root_certificate, certificate, private_key; see `fedjax pki`), pass "
                          "--root-cert-path/--public-cert-path/--private-key-path, or pass --disable-tls")
    if missing:
        raise ConfigError(f"TLS needs a root certificate, a certificate and a private key; {', '.join(missing)} "
                          "missing: give it, or add a `tls:` section to the config")
    source = ("the config's tls: section" if not any(flags.values())
              else "the command line" + (" and the config's tls: section" if not all(flags.values()) else ""))
    log.info("mTLS with certificate %s (from %s)", paths["certificate"], source)
    return TLSFiles(paths["root_certificate"], paths["certificate"], paths["private_key"])


def _check_plaintext(args, host: str, what: str) -> None:
    """Plaintext only on loopback, unless the operator insists with --allow-remote-plaintext."""
    from fedjax_core.transport import is_loopback

    if args.disable_tls and not args.allow_remote_plaintext and not is_loopback(host):
        raise ConfigError(
            f"--disable-tls would {what} {host!r}, which is not a loopback address: plaintext lets anyone on the "
            "network read models and submit code. Use mTLS (fedjax pki init --dir pki, then fedjax pki certify "
            "--dir pki --name NAME --role director|envoy|api for each party, and a tls: section in each config), "
            "or add --allow-remote-plaintext if this network is trusted")


def _check_director_certificate(tls, host: str) -> None:
    """The director serves only with a certificate of role director (no envoy or api leaf can serve)."""
    from fedjax_core import pki

    try:
        who = pki.identity(tls.certificate.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the director's certificate {tls.certificate}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{tls.certificate} is not a PEM certificate (made by `fedjax pki certify`)") from None
    if who.role != pki.DIRECTOR:
        what = f"has role {who.role}" if who.role else "carries no role (issued before roles, or by hand)"
        name = host if host not in ("0.0.0.0", "::", "") else "DIRECTOR_HOST"
        raise ConfigError(
            f"the certificate {tls.certificate} ({who.name or 'no usable name'}) {what}; the director serves only "
            f"with a certificate of role director: `{pki.fix_command(pki.DIRECTOR, name, tls.root_certificate.parent)}` "
            "(add --san for each other name or IP envoys and notebooks dial), then point the config's "
            "tls.certificate and tls.private_key (or --public-cert-path/--private-key-path) at it")


def _director_start(args) -> int:
    from fedjax_core.director.server import run_director

    config = load_config(args.config, DirectorConfig)
    overrides = {k: v for k, v in (("listen_port", args.listen_port), ("listen_host", args.listen_host)) if v}
    if overrides:
        config = config.model_copy(update={"settings": config.settings.model_copy(update=overrides)})
    config_dir = Path(args.config).resolve().parent
    _check_plaintext(args, config.settings.listen_host, "listen on")
    tls = _tls(args, config.tls, config_dir)
    if tls is not None:
        _check_director_certificate(tls, config.settings.listen_host)
    run_director(config, tls, config_dir)
    return 0


def _director_gc(args) -> int:
    """Remove the files of ended experiments beyond --keep (or settings.keep_experiments); safe while running."""
    from fedjax_core.director.files import ExperimentFiles
    from fedjax_core.director.retention import collect
    from fedjax_core.director.store import SqliteStore

    config = load_config(args.config, DirectorConfig)
    keep = args.keep if args.keep is not None else config.settings.keep_experiments
    if keep is None or keep < 0:
        raise ConfigError("say how many ended experiments keep their files: --keep N (N >= 0), or "
                          f"settings.keep_experiments in {args.config}")
    state_dir = resolve_path(config.settings.state_dir, Path(args.config).resolve().parent)
    if not (state_dir / "director.sqlite").exists():
        raise ConfigError(f"no director state in {state_dir} (settings.state_dir of {args.config})")
    store = SqliteStore(state_dir / "director.sqlite")
    try:
        removed = collect(store, ExperimentFiles(state_dir, sweep_incoming=False), keep,
                          "--keep" if args.keep is not None else "settings.keep_experiments")
    finally:
        store.close()
    print(f"removed the files of {len(removed)} experiment(s){': ' + ', '.join(removed) if removed else ''}")
    return 0


def _envoy_start(args) -> int:
    from fedjax_core.config import worker_account
    from fedjax_core.envoy.daemon import EnvoyDaemon

    config = load_config(args.config, EnvoyConfig)
    config_dir = Path(args.config).resolve().parent
    try:
        worker_account(config.settings)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    _check_plaintext(args, args.director_host, "talk to a director at")
    tls = _tls(args, config.tls, config_dir)
    try:
        daemon = EnvoyDaemon(args.name, config, config_dir, args.director_host, args.director_port, tls,
                             config_path=Path(args.config).resolve())
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    except (ValueError, ImportError, FileNotFoundError) as exc:
        raise ConfigError(f"{args.config}: shard_descriptor: {exc}") from None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.request_stop())
    daemon.run()
    return 0


def _envoy_review(args) -> int:
    from fedjax_core.config import resolve_path
    from fedjax_core.envoy.review import ReviewError, describe, desks

    config = load_config(args.config, EnvoyConfig)
    if args.reason and not args.refuse:
        raise ConfigError("--reason goes with --refuse EXPERIMENT")
    work_dir = resolve_path(config.params.work_dir, Path(args.config).resolve().parent)
    try:
        desk = desks(work_dir, args.name)
        if args.approve or args.refuse:
            decision = desk.decide(args.approve or args.refuse, approve=bool(args.approve), reason=args.reason)
            verb = "approved" if decision["approve"] else "refused"
            print(f"{verb} experiment {decision['experiment']!r} (bundle sha256 {decision['sha256']}); the "
                  "running envoy applies it within a few seconds")
            return 0
    except ReviewError as exc:
        print(f"fedjax envoy review: {exc}", file=sys.stderr)
        return 1
    pending = desk.pending()
    print("\n".join(describe(entry) for entry in pending) if pending else "no experiment is pending review")
    return 0


def _pki(args) -> int:
    from fedjax_core import pki

    if args.action == "init":
        print(f"root CA written to {pki.init_ca(Path(args.dir))}")
    else:
        role = getattr(args, "role", None) or pki.default_role(args.name)
        cert, key = pki.certify(Path(args.dir), args.name, args.san, role=role)
        print(f"certificate {cert} (role {role})\nprivate key {key}\nroot CA     {Path(args.dir) / 'root_ca.crt'}")
    return 0


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


def _log_to_file(args) -> None:
    """With --log-file, the log also goes to that file (beside stdout), rotated by size."""
    from logging.handlers import RotatingFileHandler

    path = getattr(args, "log_file", None)
    if not path:
        return
    if args.log_max_mb <= 0 or args.log_backups < 0:
        raise ConfigError("--log-max-mb must be above 0 and --log-backups at least 0")
    path = Path(path).resolve()
    if not path.parent.is_dir():
        raise ConfigError(f"--log-file {path}: the folder {path.parent} does not exist; create it or choose another")
    try:
        handler = RotatingFileHandler(path, maxBytes=int(args.log_max_mb * (1 << 20)), backupCount=args.log_backups,
                                      encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--log-file {path}: {exc.strerror}") from None
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    logging.getLogger("fedjax").info("logging to %s as well (rotated at %g MB, %d kept)", path, args.log_max_mb,
                                     args.log_backups)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "start_log_level", None) or args.log_level or os.environ.get("FEDJAX_LOG_LEVEL") or "INFO"
    if level not in LOG_LEVELS:
        print(f"fedjax: FEDJAX_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}", file=sys.stderr)
        return 2
    # gRPC's own C-core logging (TLS handshake noise from refused peers) only when debugging
    os.environ.setdefault("GRPC_VERBOSITY", "DEBUG" if level == "DEBUG" else "NONE")
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if args.component in ("envoys", "experiments", "audit"):
        return commands.run(args)
    if args.component == "dashboard":
        from fedjax_core.dashboard import command

        return command.run(args)
    try:
        _log_to_file(args)
    except ConfigError as exc:
        print(f"fedjax {args.component}: {exc}", file=sys.stderr)
        return 2
    handlers = {("director", "start"): _director_start, ("director", "gc"): _director_gc,
                ("envoy", "start"): _envoy_start, ("envoy", "review"): _envoy_review}
    handler = handlers.get((args.component, args.action), _pki)
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"fedjax {args.component}: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"fedjax {args.component}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
