"""Tracer overhead: loopback request/response rate with and without the tracer, in one run.

Run as root: ``.venv/bin/python benchmarks/tracer_overhead.py [--seconds 2] [--rounds 5]
[--pairs 20]``.

Two workloads on 127.0.0.1, each with a server process and a client process, both
pinned to one CPU (``--pin``, default the last CPU): the ping-pong then keeps that CPU
busy and its rate is the inverse of its CPU time per request.  Unpinned, on an idle VM
the rate follows the wake-up latency of halted vCPUs instead, and anything keeping a CPU
busy (a tracer consumer burning CPU included) made it *faster*.

- ``persistent``: one connection, 64-byte request / 64-byte reply in a loop.  Every
  recvmsg runs the tp_btf ``sock_recv_length`` program.
- ``churn``: a new connection per request (connect, request, reply, close).  Every
  connection runs the receive-path and lifecycle programs for both sockets.

Four modes, alternating within each round so drift hits all of them; medians compared:

- ``baseline``: no tracer.
- ``unfiltered``: the daemon's configuration without the kernel-side filter (every
  ``tcp_recvmsg`` socket and every death reaches the Python consumer).
- ``daemon``: the tracer exactly as ``sockguard run`` starts it
  (``tracer.daemon_options()``: failed updates only, deaths only, ``tcp_recvmsg`` only,
  filtered in the kernel by the watched set) on a realistic audited map: a sockhash of
  ``--keys`` (default 3,000) Cilium keys of other tuples, none of the benchmark's.
- ``worst``: the same, but the map also holds the keys of every connection the
  benchmark can make (each ephemeral client port, both directions): every socket's
  recv and death reach userspace and are checked against the map.

Columns: the rate and its loss against baseline; ``CPU/req``, the client's and server's
CPU time per request (plus the consumer's), and ``CPU+`` its increase; ``tracer CPU``,
the consumer's CPU time plus the programs' run time (``kernel.bpf_stats_enabled``, set
for the run and restored; ``--no-stats`` leaves it off) as a share of the round's CPU
time.  The programs' run time leaves out the tracepoint's own dispatch.

``--pairs N`` then measures the target directly: one daemon-mode consumer runs
throughout, and its programs are detached and attached again (SIGUSR1/SIGUSR2) for
each half of N pairs of ``--seconds`` each, order alternating; the loss is each pair's
rate ratio, reported as median and mean with its standard error and 95 % interval.
Pairs cancel drift that rounds of whole modes do not.  Target: under 2 % loss in
``daemon`` mode, at the interval's upper bound.

``--idle-pairs N`` measures N more pairs with the collision check idle: the daemon
detaches its ``inet_sock_set_state`` program once an audit has proved every entry of
the audited maps owned (``tracer.collision_check = auto``), as on a healthy node.
``--pairs`` keeps it listening, as until then or after an entry went bad.

``--floor N`` measures N more pairs the same way with ``tracepoint_floor.bpf.c``:
programs that return at once, at the tracepoints the daemon's tracer uses.  Their
loss is the tracepoints' own dispatch (the call into the program and back, through
this kernel's retpolines and return thunks), the part no program body can remove.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from multiprocessing.synchronize import Event as EventT
from pathlib import Path
from typing import Any

PAYLOAD = b"x" * 64
HERE = Path(__file__).resolve().parent


MODES = ("baseline", "unfiltered", "daemon", "worst")
LOOPBACK = IPv4Address("127.0.0.1")
PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


#: CPUs the client and server run on (--pin); empty: wherever the scheduler puts them.
WORKLOAD_CPUS: set[int] = set()


def _pin() -> None:
    if WORKLOAD_CPUS:
        os.sched_setaffinity(0, WORKLOAD_CPUS)


def _server(kind: str, port: int, port_q: mp.Queue, stop: EventT) -> None:  # type: ignore[type-arg]
    _pin()
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", port))
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
    _pin()
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


def _set_attached(tracer: Any, attached: bool, names: list[tuple[Any, str]],
                  listening: bool) -> None:
    """Destroy every link of the tracer, or attach its loaded programs again; the
    collision check's program as the daemon's gate would have it (``listening``)."""
    if attached:
        for loaded, name in names:
            loaded.links.append(loaded.obj.program(name).attach())
        tracer.listen_for_collisions(listening)
        return
    tracer.listen_for_collisions(False)
    for loaded in tracer._loaded:
        for link in loaded.links:
            link.destroy()
        loaded.links = []


def _loaded_programs(tracer: Any) -> list[tuple[Any, str]]:
    """(loaded object, program name) of every program the tracer loaded and attached
    for good (not the collision check's, which ``listen_for_collisions`` attaches)."""
    from sockguard.trace.detections import PROGRAMS

    gated = {g.name for g in tracer._gated}
    out: list[tuple[Any, str]] = []
    for loaded in tracer._loaded:
        for variants in PROGRAMS.values():
            for progs in variants.values():
                for name in progs:
                    if name in gated:
                        continue
                    try:
                        if loaded.obj.program(name).fd >= 0:
                            out.append((loaded, name))
                    except (OSError, ValueError):
                        continue  # not in this object, or not loaded
    return out


class _Switch:
    """A consumer's signals: SIGTERM stops it, SIGUSR1 detaches, SIGUSR2 attaches again.

    ``attached``: whether the consumer's programs are attached (they start so)."""

    def __init__(self) -> None:
        self.stop = False
        self.attached = True
        self.want: bool | None = None
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGUSR1, self._on_toggle)
        signal.signal(signal.SIGUSR2, self._on_toggle)

    def _on_term(self, _s: int, _f: object) -> None:
        self.stop = True

    def _on_toggle(self, signum: int, _f: object) -> None:
        self.want = signum == signal.SIGUSR2

    def serve(self, set_attached: Callable[[bool], None]) -> None:
        """Act on a pending toggle and answer it with a line on stdout (``_paired`` waits)."""
        if self.want is None:
            return
        if self.want != self.attached:
            set_attached(self.want)
            self.attached = self.want
        print("attached" if self.want else "detached", flush=True)
        self.want = None


