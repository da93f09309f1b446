#!/usr/bin/env python
"""``make bench`` (second part): the time and bytes secure aggregation (SecAgg+) adds to a round.

The protocol's two state machines (``fedjax_core/secagg/protocol.py``) are played in-process, one party after
another on one core: ``n`` :class:`Client` objects (an envoy's worker each) and one :class:`Server` (the
director), a vector the size of the seed CIFAR-10 CNN's params (34,522 float32, ``--params``) plus the weight
entry the platform appends (``fedjax_core/runtime/secure_upload.py``), threshold 0.5, 32 bits, clip range 1.
Each envoy count is played once with every envoy completing the round and once with 10 % of them (at least one)
dropping after the share phase, so that the server rebuilds their mask keys and removes the pairwise masks they
left (the recovery cost). Each case is played ``--repeats`` times; times are the medians.

Time (ms of this process's CPU time: the parties run one after another on one thread, and other work on a
shared machine inflates it less than the wall clock, which is in the JSON too), per phase: advertise (the
round's setup and two key pairs; the server stores the keys), share (the server relays the neighbours' keys;
Shamir shares of two secrets, encrypted to each neighbour), mask (decrypt the incoming shares, quantise, add the self mask
and one pairwise mask per neighbour; the server adds the masked vector to its running sum), reveal/unmask (the
server says who survived; the clients reveal shares; the server rebuilds the secrets and removes the masks).
Client time is per party: the phase's time summed over the envoys, divided by n. The plain FedAvg reference
folds the survivors' float32 vectors (``plain fold``).

Bytes per envoy and round (the mean over the envoys that finished the round): what it sends (public keys
2 x 32, the encrypted shares, the masked vector at 8 bytes per entry, the revealed shares) and what it receives
(the round's participant list, its neighbours' keys, the ciphertexts its neighbours sent it, the unmask lists),
against a plain upload of 4 bytes per float32 param. Names (``env000``..) are counted as UTF-8 bytes with what
they address; protobuf and gRPC framing are not; the model download is the same with and without, so it is
not counted. In the platform each phase is also one long-poll task hand-off and one RPC per envoy (keys, shares,
masked upload, reveal: four messages where a plain round has one upload): not in these figures.

    python benchmarks/secagg.py                   # full run: 4, 16, 64 and 256 envoys, 34,522 params
    python benchmarks/secagg.py --quick           # smoke run: 4 and 8 envoys, 1,000 params, 1 repeat

Tables (markdown) go to stdout, figures to ``bench-results/secagg.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fedjax_core.secagg import protocol
from fedjax_core.secagg.protocol import Client, Server

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SEED_CNN_PARAMS = 34_522  # the seed tutorial's CIFAR-10 CNN (benchmarks/seed_cnn.py), float32
PHASES = ("advertise", "share", "mask", "reveal")
SERVER_PHASES = ("advertise", "share", "mask", "unmask")
SENT = ("keys", "shares", "masked", "reveal")
RECEIVED = ("setup", "keys", "shares", "unmask")


def machine_info() -> dict:
    """``benchmarks/bench.py``'s machine record without JAX and gRPC (this benchmark uses neither)."""
    import cryptography

    info = {"nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "numpy": np.__version__, "cryptography": cryptography.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "loadavg_at_start": list(os.getloadavg())}
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n")[0]
        info["mem_total_bytes"] = int(meminfo.split()[1]) * 1024
        info["cpu_model"] = next(line.split(":", 1)[1].strip()
                                 for line in Path("/proc/cpuinfo").read_text().splitlines()
                                 if line.startswith("model name"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return info


def names(n: int) -> list[str]:
    return [f"env{i:03d}" for i in range(n)]


def addressed(items: Mapping[str, bytes]) -> int:
    """Bytes of a name -> bytes map: each name (UTF-8) and its value."""
    return sum(len(k.encode()) + len(v) for k, v in items.items())


def listed(items: Iterable[str]) -> int:
    return sum(len(k.encode()) for k in items)


def dropouts(n: int, fraction: float, seed: int) -> list[str]:
    """``fraction`` of the envoys (at least one), drawn from ``seed``."""
    return sorted(random.Random(f"drop/{n}/{seed}").sample(names(n), max(1, round(fraction * n))))


class Stopwatch:
    """Seconds per phase: this process's CPU time (the parties run one after another on one thread; other work on a
    shared machine inflates it less than the wall clock) and the wall clock."""

    def __init__(self):
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu[phase] += time.process_time() - cpu
            self.wall[phase] += time.perf_counter() - wall


def play(n: int, params: int, dropped: Iterable[str], threshold: float, bits: int, clip: float, seed: int) -> dict:
    """One round: the seconds each side spent per phase, the bytes each envoy sent and received, the error."""
    dropped = set(dropped)
    size = params + 1  # the update and the weight entry
    context = f"bench/{n}"
    client, server_time = Stopwatch(), Stopwatch()
    sent: dict[str, Counter] = {m: Counter() for m in names(n)}
    received: dict[str, Counter] = {m: Counter() for m in names(n)}

    with server_time("advertise"):
        s = protocol.setup(context, names(n), threshold, bits, clip, size, seed)
        server = Server(s)
    clients = {}
    for m in names(n):  # advertise
        received[m]["setup"] = listed(s.participants)
        with client("advertise"):
            own = protocol.setup(context, s.participants, threshold, bits, clip, size, seed)  # each envoy derives it
            clients[m] = Client(m, own)
            keys = clients[m].advertise()
        with server_time("advertise"):
            server.add_keys(m, *keys)
        sent[m]["keys"] = sum(len(k) for k in keys)
    for m, c in clients.items():  # share
        with server_time("share"):
            keys = server.keys_for(m)
        with client("share"):
            ciphertexts = c.share(keys)
        with server_time("share"):
            server.add_shares(m, ciphertexts)
        received[m]["keys"] = sum(len(k.encode()) + len(a) + len(b) for k, (a, b) in keys.items())
        sent[m]["shares"] = addressed(ciphertexts)
    rng = np.random.default_rng(seed)
    want = np.zeros(size)
    plain = []
    for m, c in clients.items():  # mask
        if m in dropped:  # it drops after sharing
            continue
        vector = np.clip(rng.normal(0.0, 0.05, size), -clip, clip)
        want += vector
        plain.append(vector[:params].astype(np.float32))
        with server_time("mask"):
            incoming = server.shares_for(m)
        with client("mask"):
            masked = c.mask(vector, incoming)
        with server_time("mask"):
            server.add_masked(m, masked)
        received[m]["shares"] = addressed(incoming)
        sent[m]["masked"] = masked.nbytes
    for m in sorted(server.masked):  # reveal
        with server_time("unmask"):
            survivors, gone = server.unmask_request(m)
        with client("reveal"):
            shares = clients[m].reveal(survivors, gone)
        with server_time("unmask"):
            server.add_reveal(m, shares)
        received[m]["unmask"] = listed(survivors) + listed(gone)
        sent[m]["reveal"] = addressed(shares)
    with server_time("result"):
        total, survivors = server.result()
    with server_time("plain_fold"):  # the plain FedAvg fold of the same survivors' float32 updates, for reference
        folded = np.zeros(params, np.float64)
        for vector in plain:
            folded += vector

    error = float(np.abs(total - want).max())
    return {"client": client, "server": server_time, "sent": sent, "received": received,
            "survivors": list(survivors), "setup": s, "max_error": error, "error_bound": len(survivors) * s.step,
            "ok": set(survivors) == set(names(n)) - dropped and error < len(survivors) * s.step}


def timings(runs: list[dict], n: int, clock: str) -> dict:
    """Median milliseconds per phase over ``runs``: the client's per party (its total / n), the server's."""
    ms = lambda values: round(1000 * statistics.median(values), 3)  # noqa: E731
    client = [getattr(r["client"], clock) for r in runs]
    server = [getattr(r["server"], clock) for r in runs]
    unmask = [t["unmask"] + t["result"] for t in server]
    out = {"client_ms_per_party": {p: ms([t[p] / n for t in client]) for p in PHASES},
           "server_ms": {p: ms([t[p] for t in server]) for p in SERVER_PHASES[:-1]}}
    out["client_ms_per_party"]["total"] = ms([sum(t[p] for p in PHASES) / n for t in client])
    out["server_ms"]["unmask"] = ms(unmask)
    out["server_ms"]["of_which_result"] = ms([t["result"] for t in server])
    out["server_ms"]["total"] = ms([sum(t[p] for p in SERVER_PHASES[:-1]) + u for t, u in zip(server, unmask)])
    out["plain_fold_ms"] = ms([t["plain_fold"] for t in server])
    return out


def bench_case(n: int, params: int, dropped: list[str], repeats: int, threshold: float, bits: int, clip: float,
               seed: int) -> dict:
    started = time.perf_counter()
    runs = [play(n, params, dropped, threshold, bits, clip, seed + i) for i in range(repeats)]
    wall = time.perf_counter() - started
    cpu = timings(runs, n, "cpu")
    first, s = runs[0], runs[0]["setup"]
    finished = first["survivors"]
    degree = protocol.degree(n)
    mean = lambda counters, key: statistics.fmean(counters[m][key] for m in finished)  # noqa: E731
    sent = {k: mean(first["sent"], k) for k in SENT}
    sent["total"] = sum(sent.values())
    received = {k: mean(first["received"], k) for k in RECEIVED}
    received["total"] = sum(received.values())
    plain_upload = 4 * params
    share_phase = sent["shares"] + received["keys"] + received["shares"]  # what the neighbourhood costs
    per_neighbour = share_phase / degree
    relayed = sum(first["sent"][m]["shares"] for m in names(n))  # every ciphertext passes the director once
    return {
        "n": n, "degree": degree, "n_minus_1": n - 1, "threshold": s.threshold, "params": params, "size": s.size,
        "dropped": dropped, "dropped_count": len(dropped), "repeats": repeats,
        "time": "CPU", **cpu, "wall_clock": timings(runs, n, "wall"),
        "bytes_per_envoy": {"sent": sent, "received": received, "plain_upload": plain_upload,
                            "sent_over_plain": sent["total"] / plain_upload,
                            "added": sent["total"] + received["total"] - plain_upload,
                            "share_phase": share_phase, "share_phase_per_neighbour": per_neighbour,
                            "share_phase_if_every_other_envoy": per_neighbour * (n - 1)},
        "bytes_of_dropped_envoy": ({"sent": dict(first["sent"][dropped[0]]),
                                    "received": dict(first["received"][dropped[0]])} if dropped else None),
        "director_bytes": {"in": sum(sum(c.values()) for c in first["sent"].values()),
                           "out": sum(sum(c.values()) for c in first["received"].values()),
                           "shares_relayed": relayed, "shares_relayed_if_every_other_envoy":
                           round(relayed / degree * (n - 1))},
        "max_error": max(r["max_error"] for r in runs), "error_bound": first["error_bound"],
        "ok": all(r["ok"] for r in runs), "wall_s": round(wall, 3),
    }


def fmt(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{int(value):,}"


def markdown(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---:" for _ in headers) + " |"]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def report(results: dict) -> str:
    m, cfg, cases = results["machine"], results["config"], results["cases"]
    out = [f"Machine: {m['nproc']} CPUs ({m.get('cpu_model', '?')}), Python {m['python']}, numpy {m['numpy']}, "
           f"cryptography {m['cryptography']}; load average {m['loadavg_at_start'][0]:.1f} at start, "
           f"{m.get('loadavg_at_end', [float('nan')])[0]:.1f} at end",
           f"SecAgg+ in-process, {cfg['params']:,} float32 params (+1 weight entry), threshold {cfg['threshold']}, "
           f"{cfg['bits']} bits, median of {cfg['repeats']} rounds per row; 'dropped': envoys that leave after "
           "sharing"]
    rows = []
    for c in cases:
        cl, sv = c["client_ms_per_party"], c["server_ms"]
        rows.append([c["n"], c["degree"], c["n_minus_1"], c["dropped_count"], *(cl[p] for p in PHASES), cl["total"],
                     *(sv[p] for p in SERVER_PHASES), sv["total"], c["plain_fold_ms"]])
    out.append("\n1. CPU time (ms): client per party (the envoys' total / n), server (the director) per round")
    out.append(markdown(["envoys", "neighbours", "n-1", "dropped", "client advertise", "client share",
                         "client mask", "client reveal", "client total", "server advertise", "server share",
                         "server mask", "server unmask", "server total", "plain fold"], rows))
    rows = []
    for c in cases:
        b = c["bytes_per_envoy"]
        rows.append([c["n"], c["degree"], c["dropped_count"], *(b["sent"][k] for k in SENT), b["sent"]["total"],
                     b["plain_upload"], f"{b['sent_over_plain']:.2f}x", *(b["received"][k] for k in RECEIVED),
                     b["received"]["total"], b["added"]])
    out.append("\n2. Bytes per envoy per round (mean over the envoys that finished), against a plain float32 upload")
    out.append(markdown(["envoys", "neighbours", "dropped", "keys sent", "shares sent", "masked sent",
                         "reveal sent", "sent", "plain upload", "sent/plain", "setup recv", "keys recv",
                         "shares recv", "unmask recv", "received", "added (sent+recv-plain)"], rows))
    rows = []
    for c in cases:
        if c["dropped_count"]:
            continue
        b, d = c["bytes_per_envoy"], c["director_bytes"]
        rows.append([c["n"], c["degree"], c["n_minus_1"], c["threshold"], b["share_phase"],
                     b["share_phase_per_neighbour"], b["share_phase_if_every_other_envoy"], d["shares_relayed"],
                     d["shares_relayed_if_every_other_envoy"]])
    out.append("\n3. The share phase grows with the neighbourhood (degree(n)), not with n: bytes per envoy "
               "(keys received + shares sent and received) and shares the director relays per round")
    out.append(markdown(["envoys", "neighbours", "n-1", "threshold", "share phase / envoy", "per neighbour",
                         "if all n-1 were neighbours", "director relays", "if all n-1"], rows))
    bad = [c["n"] for c in cases if not c["ok"]]
    out.append(f"\nUnmasked sums {'all within' if not bad else 'NOT within (n = ' + str(bad) + ')'} "
               "survivors x step of the survivors' float sum.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 and 8 envoys, 1,000 params, 1 repeat")
    parser.add_argument("--envoys", type=int, nargs="+", help="envoy counts (default 4 16 64 256; --quick 4 8)")
    parser.add_argument("--params", type=int, help=f"float32 params per update (default {SEED_CNN_PARAMS:,}, the "
                                                   "seed CIFAR-10 CNN; --quick 1,000)")
    parser.add_argument("--repeats", type=int, help="rounds per case; times are medians (default 3; --quick 1)")
    parser.add_argument("--drop-fraction", type=float, default=0.1,
                        help="envoys (at least one) that drop after sharing in each envoy count's second case")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--clip-range", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench-results" / "secagg.json"), help="JSON results path")
    args = parser.parse_args(argv)
    envoys = args.envoys or ([4, 8] if args.quick else [4, 16, 64, 256])
    params = args.params or (1000 if args.quick else SEED_CNN_PARAMS)
    repeats = args.repeats or (1 if args.quick else 3)
    if min(envoys) < 2 or params < 1 or repeats < 1:
        parser.error("every envoy count must be at least 2, --params and --repeats at least 1")

    started = time.perf_counter()
    print(f"secure aggregation benchmark ({'quick' if args.quick else 'full'}): {params:,} params, envoys "
          f"{envoys}, {repeats} repeat(s)", flush=True)
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(f"  note: load average {load:.1f} on {cpus} CPUs: other work is running, timings will be noisy",
              flush=True)
    results: dict = {"quick": args.quick, "machine": machine_info(), "config": {
        "envoys": envoys, "params": params, "size": params + 1, "repeats": repeats,
        "drop_fraction": args.drop_fraction, "threshold": args.threshold, "bits": args.bits,
        "clip_range": args.clip_range, "seed": args.seed, "names": "env000, env001, ..."}, "cases": []}
    play(4, params, dropouts(4, args.drop_fraction, args.seed), args.threshold, args.bits,
         args.clip_range, args.seed)  # warm-up: first calls into numpy, cryptography and OpenSSL, not measured
    for n in envoys:
        for dropped in ([], dropouts(n, args.drop_fraction, args.seed)):
            case = bench_case(n, params, dropped, repeats, args.threshold, args.bits, args.clip_range, args.seed)
            results["cases"].append(case)
            print(f"  n={n:<4} neighbours={case['degree']:<3} dropped={len(dropped):<3} client "
                  f"{case['client_ms_per_party']['total']:.1f} ms/party, server {case['server_ms']['total']:.1f} ms, "
                  f"{case['bytes_per_envoy']['sent']['total']:,.0f} B sent/envoy ({case['wall_s']:.1f} s)",
                  flush=True)
    results["total_wall_s"] = round(time.perf_counter() - started, 3)
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    print()
    print(report(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {out} ({results['total_wall_s']:.0f} s in all)")
    return 0 if all(c["ok"] for c in results["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
