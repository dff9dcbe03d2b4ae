"""Tracer overhead: loopback request/response rate with and without the tracer, in one run.

Run as root: ``.venv/bin/python benchmarks/tracer_overhead.py [--seconds 2] [--rounds 3]``.

Two workloads on 127.0.0.1, each with a server process and a client process:

- ``persistent``: one connection, 64-byte request / 64-byte reply in a loop.  Every
  recvmsg runs the tp_btf ``sock_recv_length`` program (its per-socket dedup lookup);
  no ring buffer traffic after the first receive.
- ``churn``: a new connection per request (connect, request, reply, close).  Every
  connection produces lifecycle events, receive-path events and map checks in the
  consumer: the tracer's worst case per request.

The tracer runs in its own process, configured exactly as ``sockguard run`` runs it
(failed updates only, CLOSE/destroy only, tcp_recvmsg receives only, map checks on the
discovered maps).  Rounds alternate baseline / traced so drift hits both; the median
of each is compared.  Target: under 2 % loss.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from multiprocessing.synchronize import Event as EventT

PAYLOAD = b"x" * 64


def _server(kind: str, port_q: mp.Queue, stop: EventT) -> None:  # type: ignore[type-arg]
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen(128)
    lst.settimeout(0.5)
    port_q.put(lst.getsockname()[1])
    while not stop.is_set():
        try:
            conn, _ = lst.accept()
        except TimeoutError:
            continue
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = conn.recv(64)
                if not data:
                    break
                conn.sendall(data)
                if kind == "churn":
                    break


def _client(kind: str, port: int, seconds: float) -> int:
    done = 0
    deadline = time.perf_counter() + seconds
    if kind == "persistent":
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while time.perf_counter() < deadline:
                s.sendall(PAYLOAD)
                got = 0
                while got < len(PAYLOAD):
                    got += len(s.recv(64))
                done += 1
        return done
    while time.perf_counter() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(PAYLOAD)
            got = 0
            while got < len(PAYLOAD):
                chunk = s.recv(64)
                if not chunk:
                    break
                got += len(chunk)
        done += 1
    return done


def _consumer() -> int:
    """The tracer as the daemon runs it, until SIGTERM; prints its detections first."""
    from sockguard import maps as maps_adapter
    from sockguard.tracer import MapWatch, Tracer, TracerOptions, attached_detections

    stop = False

    def on_term(_s: int, _f: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    events = 0

    def count(_ev: object) -> None:
        nonlocal events
        events += 1

    watch = MapWatch(lambda: maps_adapter.discover_maps())
    options = TracerOptions(failures_only=True, closes_only=True, only_tcp_recvmsg=True)
    with Tracer(count, options, watch) as tracer:
        print(attached_detections(tracer.start()), flush=True)
        while not stop:
            tracer.poll(250)
    print(f"events {events}", flush=True)
    return 0


def _rate(kind: str, seconds: float) -> float:
    ctx = mp.get_context("fork")
    port_q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    stop = ctx.Event()
    srv = ctx.Process(target=_server, args=(kind, port_q, stop), daemon=True)
    srv.start()
    port = port_q.get(timeout=10)
    with ctx.Pool(1) as pool:
        done = pool.apply(_client, (kind, port, seconds))
    stop.set()
    srv.join(5)
    return done / seconds


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per round (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per mode (default 3)")
    ap.add_argument("--consumer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kinds", nargs="+", default=["persistent", "churn"],
                    choices=["persistent", "churn"], help="workloads (default both)")
    args = ap.parse_args(argv)
    if args.consumer:
        return _consumer()
    if os.geteuid() != 0:
        print("tracer_overhead: needs root to load the tracer", file=sys.stderr)
        return 2
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, {args.rounds} x "
          f"{args.seconds:g} s per mode")
    results: dict[str, dict[str, list[float]]] = {}
    for kind in args.kinds:
        res: dict[str, list[float]] = {"baseline": [], "traced": []}
        for _ in range(args.rounds):
            res["baseline"].append(_rate(kind, args.seconds))
            tracer = subprocess.Popen([sys.executable, __file__, "--consumer"],
                                      stdout=subprocess.PIPE, text=True)
            assert tracer.stdout is not None
            banner = tracer.stdout.readline().strip()
            try:
                res["traced"].append(_rate(kind, args.seconds))
            finally:
                tracer.send_signal(signal.SIGTERM)
                tail = tracer.communicate(timeout=30)[0].strip()
            if len(results) == 0 and len(res["traced"]) == 1:
                print(f"tracer: {banner}")
            res.setdefault("events", []).append(float(tail.split()[-1]) if tail else 0.0)
        results[kind] = res
    print(f"{'workload':<11} {'baseline req/s':>15} {'traced req/s':>13} {'ratio':>7} "
          f"{'loss':>7} {'events/round':>13}")
    for kind, res in results.items():
        base, traced = statistics.median(res["baseline"]), statistics.median(res["traced"])
        ratio = traced / base if base else float("nan")
        print(f"{kind:<11} {base:>15.0f} {traced:>13.0f} {ratio:>7.3f} "
              f"{(1 - ratio) * 100:>6.2f}% {statistics.median(res['events']):>13.0f}")
        print(f"{'':<11} rounds: baseline {[round(x) for x in res['baseline']]}, "
              f"traced {[round(x) for x in res['traced']]}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
