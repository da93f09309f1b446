"""An operator's commands against a running director, as an ``api`` (or ``admin``) client:

    fedjax envoys list [--json]
    fedjax experiments list [--json]
    fedjax experiments show NAME [--json]
    fedjax experiments logs NAME [--follow]
    fedjax experiments cancel NAME
    fedjax experiments pull NAME --which best|last --out FILE.npz
    fedjax audit [--since WHEN] [--json]

Human tables by default, ``--json`` for scripts. Exit codes tell failures apart (``EXIT_CODES``). The
director decides what a caller sees: an api certificate its own experiments, an admin every one.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fedjax_core import records as r
from fedjax_core.errors import FedError, NotFoundError, PermissionDeniedError

OK, FAILED, BAD_ARGUMENTS, NOT_FOUND, NOT_ALLOWED, UNREACHABLE = 0, 1, 2, 3, 4, 5
EXIT_CODES = """exit codes: 0 done; 1 the director refused the request (the message says why); 2 bad arguments;
3 not found (or not yours: an api certificate sees only its own experiments); 4 not allowed (the certificate's
role or name); 5 the director is unreachable"""


class CommandError(Exception):
    """A failure with the exit code it ends the command with."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """How to reach the director, as ``fedjax envoy start`` takes it."""
    parser.add_argument("-dh", "--director-host", default="localhost")
    parser.add_argument("-dp", "--director-port", type=port_number, default=50055)
    parser.add_argument("--disable-tls", action="store_true",
                        help="plaintext gRPC (only to a loopback address unless --allow-remote-plaintext)")
    parser.add_argument("--allow-remote-plaintext", action="store_true",
                        help="with --disable-tls, allow a director that is not on loopback")
    parser.add_argument("-rc", "--root-cert-path", help="the federation's root CA (root_ca.crt)")
    parser.add_argument("-pc", "--public-cert-path", help="this client's certificate (role api or admin)")
    parser.add_argument("-pk", "--private-key-path", help="this client's private key")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer (default 10)")


def port_number(value: str) -> int:
    """An argparse type: a TCP port, or an error that says what a port is."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {port}")
    return port


def add_parsers(sub) -> None:
    """The ``envoys``, ``experiments`` and ``audit`` subcommands of ``fedjax``."""
    epilog = EXIT_CODES
    envoys = sub.add_parser("envoys", help="the envoys registered with a director").add_subparsers(
        dest="action", required=True)
    e_list = envoys.add_parser("list", help="name, online, last seen, shard sizes, devices, running experiments",
                               epilog=epilog)
    add_connection_args(e_list)
    e_list.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    experiments = sub.add_parser("experiments", help="experiments on a director").add_subparsers(
        dest="action", required=True)
    x_list = experiments.add_parser("list", help="name, submitter, state, rounds, best metric, times", epilog=epilog)
    x_show = experiments.add_parser("show", help="the status, per-round metrics and participants, dropouts",
                                    epilog=epilog)
    x_logs = experiments.add_parser("logs", help="the experiment's events, as the notebook sees them", epilog=epilog)
    x_cancel = experiments.add_parser("cancel", help="stop a queued or running experiment", epilog=epilog)
    x_pull = experiments.add_parser("pull", help="download the best or last model as named tensors (.npz)",
                                    epilog=epilog)
    for p in (x_list, x_show, x_logs, x_cancel, x_pull):
        add_connection_args(p)
    for p in (x_show, x_logs, x_cancel, x_pull):
        p.add_argument("name", help="the experiment's name")
    for p in (x_list, x_show):
        p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    x_logs.add_argument("--follow", "-f", action="store_true", help="keep printing events until the experiment ends")
    x_logs.add_argument("--json", action="store_true", help="one JSON object per line")
    x_pull.add_argument("--which", choices=("best", "last"), default="best")
    x_pull.add_argument("--out", required=True, help="the .npz file to write (tensors named by pytree path)")
    x_pull.add_argument("--force", action="store_true", help="replace --out if it exists")

    audit = sub.add_parser("audit", help="the director's audit trail: submissions, cancellations, downloads, "
                                         "registrations, refusals", epilog=epilog)
    add_connection_args(audit)
    audit.add_argument("--since", type=_since, default=0.0,
                       help="only entries from then on: an ISO date or time (2026-12-07, 2026-12-07T09:30), "
                            "or a duration back from now (90s, 15m, 2h, 7d)")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")


