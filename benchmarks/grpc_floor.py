#!/usr/bin/env python
"""``make bench-grpc-floor``: what one gRPC round trip costs a bare server on this machine, the floor under
the director's CPU per envoy and round.

A bare ``grpc.aio`` server (the director's event loop and server options, an echo handler that does
nothing) in one process, and N client connections (each its own TCP connection, as envoys have) in
another. Each connection makes one round trip every ``--period`` seconds, spread evenly, as envoys'
heartbeats and tasks arrive; a round trip is a unary call, one message each way on an open
bidirectional stream, or a client stream of two messages and its answer (an upload's shape: header, chunk). A last case drives 8 connections back to back, to show how much cheaper a call is
on a busy server (its threads never go to sleep between calls).

Measured: the server process's CPU seconds (user + system, all its threads) over the client's run,
divided by the round trips made. A director round with a small model costs each envoy about three round
trips (WaitTask, UploadUpdate's header and chunk, and a heartbeat every health-check period), so three
times the first figure is the CPU per envoy-round that gRPC alone takes here before the director does
any work of its own.

    python benchmarks/grpc_floor.py            # 256 connections, one round trip per 2 s each, 3 repeats
    python benchmarks/grpc_floor.py --quick    # smoke run

Figures go to stdout and to ``bench-results/grpc_floor.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import grpc

from fedjax_core.director.server import new_event_loop
from fedjax_core.local import Process, free_port
from fedjax_core.transport import SERVER_OPTIONS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import table  # noqa: E402
from scale import OWN_CONNECTION, cpu_seconds  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SERVICE, UNARY, STREAM, UPLOAD = "floor.Echo", "Once", "Many", "Upload"
PAYLOAD = b"x" * 64  # about a heartbeat's size
BUSY_CONNECTIONS = 8


# ============================================================================ the server (child mode)
def serve(port: int) -> None:
    async def once(request: bytes, context) -> bytes:
        return request

    async def upload(requests, context) -> bytes:
        return b"".join([request async for request in requests])[:len(PAYLOAD)]

    async def many(requests, context):
        async for request in requests:
            yield request

    async def main() -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            UNARY: grpc.unary_unary_rpc_method_handler(once),
            UPLOAD: grpc.stream_unary_rpc_method_handler(upload),
            STREAM: grpc.stream_stream_rpc_method_handler(many)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("SERVING", flush=True)
        await server.wait_for_termination()

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(main())


# ============================================================================ the clients (child mode)
async def drive(port: int, kind: str, connections: int, period: float, seconds: float) -> int:
    """Round trips made by ``connections`` clients, each one per ``period`` (0: back to back), for ``seconds``."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) for _ in range(connections)]
    if kind == "stream":
        calls = [channel.stream_stream(f"/{SERVICE}/{STREAM}")() for channel in channels]

        async def trip(i: int) -> None:
            await calls[i].write(PAYLOAD)
            await calls[i].read()
    elif kind == "upload":
        uploads = [channel.stream_unary(f"/{SERVICE}/{UPLOAD}") for channel in channels]

        async def trip(i: int) -> None:
            await uploads[i](iter((PAYLOAD, PAYLOAD)))
    else:
        stubs = [channel.unary_unary(f"/{SERVICE}/{UNARY}") for channel in channels]

        async def trip(i: int) -> None:
            await stubs[i](PAYLOAD)

    await asyncio.gather(*(trip(i) for i in range(connections)))  # connected, and every stream open
    print("CONNECTED", flush=True)  # the parent starts its clock on this line
    made = 0

    async def client(i: int) -> None:
        nonlocal made
        await asyncio.sleep(i * period / connections)  # spread over the period, as envoys' calls are
        end = time.monotonic() + seconds
        while (start := time.monotonic()) < end:
            await trip(i)
            made += 1
            await asyncio.sleep(max(0.0, period - (time.monotonic() - start)))

    await asyncio.gather(*(client(i) for i in range(connections)))
    if kind == "stream":
        for call in calls:
            await call.done_writing()
    for channel in channels:
        await channel.close()
    return made


