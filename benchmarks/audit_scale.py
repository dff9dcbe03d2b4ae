"""How long does `sockguard audit` take at Cilium's scale?

Builds a world of real kernel objects, then measures in one run:

- a sockhash shaped like ``cilium_sock_ops`` (44-byte key, 4-byte value,
  65,535 entries at most), pinned under ``/sys/fs/bpf/sockguard-bench-<rand>/``;
- worker processes, each holding up to ~17,000 established loopback TCP
  sockets (an fd limit of 20,000 a process cannot be raised here), spread
  over network namespaces of their own, ~100,000 sockets in all;
- one map entry per socket for as many sockets as the map holds, written by
  the worker under the socket's Cilium key (peer's point of view) with the
  socket's fd as the 4-byte value — so every entry is ``ok``;
- then ``--stale`` entries (default 100) under keys of tuples nobody has,
  pointing at spare sockets: the audit must report exactly those.

Measured, each ``--repeat`` times (median and min): ``sockguard audit --map
<pin> --json`` end to end as a subprocess with its peak RSS, on the clean map
and with the stale entries (which costs a second, confirming look and the
0.2 s ``--confirm-delay``); sockguard's parts in-process (map read through the
iterator and through syscalls, the sock_diag scan of all namespaces, the
index + classification, one whole look); and the baselines an operator has
today: ``bpftool map dump pinned <pin>`` and ``ss -tanH`` in every namespace.

Everything is torn down on exit, on an exception and on Ctrl-C.

    .venv/bin/python benchmarks/audit_scale.py [--entries 65535] [--sockets 100000] [--json]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import datetime
import gc
import ipaddress
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import secrets
import shutil
import signal
import site
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sockguard.core.audit import AuditPolicy, AuditResult, SocketIndex, audit_records  # noqa: E402
from sockguard.core.layout import CILIUM, kernel_form, key_for_socket  # noqa: E402
from sockguard.core.model import Endpoint, Kind, Tuple4  # noqa: E402
from sockguard.core.rows import Record  # noqa: E402
from sockguard.kernel import libbpf  # noqa: E402
from sockguard.kernel.maps import open_map, resolve_map  # noqa: E402
from sockguard.kernel.netns import entered  # noqa: E402
from sockguard.kernel.node_audit import (  # noqa: E402
    _look,
    entry_source,
    read_entry_records,
    read_map,
)
from sockguard.kernel.sockets import scan_all  # noqa: E402
from sockguard.kernel.sockhash_lookup import lookup_available  # noqa: E402
from sockguard.kernel.sockhash_lookup import read_judged as lookup_judged  # noqa: E402
from sockguard.kernel.sockhash_lookup import read_records as lookup_records  # noqa: E402
from sockguard.kernel.sockmap_iter import iterator_available, read_judged, read_records  # noqa: E402

BPFFS = Path("/sys/fs/bpf")
CILIUM_FORM = kernel_form(CILIUM)
assert CILIUM_FORM is not None
MAP_NAME = "sg_bench"
KEY_SIZE, VALUE_SIZE, MAX_ENTRIES = 44, 4, 65535
PER_WORKER = 17000  # sockets a worker holds (fd hard limit 20,000)
LISTENERS = 4  # listening ports per worker
SOURCES = 32  # client source addresses per worker
BATCH = 512  # connects before the matching accepts (backlog 4096)
IP_BIND_ADDRESS_NO_PORT = 24
PR_SET_PDEATHSIG = 1
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


# --- the world -----------------------------------------------------------------------


@dataclass
class WorkerSpec:
    index: int
    netns: str  # /run/netns/<name>
    ns_index: int
    sockets: int  # sockets to hold (an even number: connections x 2)
    entries: int  # of them, how many get their own map entry
    pin: str


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)


def _tuple(sock: socket.socket) -> Tuple4:
    lip, lport = sock.getsockname()[:2]
    rip, rport = sock.getpeername()[:2]
    return Tuple4(4, Endpoint(ipaddress.IPv4Address(lip), lport),
                  Endpoint(ipaddress.IPv4Address(rip), rport))


def _worker(spec: WorkerSpec, conn: Connection) -> None:
    """Hold ``spec.sockets`` established sockets; insert entries; serve commands."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent tears us down
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks: list[socket.socket] = []
    net = spec.ns_index + 1
    try:
        with entered(spec.netns):
            listeners = []
            for j in range(LISTENERS):
                ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                ls.bind((f"127.{net}.0.1", 20000 + spec.index * LISTENERS + j))
                ls.listen(4096)
                listeners.append(ls)
            conns = spec.sockets // 2
            made = 0
            while made < conns:
                ls = listeners[(made // BATCH) % LISTENERS]
                n = min(BATCH, conns - made)
                for c in range(made, made + n):
                    cs = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    cs.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    cs.bind((f"127.{net}.{spec.index + 1}.{c % SOURCES + 1}", 0))
                    cs.connect(ls.getsockname())
                    socks.append(cs)
                for _ in range(n):
                    ss, _addr = ls.accept()
                    socks.append(ss)
                made += n
            for ls in listeners:
                ls.close()
        map_fd = libbpf.obj_get(spec.pin)
        try:
            for s in socks[: spec.entries]:
                key = key_for_socket(CILIUM, _tuple(s))
                libbpf.map_update(map_fd, key, struct.pack("=i", s.fileno()))
            spare = socks[spec.entries:] or socks
            shadowed = 0  # sockets without an entry given shadowing entries so far
            conn.send(("ready", len(socks), spec.entries))
            while True:
                cmd, arg = conn.recv()
                if cmd == "stale":
                    for i, key in enumerate(arg):
                        fd = spare[i % len(spare)].fileno()
                        libbpf.map_update(map_fd, key, struct.pack("=i", fd))
                    conn.send(("ok", len(arg)))
                elif cmd == "shadow":  # the key of a live, entry-less socket, another's fd
                    made = []
                    for victim in socks[spec.entries + shadowed:][:arg]:
                        other = socks[0] if victim is not socks[0] else socks[1]
                        key = key_for_socket(CILIUM, _tuple(victim))
                        libbpf.map_update(map_fd, key, struct.pack("=i", other.fileno()))
                        made.append(key)
                    shadowed += len(made)
                    conn.send(("ok", made))
                elif cmd in ("unstale", "unshadow"):
                    for key in arg:
                        libbpf.map_delete(map_fd, key)
                    shadowed = 0 if cmd == "unshadow" else shadowed
                    conn.send(("ok", len(arg)))
                else:
                    break
        finally:
            os.close(map_fd)
    except BaseException as exc:  # report, then die: the parent tears down
        with contextlib.suppress(Exception):
            conn.send(("error", f"worker {spec.index}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        for s in socks:
            s.close()


def stale_keys(count: int, namespaces: int) -> list[bytes]:
    """Keys of tuples no socket has: no listener on those addresses and ports."""
    keys = []
    for i in range(count):
        net = i % namespaces + 1
        tup = Tuple4(4, Endpoint(ipaddress.IPv4Address(f"127.{net}.250.{i // 250 + 1}"), 1000 + i),
                     Endpoint(ipaddress.IPv4Address(f"127.{net}.251.1"), 40000 + i))
        keys.append(key_for_socket(CILIUM, tup))
    return keys


@dataclass
class World:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    pin_dir: Path | None = None
    pin: str = ""
    netns: list[str] = field(default_factory=list)
    procs: list[tuple[mp.process.BaseProcess, Connection]] = field(default_factory=list)
    sockets: int = 0
    entries: int = 0
    _down: bool = False

    def build(self, entries: int, sockets: int, namespaces: int, stale: int,
              spare: int = 0) -> None:
        """``entries`` at most, ``stale`` of them left free for stale keys; ``spare``
        sockets at least kept without an entry (for shadowing entries)."""
        self.pin_dir = BPFFS / f"sockguard-bench-{self.tag}"
        self.pin_dir.mkdir()
        fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_SOCKHASH, MAP_NAME, KEY_SIZE, VALUE_SIZE,
                               MAX_ENTRIES)
        try:
            self.pin = str(self.pin_dir / MAP_NAME)
            libbpf.obj_pin(fd, self.pin)
        finally:
            os.close(fd)
        for i in range(namespaces):
            name = f"sg-bench-{self.tag}-{i}"
            subprocess.run(["ip", "netns", "add", name], check=True)
            self.netns.append(name)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        # a multiple of the namespaces, so that each holds the same share
        workers = namespaces * math.ceil(math.ceil(sockets / PER_WORKER) / namespaces)
        # even shares (a worker holds both ends of its connections), so the world may
        # hold a few sockets less than asked: the spare ones are counted from what it holds
        shares = [sockets * (w + 1) // workers - sockets * w // workers for w in range(workers)]
        shares = [s - s % 2 for s in shares]
        ok_entries = min(entries - stale, sum(shares) - spare)
        ctx = mp.get_context("fork")
        for w, share in enumerate(shares):
            ent = ok_entries * (w + 1) // workers - ok_entries * w // workers
            spec = WorkerSpec(w, f"/run/netns/{self.netns[w % namespaces]}", w % namespaces,
                              share, min(ent, share), self.pin)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(spec, child), daemon=True,
                               name=f"sg-bench-worker-{w}")
            proc.start()
            child.close()
            self.procs.append((proc, parent))
        for _proc, pipe in self.procs:
            msg = pipe.recv()
            if msg[0] != "ready":
                raise RuntimeError(msg[1])
            self.sockets += msg[1]
            self.entries += msg[2]

    def command(self, cmd: str, keys: Sequence[bytes]) -> None:
        """Insert (``stale``) or delete (``unstale``, ``unshadow``) keys, spread over the
        workers."""
        n = len(self.procs)
        for w, (_proc, pipe) in enumerate(self.procs):
            pipe.send((cmd, list(keys[w::n])))
        for _proc, pipe in self.procs:
            msg = pipe.recv()
            if msg[0] != "ok":
                raise RuntimeError(msg[1])

    def shadow(self, count: int) -> list[bytes]:
        """Insert ``count`` shadowing entries, one per worker while workers have sockets
        without an entry: each the key of such a live socket, pointing at another."""
        keys: list[bytes] = []
        while len(keys) < count:
            before = len(keys)
            for _proc, pipe in self.procs:
                if len(keys) == count:
                    break
                pipe.send(("shadow", 1))
                msg = pipe.recv()
                if msg[0] != "ok":
                    raise RuntimeError(msg[1])
                keys.extend(k for k in msg[1] if k not in keys)
            if len(keys) == before:
                break
        if len(keys) != count:
            raise RuntimeError(f"{len(keys)} shadowing entries made, {count} asked for "
                               "(too few sockets without an entry)")
        return keys

    def teardown(self) -> None:
        if self._down:
            return
        self._down = True
        for _proc, pipe in self.procs:
            with contextlib.suppress(Exception):
                pipe.send(("stop", None))
        for proc, _pipe in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for name in self.netns:
            subprocess.run(["ip", "netns", "del", name], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.pin:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pin)
        if self.pin_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                self.pin_dir.rmdir()


# --- measuring -----------------------------------------------------------------------


@dataclass
class Measure:
    name: str
    runs: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        return min(self.runs)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"median_s": round(self.median, 4), "min_s": round(self.min, 4),
                             "runs_s": [round(r, 4) for r in self.runs], "note": self.note}
        if self.rss_kb:
            d["peak_rss_mib"] = round(max(self.rss_kb) / 1024, 1)
        return d


def timed(fn: Callable[[], object], repeat: int) -> tuple[list[float], object]:
    runs, last = [], None
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        last = fn()
        runs.append(time.perf_counter() - t0)
    return runs, last


def run_child_rusage(argv: Sequence[str], env: dict[str, str] | None = None
                     ) -> tuple[float, int, int, bytes]:
    """Wall time, exit status, peak RSS (KiB) and stdout of one child process.

    The peak RSS comes from GNU time when it is installed: a child this (large)
    process spawns inherits its high-water mark across exec (signal->maxrss is
    set from the old mm at exec), so its own getrusage figure would be ours.
    """
    with tempfile.NamedTemporaryFile("r", prefix="sg-bench-rss-") as rss_file:
        full = [TIME, "-f", "%M", "-o", rss_file.name, *argv] if TIME else list(argv)
        t0 = time.perf_counter()
        proc = subprocess.run(full, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                              check=False)
        elapsed = time.perf_counter() - t0
        text = rss_file.read().strip().splitlines()
    rss = int(text[-1]) if TIME and text and text[-1].isdigit() else 0
    return elapsed, proc.returncode, rss, proc.stdout


def sockguard_argv() -> list[str]:
    exe = Path(sys.executable).parent / "sockguard"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "sockguard"]


def measure_e2e(name: str, argv: list[str], repeat: int, expect_rc: int,
                env: dict[str, str] | None = None, note: str = ""
                ) -> tuple[Measure, dict[str, Any]]:
    m = Measure(name, note=note)
    doc: dict[str, Any] = {}
    for _ in range(repeat):
        elapsed, rc, rss, out = run_child_rusage(argv, env)
        if rc != expect_rc:
            raise RuntimeError(f"{' '.join(argv)}: exit {rc}, expected {expect_rc}")
        m.runs.append(elapsed)
        m.rss_kb.append(rss)
        doc = json.loads(out)
    return m, doc


def measure_cmd(name: str, cmds: Sequence[Sequence[str]], repeat: int, note: str = ""
                ) -> tuple[Measure, list[bytes]]:
    """The summed wall time of running ``cmds`` one after the other."""
    m = Measure(name, note=note)
    outs: list[bytes] = []
    for _ in range(repeat):
        total, outs = 0.0, []
        for argv in cmds:
            elapsed, _rc, rss, out = run_child_rusage(argv)
            total += elapsed
            m.rss_kb.append(rss)
            outs.append(out)
        m.runs.append(total)
    return m, outs


def check_audit_doc(doc: dict[str, Any], ok: int, stale: set[str],
                    shadowing: frozenset[str] = frozenset()) -> list[str]:
    """Problems with an ``audit --json`` document (empty when it is right)."""
    problems = []
    (m,) = doc["maps"]
    counts = m["counts"]
    if counts["ok"] != ok:
        problems.append(f"ok {counts['ok']} != {ok}")
    for kind, want in (("stale", stale), ("shadowing", shadowing)):
        reported = {f["key_hex"] for f in doc["findings"] if f["kind"] == kind}
        if reported != want:
            problems.append(f"{kind}: {len(reported - want)} unexpected, "
                            f"{len(want - reported)} missed")
    if not all(f["confirmed"] for f in doc["findings"] if f["kind"] not in ("ok", "proxy")):
        problems.append("unconfirmed finding")
    if m["source"] not in ("iterator", "tc_lookup"):
        problems.append(f"source {m['source']}")
    return problems


# --- main ----------------------------------------------------------------------------


def exact_source_missing() -> str | None:
    """Why no exact entry source (iterator or tc lookup) runs here, or None when one does.

    The benchmarks measure whichever the machine allows and say which.
    """
    src = entry_source("auto")
    if src.name in ("iterator", "tc_lookup"):
        return None
    return f"no exact entry source runs here: {src.reason}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--entries", type=int, default=MAX_ENTRIES,
                   help="map entries, stale ones included (default 65535, the maximum)")
    p.add_argument("--sockets", type=int, default=100_000, help="established sockets in all")
    p.add_argument("--stale", type=int, default=100, help="stale entries to inject")
    p.add_argument("--netns", type=int, default=4, help="benchmark namespaces")
    p.add_argument("--repeat", type=int, default=5, help="runs of each measurement")
    p.add_argument("--compare-tree", metavar="DIR",
                   help="also run `audit` end to end from another checkout's package "
                        "(PYTHONPATH=DIR python -m sockguard), e.g. the code before a change")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    if not 0 < args.entries <= MAX_ENTRIES or not 0 <= args.stale < args.entries:
        p.error(f"--entries must be in 1..{MAX_ENTRIES} and above --stale")
    if args.sockets < 2 or args.netns < 1 or args.repeat < 1:
        p.error("--sockets >= 2, --netns >= 1, --repeat >= 1")
    return args