def _since(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units:
        try:
            amount = float(text[:-1])
        except ValueError:
            amount = math.nan
        if math.isfinite(amount) and amount >= 0:
            return time.time() - amount * units[text[-1]]
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since {text!r}: give an ISO date or time (2026-12-07, "
                                         "2026-12-07T09:30) or a duration back from now (90s, 15m, 2h, 7d)") from None
    return moment.timestamp()  # a naive time is local time


def connect(args, client_factory: Callable | None = None):
    """A FederationClient for the connection flags; plaintext only to loopback (unless insisted on)."""
    from fedjax_core.api.client import FederationClient
    from fedjax_core.transport import TLSFiles, is_loopback

    host, port = args.director_host, args.director_port
    if args.disable_tls:
        if not args.allow_remote_plaintext and not is_loopback(host):
            raise CommandError(f"--disable-tls would talk to {host!r}, which is not a loopback address: plaintext lets "
                               "anyone on the network read and change what travels. Use mTLS (-rc/-pc/-pk with an api "
                               "or admin certificate from `fedjax pki certify`), or add --allow-remote-plaintext if "
                               "this network is trusted", BAD_ARGUMENTS)
        tls = None
    else:
        given = {"--root-cert-path": args.root_cert_path, "--public-cert-path": args.public_cert_path,
                 "--private-key-path": args.private_key_path}
        missing = [flag for flag, value in given.items() if not value]
        if missing:
            raise CommandError(f"mTLS needs {', '.join(missing)} (the federation's root_ca.crt and an api or admin "
                               "certificate and key: `fedjax pki certify --dir pki --name NAME --role api|admin`), "
                               "or --disable-tls for a director started with --disable-tls on this machine",
                               BAD_ARGUMENTS)
        for flag, value in given.items():
            if not Path(value).is_file():
                raise CommandError(f"{flag} {value}: no such file", BAD_ARGUMENTS)
        tls = TLSFiles(Path(args.root_cert_path), Path(args.public_cert_path), Path(args.private_key_path))
    return (client_factory or FederationClient)(host, port, tls, timeout_s=args.timeout)


# ------------------------------------------------------------------ the commands
def envoys_list(client, args, out: TextIO) -> int:
    now = time.time()
    entries = client.shard_registry()
    if args.json:
        _dump([{"name": e.name, "online": e.is_online, "last_seen": e.last_seen,
                "train_size": e.shard_info.train_size, "valid_size": e.shard_info.valid_size,
                "label_counts": list(e.shard_info.label_counts), "devices": list(e.shard_info.devices),
                "hostname": e.shard_info.hostname, "description": e.shard_info.description,
                "max_experiments": e.shard_info.max_experiments,
                "running": [x for x in e.current_experiment.split(", ") if x]} for e in entries], out)
        return OK
    rows = [(e.name, "yes" if e.is_online else "no", _ago(e.last_seen, now), e.shard_info.train_size,
             e.shard_info.valid_size, ", ".join(e.shard_info.devices) or "-", e.shard_info.hostname or "-",
             e.current_experiment or "-") for e in entries]
    _table(("envoy", "online", "last seen", "train", "valid", "devices", "host", "running"), rows, out,
           empty="no envoy has registered with this director")
    return OK


def experiments_list(client, args, out: TextIO) -> int:
    statuses = client.experiments()
    if args.json:
        _dump([_status_json(s) for s in statuses], out)
        return OK
    rows = [(s.name, s.submitter or "-", s.state, f"{s.current_round}/{s.rounds}", _best(s),
             _when(s.submitted_at), _when(s.started_at)) for s in statuses]
    _table(("experiment", "submitter", "state", "round", "best", "submitted", "started"), rows, out,
           empty="no experiments (an api certificate sees only its own)")
    return OK


def experiments_show(client, args, out: TextIO) -> int:
    status = client.status(args.name)
    rounds = _rounds(client.events(args.name, follow=False))
    if args.json:
        _dump({**_status_json(status), "rounds": rounds}, out)
        return OK
    fields = [("experiment", status.name), ("state", status.state), ("submitter", status.submitter or "-"),
              ("round", f"{status.current_round} of {status.rounds}"), ("best", _best(status)),
              ("envoys", ", ".join(status.envoys) or "-"), ("submitted", _when(status.submitted_at)),
              ("started", _when(status.started_at))]
    if not math.isnan(status.epsilon):
        fields.append(("privacy", f"epsilon {status.epsilon:.4g} at delta {status.delta:g}"))
    if status.error:
        fields.append(("error", status.error))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        out.write(f"{key:<{width}}  {value}\n")
    if rounds:
        out.write("\n")
        names = sorted({k for row in rounds for k in row["validation"]})[:4]
        table = [(row["round"], *[_num(row["validation"].get(n)) for n in names], _num(row["round_time_s"], "s"),
                  _size(row["bytes_uploaded"]), ", ".join(row["participants"]) or "-",
                  "; ".join(row["notes"]) or "-") for row in rounds]
        _table(("round", *[f"agg {n}" for n in names], "time", "uploaded", "participants", "notes"), table, out)
    if status.personal_validation:
        out.write("\npersonalised validation (each envoy's own personal layers)\n")
        _table(("envoy", "round", "metrics"),
               [(v.envoy, v.round, ", ".join(f"{m.name}={m.value:.4f}" for m in v.metrics))
                for v in status.personal_validation], out)
    return OK


RECONNECT_S = 120.0  # how long `logs --follow` rides out a director that restarts


def _followed(client, name: str, follow: bool, err: TextIO, sleep: Callable[[float], None] = time.sleep):
    """``name``'s events; with ``follow``, to the end, riding out a director restart as the notebook does."""
    from fedjax_core.api.client import followed_events

    if not follow:
        return client.events(name, follow=False)
    return followed_events(client, name, reconnect_s=RECONNECT_S, sleep=sleep,
                           on_retry=lambda exc: err.write(f"the director is unreachable ({exc}); reconnecting\n"))


def experiments_logs(client, args, out: TextIO, err: TextIO = sys.stderr) -> int:
    state = ""
    for event in _followed(client, args.name, args.follow, err):
        if event.experiment_done:
            state = event.state
            if not args.json:
                out.write(f"{_when(event.timestamp)}  experiment {args.name} {event.state}\n")
            continue
        if args.json:
            out.write(json.dumps(_event_json(event)) + "\n")
        else:
            out.write(_event_line(event) + "\n")
        out.flush()
    if args.follow and state in (r.State.FAILED, r.State.CANCELLED):
        status = client.status(args.name)
        raise CommandError(f"experiment {args.name!r} {state}" + (f": {status.error}" if status.error else ""),
                           FAILED)
    return OK


def experiments_cancel(client, args, out: TextIO) -> int:
    status = client.cancel(args.name)
    out.write(f"experiment {status.name!r} is {status.state}\n")
    return OK


def experiments_pull(client, args, out: TextIO) -> int:
    target = Path(args.out)
    if target.suffix != ".npz":
        raise CommandError(f"--out {args.out}: name a .npz file (numpy's savez format)", BAD_ARGUMENTS)
    if target.exists() and not args.force:
        raise CommandError(f"{target} exists; pass --force to replace it, or choose another --out", BAD_ARGUMENTS)
    if not target.parent.is_dir():
        raise CommandError(f"--out {args.out}: the folder {target.parent} does not exist", BAD_ARGUMENTS)
    tensors = client.model(args.name, args.which)
    save_npz(target, tensors)
    total = sum(a.nbytes for a in tensors.values())
    out.write(f"{args.which} model of {args.name!r}: {len(tensors)} tensors, {_size(total)} written to {target}\n")
    return OK


def save_npz(target: Path, tensors: dict[str, np.ndarray]) -> None:
    """The tensors as a ``.npz`` (what ``np.savez`` writes: one ``NAME.npy`` per tensor in a zip) under their pytree
    paths, any name kept as it is; written beside ``target`` and renamed (no half file). Types numpy cannot read back
    alone (bfloat16 and other ml_dtypes) are widened to float32 and listed in ``__dtypes__``, so
    ``np.load(..., allow_pickle=False)`` reads every array."""
    if DTYPES_ENTRY in tensors:
        raise CommandError(f"the model has a tensor named {DTYPES_ENTRY!r}, the name this file format keeps for "
                           "widened types: rename it in the model", FAILED)
    widened = {}
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".npz", dir=target.parent)
    os.close(handle)
    try:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in tensors.items():
                if array.dtype.kind == "V" or array.dtype.type.__module__.startswith("ml_dtypes"):
                    widened[name] = str(array.dtype)
                    array = array.astype(np.float32)
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            if widened:
                with archive.open(f"{DTYPES_ENTRY}.npy", "w") as member:
                    np.lib.format.write_array(member, np.array(json.dumps(widened)), allow_pickle=False)
        os.chmod(temporary, 0o644 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


DTYPES_ENTRY = "__dtypes__"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def audit(client, args, out: TextIO) -> int:
    rows = []
    for entry in client.audit(args.since):
        if args.json:
            out.write(json.dumps({"id": entry.id, "timestamp": entry.timestamp, "action": entry.action,
                                  "actor": entry.actor, "peer": entry.peer, "experiment": entry.experiment,
                                  "detail": json.loads(entry.detail or "{}")}) + "\n")
        else:
            rows.append((_when(entry.timestamp), entry.action, entry.actor or "-", entry.peer or "-",
                         entry.experiment or "-", _detail(entry.detail)))
    if not args.json:
        _table(("time", "action", "who", "from", "experiment", "detail"), rows, out,
               empty="no audit entries" + (" since then" if args.since else ""))
    return OK


HANDLERS: dict[tuple[str, str], Callable] = {
    ("envoys", "list"): envoys_list, ("experiments", "list"): experiments_list,
    ("experiments", "show"): experiments_show, ("experiments", "logs"): experiments_logs,
    ("experiments", "cancel"): experiments_cancel, ("experiments", "pull"): experiments_pull,
    ("audit", None): audit,
}


def run(args, out: TextIO = sys.stdout, err: TextIO = sys.stderr, client_factory: Callable | None = None) -> int:
    """Run one command; errors go to ``err`` as one line that says what to do, and set the exit code."""
    from fedjax_core.api.client import DirectorUnreachable

    handler = HANDLERS[(args.component, getattr(args, "action", None))]
    prog = " ".join(filter(None, ["fedjax", args.component, getattr(args, "action", None)]))
    client = None
    try:
        client = connect(args, client_factory)
        extra = {"err": err} if handler is experiments_logs else {}  # where reconnection notes go
        return handler(client, args, out, **extra)
    except CommandError as exc:
        code, message = exc.code, str(exc)
    except NotFoundError as exc:
        code, message = NOT_FOUND, str(exc)
    except PermissionDeniedError as exc:
        code, message = NOT_ALLOWED, str(exc)
    except DirectorUnreachable as exc:
        code, message = UNREACHABLE, str(exc).replace(  # the notebook's hint, in this command's flags
            "Check director_node_fqdn, director_port and that tls= matches how the director was started.",
            "Check -dh/--director-host, -dp/--director-port and that --disable-tls matches how the director was "
            "started.")
    except FedError as exc:
        code, message = FAILED, str(exc)
    except OSError as exc:
        code, message = FAILED, f"{exc.filename or ''} {exc.strerror or exc}".strip()
    except KeyboardInterrupt:
        code, message = FAILED, "interrupted"
    finally:
        if client is not None:
            client.close()
    err.write(f"{prog}: {message}\n")
    return code


# ------------------------------------------------------------------ what the commands print
def _status_json(s: r.ExperimentStatus) -> dict[str, Any]:
    return {"name": s.name, "state": s.state, "submitter": s.submitter, "current_round": s.current_round,
            "rounds": s.rounds, "envoys": list(s.envoys), "best_round": s.best_round,
            "best_metric": s.best_metric, "best_value": None if math.isnan(s.best_value) else s.best_value,
            "error": s.error, "submitted_at": s.submitted_at, "started_at": s.started_at or None,
            "epsilon": None if math.isnan(s.epsilon) else s.epsilon,
            "delta": None if math.isnan(s.delta) else s.delta,
            "participants": {str(k): list(v) for k, v in s.participants.items()},
            "personal_validation": [{"envoy": v.envoy, "round": v.round,
                                     "metrics": {f"{m.task}/{m.name}": m.value for m in v.metrics}}
                                    for v in s.personal_validation]}


def _event_json(e: r.MetricEvent) -> dict[str, Any]:
    return {"round": e.round, "envoy": e.envoy, "stage": str(e.stage), "timestamp": e.timestamp,
            "metrics": {f"{m.task}/{m.name}": m.value for m in e.metrics}, "round_time_s": e.round_time_s,
            "participants": list(e.participants), "note": e.note}


def _event_line(e: r.MetricEvent) -> str:
    metrics = " ".join(f"{m.task}/{m.name}={m.value:.4g}" for m in e.metrics)
    parts = [_when(e.timestamp), f"round {e.round}", e.envoy or "(aggregated)", str(e.stage)]
    if metrics:
        parts.append(metrics)
    if e.round_time_s:
        parts.append(f"time={e.round_time_s:.2f}s")
    if e.participants:
        parts.append(f"participants={','.join(e.participants)}")
    if e.note:
        parts.append(f"note: {e.note}")
    return "  ".join(parts)


def _rounds(events: Iterable[r.MetricEvent]) -> list[dict[str, Any]]:
    """Per round: the aggregated validation, the round's time, bytes uploaded, participants and notes."""
    rounds: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.experiment_done:
            continue
        row = rounds.setdefault(e.round, {"round": e.round, "validation": {}, "training": {}, "round_time_s": None,
                                          "bytes_uploaded": 0, "participants": [], "dropouts": [], "notes": []})
        if e.stage == r.Stage.AGGREGATED and not e.envoy:
            row["validation"].update({m.name: m.value for m in e.metrics})
        elif e.stage == r.Stage.TRAIN and not e.envoy:
            row["training"].update({m.name: m.value for m in e.metrics})
        elif e.stage == r.Stage.COMM and e.envoy:
            row["bytes_uploaded"] += int(sum(m.value for m in e.metrics if m.name == "bytes_uploaded"))
        elif e.stage == r.Stage.ROUND:
            row["round_time_s"] = e.round_time_s or None
            row["participants"] = list(e.participants)
        elif e.stage == r.Stage.DROPOUT:
            row["dropouts"].append(e.envoy)
        if e.note:
            row["notes"].append(e.note)
    return [rounds[k] for k in sorted(rounds)]


def _best(s: r.ExperimentStatus) -> str:
    if s.best_round < 0 or math.isnan(s.best_value):
        return "-"
    return f"{s.best_metric}={s.best_value:.4f} (round {s.best_round})"


def _detail(text: str) -> str:
    try:
        detail = json.loads(text or "{}")
    except ValueError:
        return text
    return " ".join(f"{k}={v if not isinstance(v, list) else ','.join(map(str, v))}" for k, v in detail.items())


def _when(timestamp: float) -> str:
    if not timestamp:
        return "-"
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _ago(timestamp: float, now: float) -> str:
    if not timestamp:
        return "never"
    seconds = max(0.0, now - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.4f}{unit}" if not unit else f"{value:.2f}{unit}"


def _size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO, empty: str = "") -> None:
    if not rows:
        if empty:
            out.write(empty + "\n")
        return
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


def _dump(document: Any, out: TextIO) -> None:
    out.write(json.dumps(document, indent=2) + "\n")