# ============================================================================ the parent
def measure(port: int, server_pid: int, kind: str, connections: int, period: float, seconds: float) -> dict:
    clients = Process([sys.executable, "-u", __file__, "--clients", str(port), kind, str(connections), str(period),
                       str(seconds)], cwd=REPO, name="clients")
    try:
        clients.wait_for("^CONNECTED$", timeout=60 + connections / 4)
        before = cpu_seconds(server_pid)
        made = int(clients.wait_for(r"^MADE (\d+)$", timeout=seconds + 60).group(1))
        spent = cpu_seconds(server_pid) - before
    finally:
        clients.stop()
    return {"round_trips": made, "server_cpu_s": spent, "us_per_round_trip": 1e6 * spent / made if made else None}


def cases(args: argparse.Namespace) -> list[tuple[str, str, int, float]]:
    """(label, kind, connections, period)"""
    n = args.connections
    return [(f"unary, {n} connections, 1 per {args.period:g} s each", "unary", n, args.period),
            (f"stream message, {n} connections, 1 per {args.period:g} s each", "stream", n, args.period),
            (f"client stream of 2 messages (an upload's shape), {n} connections, 1 per {args.period:g} s each",
             "upload", n, args.period),
            (f"unary, {BUSY_CONNECTIONS} connections back to back", "unary", BUSY_CONNECTIONS, 0.0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, help="client connections (default 256; --quick 16)")
    parser.add_argument("--period", type=float, default=2.0, help="seconds between one connection's round trips")
    parser.add_argument("--seconds", type=float, help="how long each case runs (default 10; --quick 2)")
    parser.add_argument("--repeats", type=int, help="runs of each case, alternated (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 connections, 2 s, once")
    parser.add_argument("--out", default=str(REPO / "bench-results" / "grpc_floor.json"), help="JSON results path")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--clients", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    if args.clients is not None:
        port, kind, connections, period, seconds = args.clients
        loop = new_event_loop()
        print(f"MADE {loop.run_until_complete(drive(int(port), kind, int(connections), float(period), float(seconds)))}",
              flush=True)
        return 0
    args.connections = args.connections or (16 if args.quick else 256)
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.connections < 1 or args.seconds <= 0 or args.period <= 0 or args.repeats < 1:
        parser.error("--connections and --repeats must be at least 1, --seconds and --period above 0")

    port = free_port()
    server = Process([sys.executable, "-u", __file__, "--serve", str(port)], cwd=REPO, name="server")
    runs: dict[str, list[dict]] = {label: [] for label, *_ in cases(args)}
    try:
        server.wait_for("^SERVING$", timeout=60)
        for _ in range(args.repeats):  # alternated, so a noisy minute touches every case
            for label, kind, connections, period in cases(args):
                runs[label].append(measure(port, server.proc.pid, kind, connections, period, args.seconds))
    finally:
        server.stop()
    rows, results = [], {"config": {k: v for k, v in vars(args).items() if k not in ("serve", "clients")},
                         "grpcio": grpc.__version__, "cases": {}}
    for label, measured in runs.items():
        per_trip = [m["us_per_round_trip"] for m in measured if m["us_per_round_trip"] is not None]
        median = statistics.median(per_trip) if per_trip else None
        results["cases"][label] = {"runs": measured, "us_per_round_trip_median": median}
        rows.append([label, sum(m["round_trips"] for m in measured),
                     f"{median:.0f}" if median is not None else "-", " / ".join(f"{x:.0f}" for x in per_trip)])
    print(f"Bare grpc.aio server (grpcio {grpc.__version__}), server CPU per round trip, {args.repeats} run(s) of "
          f"{args.seconds:g} s each:")
    print(table(["case", "round trips", "median us", "each run us"], rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