def fmt_table(rows: list[tuple[str, Measure | None, str]]) -> str:
    lines = [f"{'measurement':<58} {'median':>9} {'min':>9} {'RSS':>8}  vs baseline",
             "-" * 104]
    for label, m, ratio in rows:
        if m is None:
            lines.append(label)
            continue
        rss = f"{max(m.rss_kb) / 1024:.0f}M" if m.rss_kb else ""
        lines.append(f"{label:<58} {m.median * 1e3:>7.0f}ms {m.min * 1e3:>7.0f}ms {rss:>8}  "
                     f"{ratio}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (bpf, netns)", file=sys.stderr)
        return 2
    for tool in ("bpftool", "ss", "ip"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    why_not = exact_source_missing()
    if why_not:
        print(why_not, file=sys.stderr)
        return 2

    world = World()
    atexit.register(world.teardown)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    try:
        t0 = time.perf_counter()
        world.build(args.entries, args.sockets, args.netns, args.stale)
        log(f"world: {world.sockets} sockets in {len(world.procs)} workers over "
            f"{len(world.netns)} netns, {world.entries} entries in {world.pin} "
            f"({time.perf_counter() - t0:.1f}s to build)")
        return bench(world, args, log)
    except KeyboardInterrupt:
        log("interrupted; tearing down")
        return 130
    finally:
        world.teardown()


def bench(world: World, args: argparse.Namespace, log: Callable[..., None]) -> int:
    rep = args.repeat
    sg = [*sockguard_argv(), "audit", "--map", world.pin, "--json"]
    ok_entries = world.entries
    stale = stale_keys(args.stale, len(world.netns))
    stale_hex = {k.hex() for k in stale}
    results: dict[str, Measure] = {}
    problems: list[str] = []

    def e2e(label: str, key: str, want_stale: set[str], env: dict[str, str] | None = None,
            argv: list[str] = sg, note: str = "") -> None:
        m, doc = measure_e2e(label, argv, rep, 1 if want_stale else 0, env, note)
        problems.extend(f"{label}: {p}" for p in check_audit_doc(doc, ok_entries, want_stale))
        results[key] = m

    compare_env = None
    if args.compare_tree:
        # -S: the venv's editable install would otherwise win over any sys.path entry
        path = [str(Path(args.compare_tree).resolve()), *site.getsitepackages()]
        compare_env = dict(os.environ)
    py_m = [sys.executable, "-S", "-c",
            f"import sys; sys.path[:0] = {path!r}; from sockguard.cli.commands import main; "
            "sys.exit(main())" if args.compare_tree else "",
            "audit", "--map", world.pin, "--json"]

    # -- clean map --------------------------------------------------------------------
    log("measuring: clean map ...")
    e2e("sockguard audit --json (clean map)", "e2e_clean", set())
    if lookup_available()[0]:
        e2e("  same, --entry-source tc_lookup", "e2e_clean_tc", set(),
            argv=[*sg, "--entry-source", "tc_lookup"])
    e2e("  same, --all (every ok entry built: the slow path)", "e2e_clean_all", set(),
        argv=[*sg, "--all"])
    if compare_env:
        e2e("  same, --compare-tree code", "e2e_clean_compare", set(), compare_env, py_m)
    results["startup"] = Measure("python start + import sockguard.cli.commands", timed(
        lambda: subprocess.run([sys.executable, "-c", "import sockguard.cli.commands"], check=True),
        rep)[0])

    info = resolve_map(world.pin)
    policy = AuditPolicy()
    src = entry_source("auto")
    read_entry_records(info, src)  # warm: the entry source's first load

    by_iterator = iterator_available()[0]
    via = "iterator" if by_iterator else "tc lookup"

    def records() -> dict[bytes, Record]:
        with open_map(info) as handle:
            if by_iterator:
                return read_records(handle.fd, info.key_size)
            return lookup_records(handle.fd, info.key_size, list(handle.keys()))

    def judged() -> tuple[dict[bytes, Record], dict[int, int]]:
        with open_map(info) as handle:
            if by_iterator:
                return read_judged(handle.fd, info.key_size, CILIUM_FORM)
            return lookup_judged(handle.fd, info.key_size, list(handle.keys()), CILIUM_FORM)

    runs, _ = timed(judged, rep)
    results["read_judged"] = Measure(f"  map read, {via} judging in the kernel", runs)
    runs, recs = timed(records, rep)
    results["read_iter"] = Measure(f"  map read, {via} (read_records)", runs)
    runs, _ = timed(lambda: read_entry_records(info, src), rep)
    results["read_entries"] = Measure(f"  map read, a look's entry source ({src.name}, "
                                      "read_entry_records)", runs)
    runs, _ = timed(lambda: read_map(info, CILIUM), rep)
    results["read_sys"] = Measure("  map read, syscalls (read_map: --entry-source syscall)",
                                  runs)
    runs, scan = timed(lambda: scan_all(compact=True), rep)
    results["scan"] = Measure("  sock_diag scan, all namespaces (scan_all)", runs)
    table = scan.table  # type: ignore[attr-defined]
    values = list(recs.values())  # type: ignore[attr-defined]

    def classify() -> AuditResult:
        return audit_records(info, CILIUM, values, SocketIndex.from_table(table), policy)

    runs, res = timed(classify, rep)
    results["classify"] = Measure("  SocketIndex.from_table + audit_records", runs)
    counts = {k: res.count(k) for k in Kind}  # type: ignore[attr-defined]
    if counts[Kind.OK] != ok_entries or counts[Kind.STALE] or counts[Kind.SHADOWING]:
        problems.append(f"in-process clean look: {counts}")
    runs, _ = timed(lambda: _look([info], CILIUM, policy, src), rep)
    results["look"] = Measure("  one look (judged map read; no scan when all healthy)", runs)
    runs, _ = timed(lambda: _look([info], CILIUM, policy, src, include_ok=True), rep)
    results["look_all"] = Measure("  one look, --all (map read + scan + index + classify)", runs)

    log("measuring: baselines ...")
    bt, outs = measure_cmd("bpftool map dump pinned <pin>",
                           [["bpftool", "map", "dump", "pinned", world.pin]], rep,
                           "prints keys, cannot show the socket (ENOSPC)")
    results["bpftool"] = bt
    results["bpftool_json"] = measure_cmd(
        "bpftool -j map dump pinned <pin>", [["bpftool", "-j", "map", "dump", "pinned",
                                               world.pin]], rep)[0]
    ss_cmds = [["ss", "-tanH"]] + [["ip", "netns", "exec", n, "ss", "-tanH"] for n in world.netns]
    ssm, outs = measure_cmd(f"ss -tanH in host + {len(world.netns)} netns (summed)", ss_cmds, rep)
    results["ss"] = ssm
    ss_lines = sum(o.count(b"\n") for o in outs)
    both = Measure("bpftool map dump + ss (all netns)",
                   [a + b for a, b in zip(bt.runs, ssm.runs, strict=True)])
    results["baseline_total"] = both

    # -- with stale entries -----------------------------------------------------------
    log(f"measuring: with {len(stale)} stale entries ...")
    world.command("stale", stale)
    e2e(f"sockguard audit --json ({len(stale)} stale, 2 looks + 0.2s delay)", "e2e_stale",
        stale_hex)
    e2e("  same, --confirm-delay 0", "e2e_stale_nodelay", stale_hex,
        argv=[*sg, "--confirm-delay", "0"])
    if compare_env:
        e2e("  same, --compare-tree code (--confirm-delay 0)", "e2e_stale_compare", stale_hex,
            compare_env, [*py_m, "--confirm-delay", "0"])
    if lookup_available()[0]:
        e2e("  same, --entry-source tc_lookup", "e2e_stale_tc", stale_hex,
            argv=[*sg, "--entry-source", "tc_lookup"])
    runs, res = timed(lambda: _look([info], CILIUM, policy, src), rep)
    results["look_stale"] = Measure(f"  one look with {len(stale)} stale", runs)
    look_results = res.results  # type: ignore[attr-defined]
    got = {f.entry.key_hex for f in look_results[0].bad}
    if got != stale_hex:
        problems.append(f"in-process look: {len(got ^ stale_hex)} stale keys differ")
    world.command("unstale", stale)

    # -- report -----------------------------------------------------------------------
    r = results

    def ratio(a: str, b: str) -> str:
        return f"{r[a].median / r[b].median:.2f}x {r[b].name.split(' (')[0].strip()}"

    rows: list[tuple[str, Measure | None, str]] = [
        ("sockguard", None, ""),
        (r["e2e_clean"].name, r["e2e_clean"], ratio("e2e_clean", "baseline_total")),
    ]
    if "e2e_clean_compare" in r:
        rows.append((r["e2e_clean_compare"].name, r["e2e_clean_compare"],
                     ratio("e2e_clean_compare", "baseline_total")))
    for key in ("e2e_clean_tc", "e2e_clean_all"):
        if key in r:
            rows.append((r[key].name, r[key], ratio(key, "bpftool_json")))
    rows += [
        (r["e2e_stale"].name, r["e2e_stale"], ratio("e2e_stale", "baseline_total")),
        (r["e2e_stale_nodelay"].name, r["e2e_stale_nodelay"],
         ratio("e2e_stale_nodelay", "baseline_total")),
    ]
    if "e2e_stale_tc" in r:
        rows.append((r["e2e_stale_tc"].name, r["e2e_stale_tc"],
                     ratio("e2e_stale_tc", "baseline_total")))
    if "e2e_stale_compare" in r:
        rows.append((r["e2e_stale_compare"].name, r["e2e_stale_compare"],
                     ratio("e2e_stale_compare", "baseline_total")))
    rows += [
        ("  " + r["startup"].name, r["startup"], ""),
        (r["look"].name, r["look"], ratio("look", "baseline_total")),
        (r["look_all"].name, r["look_all"], ratio("look_all", "baseline_total")),
        (r["look_stale"].name, r["look_stale"], ""),
        *([(r["read_judged"].name, r["read_judged"], ratio("read_judged", "bpftool_json"))]
          if "read_judged" in r else []),
        (r["read_iter"].name, r["read_iter"], ratio("read_iter", "bpftool")),
        (r["read_entries"].name, r["read_entries"], ratio("read_entries", "bpftool")),
        (r["read_sys"].name, r["read_sys"], ratio("read_sys", "bpftool")),
        (r["scan"].name, r["scan"], ratio("scan", "ss")),
        (r["classify"].name, r["classify"], ""),
        ("baselines", None, ""),
        (r["bpftool"].name, r["bpftool"], ""),
        (r["bpftool_json"].name, r["bpftool_json"], ""),
        (r["ss"].name, r["ss"], f"{ss_lines} lines"),
        (r["baseline_total"].name, r["baseline_total"], ""),
    ]
    doc = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "world": {"sockets": world.sockets, "entries_ok": ok_entries, "stale": len(stale),
                  "netns": len(world.netns), "workers": len(world.procs), "repeat": rep},
        "results": {k: {"name": m.name.strip(), **m.as_dict()} for k, m in r.items()},
        "correct": not problems,
        "problems": problems,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print()
        print(f"{doc['date']}  kernel {platform.release()}, {os.cpu_count()} cpus; "
              f"{world.sockets} sockets in {len(world.netns)} netns (+ host), "
              f"{ok_entries} ok entries + {len(stale)} stale; {rep} runs each")
        print(fmt_table(rows))
        print()
        print("correctness: " + ("audit reported exactly the injected stale keys, 0 shadowing"
                                 if not problems else "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