def _consumer(map_id: int, filtered: bool, listening: bool) -> int:
    """The tracer as the daemon runs it, until SIGTERM; prints its detections first.

    ``listening``: the collision check attached, as the daemon has it until an audit
    proves every entry owned; else detached, as on a node whose maps are healthy.
    SIGUSR1 detaches its programs and SIGUSR2 attaches them again (the paired
    measurement); it answers each with a line on stdout once done.
    """
    from dataclasses import replace

    from sockguard.kernel.maps import resolve_map
    from sockguard.trace.tracer import Tracer, attached_detections, daemon_options
    from sockguard.trace.watched import MapWatch

    switch = _Switch()
    events = 0

    def count(_ev: object) -> None:
        nonlocal events
        events += 1

    watch = MapWatch(lambda: [resolve_map(f"id:{map_id}")])
    options = replace(daemon_options(), filter_watched=filtered)
    with Tracer(count, options, watch) as tracer:
        detections = tracer.start()
        tracer.listen_for_collisions(listening)
        print(attached_detections(detections) + "; collision check "
              + ("listening" if tracer.listening else "idle"), flush=True)
        programs = _loaded_programs(tracer)
        cpu0 = _cpu_self()
        while not switch.stop:
            switch.serve(lambda want: _set_attached(tracer, want, programs, listening))
            tracer.poll(50)
        cpu = _cpu_self() - cpu0
        runs = _bpf_runs(tracer)
        bpf_ns = sum(ns for _, ns in runs.values())
        w = tracer.watched
        extra = (f" watched {len(w.keys)} refreshes {w.refreshes} last_refresh_s "
                 f"{w.last_seconds:.4f}" if w else "")
    per_prog = " ".join(f"{name}={cnt}x{ns // max(cnt, 1)}ns"
                        for name, (cnt, ns) in sorted(runs.items()))
    print(f"events {events} cpu_s {cpu:.4f} bpf_s {bpf_ns / 1e9:.4f}{extra} [{per_prog}]",
          flush=True)
    return 0


def _floor_consumer(path: str) -> int:
    """``tracepoint_floor.bpf.o`` attached until SIGTERM, toggled as ``_consumer`` is."""
    from sockguard.kernel.bpf_object import load

    switch = _Switch()
    with load(Path(path)) as obj:
        programs = [obj.program(name) for name in obj.program_names()]
        links = [prog.attach() for prog in programs]
        print("floor: " + ", ".join(obj.program_names()), flush=True)

        def set_attached(want: bool) -> None:
            nonlocal links
            if want:
                links = [prog.attach() for prog in programs]
            else:
                for link in links:
                    link.destroy()
                links = []

        while not switch.stop:
            switch.serve(set_attached)
            time.sleep(0.05)
        for link in links:
            link.destroy()
    print("floor done", flush=True)
    return 0


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _bpf_runs(tracer: Any) -> dict[str, tuple[int, int]]:
    """(runs, run time in ns) per tracer program (kernel.bpf_stats_enabled = 1 during the run)."""
    from sockguard.kernel import libbpf

    runs: dict[str, tuple[int, int]] = {}
    gated = [(g.loaded, g.name) for g in tracer._gated]
    for loaded, name in _loaded_programs(tracer) + gated:
        info = libbpf.prog_info(loaded.obj.program(name).fd)
        if info.run_cnt:
            runs[name] = (info.run_cnt, info.run_time_ns)
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Maps:
    """The audited maps of the ``daemon`` and ``worst`` modes, and the socket they hold."""

    def __init__(self, other_keys: int, server_port: int) -> None:
        from sockguard.core.layout import CILIUM, encode
        from sockguard.kernel import libbpf

        self.lst = socket.socket()
        self.lst.bind(("127.0.0.1", 0))
        self.lst.listen(1)
        self.a = socket.create_connection(self.lst.getsockname())
        self.b, _ = self.lst.accept()
        fd = struct.pack("i", self.b.fileno())
        self.fds: list[int] = []
        others = [encode(CILIUM, 4, IPv4Address(0x0A000000 + i // 200 + 1), 30000 + i % 200,
                         IPv4Address(0x0A010000 + i % 251 + 1), 8080) for i in range(other_keys)]
        lo, hi = (int(x) for x in PORT_RANGE.read_text().split())
        own = [k for e in range(lo, hi + 1)
               for k in (encode(CILIUM, 4, LOOPBACK, e, LOOPBACK, server_port),
                         encode(CILIUM, 4, LOOPBACK, server_port, LOOPBACK, e))]
        self.ids: dict[str, int] = {}
        for mode, keys in (("daemon", others), ("worst", others + own)):
            mfd = libbpf.map_create(libbpf.BPF_MAP_TYPE_SOCKHASH, "bench_sock_ops", CILIUM.size,
                                    4, max(65536, len(keys)))
            self.fds.append(mfd)
            for key in keys:
                libbpf.map_update(mfd, key, fd)
            self.ids[mode] = libbpf.map_info(mfd).id
        self.sizes = {"daemon": len(others), "worst": len(others) + len(own)}

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for s in (self.a, self.b, self.lst):
            s.close()


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _rate(kind: str, seconds: float, server_port: int) -> tuple[float, float]:
    """(requests per second, CPU seconds of client and server)."""
    cpu0 = _children_cpu()
    ctx = mp.get_context("fork")
    port_q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    stop = ctx.Event()
    srv = ctx.Process(target=_server, args=(kind, server_port, port_q, stop), daemon=True)
    srv.start()
    port = port_q.get(timeout=10)
    with ctx.Pool(1) as pool:
        done = pool.apply(_client, (kind, port, seconds))
    stop.set()
    srv.join(5)
    return done / seconds, _children_cpu() - cpu0


def _traced_rate(kind: str, seconds: float, port: int, map_id: int,
                 filtered: bool) -> tuple[tuple[float, float], str, str]:
    """((rate, workload CPU), banner, consumer's last line), the tracer in its own process."""
    tracer = subprocess.Popen([sys.executable, __file__, "--consumer", str(map_id),
                               "1" if filtered else "0", "1"], stdout=subprocess.PIPE, text=True)
    assert tracer.stdout is not None
    banner = tracer.stdout.readline().strip()
    try:
        rate = _rate(kind, seconds, port)
    finally:
        tracer.send_signal(signal.SIGTERM)
        tail = tracer.communicate(timeout=60)[0].strip()
    return rate, banner, tail


def _paired(kind: str, seconds: float, port: int, consumer: list[str],
            pairs: int) -> tuple[list[float], list[float], str]:
    """Rates with a consumer's programs attached / detached, in pairs, one consumer.

    ``consumer``: this script's arguments that start it (the daemon's tracer,
    or the floor's programs).  The same process runs throughout (for the
    tracer: its refreshes and wake-ups in both halves); only the programs'
    links come and go.  Each pair's order alternates.  Returns each pair's
    attached/detached ratios of the rate and of the client's and server's CPU
    time per request, and the consumer's last line.
    """
    tracer = subprocess.Popen([sys.executable, __file__, *consumer],
                              stdout=subprocess.PIPE, text=True)
    assert tracer.stdout is not None
    tracer.stdout.readline()  # the banner: what is attached

    def switch(attached: bool) -> None:
        assert tracer.stdout is not None
        tracer.send_signal(signal.SIGUSR2 if attached else signal.SIGUSR1)
        want = "attached" if attached else "detached"
        line = tracer.stdout.readline().strip()
        if line != want:
            raise RuntimeError(f"consumer answered {line!r}, not {want!r}")

    ratios: list[float] = []
    cpu_ratios: list[float] = []
    try:
        for i in range(pairs):
            rates: dict[bool, float] = {}
            per_req: dict[bool, float] = {}
            for attached in ((True, False) if i % 2 else (False, True)):
                switch(attached)
                rate, cpu = _rate(kind, seconds, port)
                rates[attached], per_req[attached] = rate, cpu / (rate * seconds)
            ratios.append(rates[True] / rates[False])
            cpu_ratios.append(per_req[True] / per_req[False])
    finally:
        switch(True)  # the consumer's run-time figures include attached time only
        tracer.send_signal(signal.SIGTERM)
        tail = tracer.communicate(timeout=60)[0].strip()
    return ratios, cpu_ratios, tail


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per round (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per mode (default 3)")
    ap.add_argument("--keys", type=int, default=3000,
                    help="other tuples' keys in the audited map (default 3000)")
    ap.add_argument("--consumer", nargs=3, metavar=("MAP_ID", "FILTERED", "LISTENING"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--floor-consumer", metavar="OBJECT", help=argparse.SUPPRESS)
    ap.add_argument("--kinds", nargs="+", default=["persistent", "churn"],
                    choices=["persistent", "churn"], help="workloads (default both)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="modes (default all)")
    ap.add_argument("--pairs", type=int, default=20,
                    help="also measure the daemon's loss in this many attached/detached "
                         "pairs of --seconds each, one consumer process throughout, its "
                         "collision check listening (an audited map not proven healthy)")
    ap.add_argument("--idle-pairs", type=int, default=0, metavar="PAIRS",
                    help="the same with the collision check idle, as the daemon runs once "
                         "an audit proved every entry owned (tracer.collision_check = auto)")
    ap.add_argument("--floor", type=int, default=0, metavar="PAIRS",
                    help="also measure, in this many pairs, programs that return at once at "
                         "the same tracepoints (benchmarks/tracepoint_floor.bpf.c): the "
                         "tracepoints' own dispatch, which no program body removes")
    last_cpu = max(os.sched_getaffinity(0))
    ap.add_argument("--pin", type=int, nargs="+", metavar="CPU", default=[last_cpu],
                    help=f"CPUs of client and server (default {last_cpu}; see --no-pin)")
    ap.add_argument("--no-pin", dest="pin", action="store_const", const=[],
                    help="let the scheduler place client and server")
    ap.add_argument("--no-stats", dest="stats", action="store_false",
                    help="leave kernel.bpf_stats_enabled off (it costs two clock reads per "
                         "program run; the tracer CPU column is then 0)")
    args = ap.parse_args(argv)
    if args.consumer:
        return _consumer(int(args.consumer[0]), args.consumer[1] == "1",
                         args.consumer[2] == "1")
    if args.floor_consumer:
        return _floor_consumer(args.floor_consumer)
    if os.geteuid() != 0:
        print("tracer_overhead: needs root to load the tracer", file=sys.stderr)
        return 2
    WORKLOAD_CPUS.update(args.pin)
    port = _free_port()
    maps = Maps(args.keys, port)
    # the programs' run time (tracer CPU column); costs two clock reads per program run
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_was = stats.read_text()
    stats.write_text("1" if args.stats else "0")
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, {args.rounds} x "
          f"{args.seconds:g} s per mode; audited map: {maps.sizes['daemon']} keys "
          f"(worst: {maps.sizes['worst']}, incl. every possible benchmark connection)")
    results: dict[str, dict[str, list[float]]] = {}
    tails: dict[str, dict[str, str]] = {}
    banner_shown = False
    paired: dict[tuple[str, str], tuple[list[float], list[float], str]] = {}
    floor_dir = tempfile.TemporaryDirectory(prefix="sockguard-floor-")
    try:
        floor_obj = ""
        if args.floor:
            from tests.lab.world import build_object

            floor_obj = str(build_object(HERE / "tracepoint_floor.bpf.c", Path(floor_dir.name)))
        for kind in args.kinds:
            res: dict[str, list[float]] = {m: [] for m in args.modes}
            events: dict[str, list[float]] = {m: [] for m in args.modes}
            share: dict[str, list[float]] = {m: [] for m in args.modes}
            per_req: dict[str, list[float]] = {m: [] for m in args.modes}
            for _ in range(args.rounds):
                for mode in args.modes:
                    if mode == "baseline":
                        rate, cpu = _rate(kind, args.seconds, port)
                        res[mode].append(rate)
                        events[mode].append(0.0)
                        share[mode].append(0.0)
                        per_req[mode].append(1e6 * cpu / (rate * args.seconds))
                        continue
                    map_id = maps.ids["worst" if mode == "worst" else "daemon"]
                    (rate, work_cpu), banner, tail = _traced_rate(
                        kind, args.seconds, port, map_id, mode != "unfiltered")
                    if not banner_shown:
                        print(f"tracer: {banner}")
                        banner_shown = True
                    res[mode].append(rate)
                    fields = dict(zip(tail.split()[::2], tail.split()[1::2], strict=False))
                    events[mode].append(float(fields.get("events", 0)))
                    # the programs run in the workload's processes: their time is in work_cpu
                    consumer = float(fields.get("cpu_s", 0))
                    tracer_cpu = consumer + float(fields.get("bpf_s", 0))
                    share[mode].append(100 * tracer_cpu / (work_cpu + consumer)
                                       if work_cpu + consumer else 0.0)
                    per_req[mode].append(1e6 * (work_cpu + consumer) / (rate * args.seconds))
                    tails.setdefault(kind, {})[mode] = tail
            if args.pairs:
                paired[kind, "daemon"] = _paired(
                    kind, args.seconds, port,
                    ["--consumer", str(maps.ids["daemon"]), "1", "1"], args.pairs)
            if args.idle_pairs:
                paired[kind, "idle"] = _paired(
                    kind, args.seconds, port,
                    ["--consumer", str(maps.ids["daemon"]), "1", "0"], args.idle_pairs)
            if args.floor:
                paired[kind, "floor"] = _paired(kind, args.seconds, port,
                                                ["--floor-consumer", floor_obj], args.floor)
            results[kind] = res
            results[kind + ":events"] = events
            results[kind + ":share"] = share
            results[kind + ":per_req"] = per_req
    finally:
        maps.close()
        stats.write_text(stats_was)
        floor_dir.cleanup()
    print(f"{'workload':<11} {'mode':<11} {'req/s':>9} {'ratio':>7} {'loss':>7} "
          f"{'CPU/req':>9} {'CPU+':>7} {'tracer CPU':>10} {'events/round':>13}")
    for kind in args.kinds:
        res, events = results[kind], results[kind + ":events"]
        base = statistics.median(res["baseline"]) if "baseline" in res else float("nan")
        reqs = results[kind + ":per_req"]
        base_req = statistics.median(reqs["baseline"]) if "baseline" in reqs else float("nan")
        for mode in args.modes:
            rate = statistics.median(res[mode])
            ratio = rate / base if base else float("nan")
            cpu = statistics.median(results[kind + ":share"][mode])
            req_us = statistics.median(reqs[mode])
            more = (req_us / base_req - 1) * 100 if base_req else float("nan")
            print(f"{kind:<11} {mode:<11} {rate:>9.0f} {ratio:>7.3f} {(1 - ratio) * 100:>6.2f}% "
                  f"{req_us:>7.1f}us {more:>6.2f}% {cpu:>9.2f}% "
                  f"{statistics.median(events[mode]):>13.0f}")
        for mode in args.modes:
            print(f"{'':<11} {mode:<11} rounds {[round(x) for x in res[mode]]}  "
                  f"{tails.get(kind, {}).get(mode, '')}")
    for (kind, what), (ratios, cpu_ratios, tail) in paired.items():
        whose = {"daemon": "daemon tracer, collision check listening",
                 "idle": "daemon tracer, collision check idle (healthy maps)",
                 "floor": "floor (programs returning at once, same tracepoints)"}[what]
        print(f"paired {kind}: {whose} attached vs detached, {len(ratios)} pairs of "
              f"{args.seconds:g} s")
        for figure, values in (("rate loss", [(1 - r) * 100 for r in ratios]),
                               ("CPU per request", [(r - 1) * 100 for r in cpu_ratios])):
            mean = statistics.fmean(values)
            err = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
            print(f"       {figure}: median {statistics.median(values):+.2f}%, mean "
                  f"{mean:+.2f}% +- {err:.2f}% (standard error), 95 % interval "
                  f"{mean - 1.96 * err:+.2f}% to {mean + 1.96 * err:+.2f}%; "
                  f"pairs {[round(x, 1) for x in values]}")
        print(f"       {tail}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
