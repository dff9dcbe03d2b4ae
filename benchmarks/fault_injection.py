#!/usr/bin/env python3
"""Fault injection: `sockguard run` with remediation on, while the node misbehaves.

The claim under test: whatever goes wrong around it, remediation never deletes the
entry of a live connection.  The run builds the test lab (tests/lab: a child cgroup,
pod namespaces, Cilium-like sockops + sk_msg), opens long-lived connections between
the pods, keeps injecting stale entries (keys nobody owns, pointing at dummy sockets)
so that remediation has real work, starts `sockguard run` (remediation on, tracer on,
0.3 s interval) and, until the time is up, injects at random:

- vanishing namespaces: `ip netns add` + `ip netns del` a few hundred ms later, so
  that some die in the middle of a scan;
- hidden namespaces: a pod's netns name deleted (`ip netns del`) while its sockets
  live on, so that no enumeration reaches it (at most one pod);
- fd exhaustion: the daemon's soft RLIMIT_NOFILE cut to 24 for 1-3 s (prlimit);
- the map unpinned and re-pinned 0.5-2 s later (a Cilium restart's pin dance);
- SIGHUP with a broken config (bad TOML, `interval = inf`, unknown key), then the
  good one again;
- SIGTERM at a random moment (often mid-remediation), then a restart;
- churn: short connections between the pods, some reusing a port.

After every fault and at the end it checks that every long-lived connection's
entries are still in the map and that data still flows on it; at the end it reads
every deletion from the daemon's log.  Exit status 0 only when no live entry was
deleted.  Needs root, clang (the lab's object) and the package's BPF objects.

    sudo .venv/bin/python benchmarks/fault_injection.py --duration 300 [--seed N] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sockguard.kernel import libbpf  # noqa: E402
from tests.lab import Lab, cilium_key, key_for, recv_exact  # noqa: E402
from tests.lab.topology import ip  # noqa: E402
from tests.lab.world import build_lab_object  # noqa: E402

SOCKGUARD = ROOT / ".venv" / "bin" / "sockguard"
DELETED = re.compile(r"deleted (\w+) entry .*? \(([0-9a-f]{88})\)")
FAULTS = ("vanishing_netns", "hide_pod", "fd_exhaustion", "map_repin", "broken_config",
          "sigterm", "churn", "inject_stale")
BROKEN_CONFIGS = ("[audit\nthis is not toml", "[audit]\ninterval = inf\n",
                  "[audit]\nconfirm_delay = nan\n", "[nope]\nfoo = 1\n")


@dataclass
class Report:
    duration_seconds: float = 0.0
    seed: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    daemon_starts: int = 0
    sigterm_exit_codes: list[int] = field(default_factory=list)
    # SIGTERM before the process ran any of sockguard's code (its interpreter still
    # starting): the default action, which systemd and the kubelet count as a clean stop
    sigterm_before_main: int = 0
    # every other stop that did not end in exit 0: code, seconds, the run's last lines
    sigterm_unclean: list[str] = field(default_factory=list)
    audits_logged: int = 0
    incomplete_audits_logged: int = 0
    stale_injected: int = 0
    deletions: int = 0
    stale_deleted: int = 0
    live_connections: int = 0
    live_entries: int = 0
    live_entries_deleted: int = 0
    live_entry_missing_checks: int = 0
    connections_still_flowing: int = 0
    other_deleted: int = 0  # keys neither injected nor long-lived (churn whose entry went)
    recovery_seconds: float = 0.0  # after the last fault, until no injected entry was left
    stale_left_after_quiet: int = 0

    @property
    def ok(self) -> bool:
        return (self.live_entries_deleted == 0 and self.live_entry_missing_checks == 0
                and self.connections_still_flowing == self.live_connections)


class Daemon:
    """`sockguard run` as a subprocess, restartable, logging to one file."""

    def __init__(self, tmp: Path, pin: Path) -> None:
        self.config = tmp / "sockguard.toml"
        self.log_path = tmp / "daemon.log"
        self.good = (f'[audit]\ninterval = 0.3\nmaps = ["{pin}"]\nconfirm_delay = 0.05\n'
                     '[remediation]\nenabled = true\nmax_deletes = 1000\n'
                     '[metrics]\nenabled = false\n'
                     '[log]\ntarget = "stderr"\nlevel = "info"\n')
        self.config.write_text(self.good)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._run_log_offset = 0  # where the running process's lines begin

    def start(self) -> None:
        self._run_log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([str(SOCKGUARD), "run", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def run_log(self) -> str:
        """What the last process started wrote."""
        with open(self.log_path, "rb") as f:
            f.seek(self._run_log_offset)
            return f.read().decode(errors="replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class World:
    """The lab, its long-lived connections, and the faults it can suffer."""

    def __init__(self, lab: Lab, daemon: Daemon, rng: random.Random, report: Report) -> None:
        self.lab, self.daemon, self.rng, self.report = lab, daemon, rng, report
        self.conns: list[tuple[socket.socket, socket.socket]] = []
        self.live_keys: set[bytes] = set()
        self.injected: set[bytes] = set()
        self.hidden_fds: list[int] = []
        self.hidden: set[str] = set()  # names of pods whose netns name was deleted
        self.threads: list[threading.Thread] = []
        self.next_port = 20000

    def open_connections(self, per_pair: int) -> None:
        pods = self.lab.pods
        for i, server in enumerate(pods):
            for j, client in enumerate(pods):
                if i == j:
                    continue
                listener = self.lab.listen(server, port=7000 + 10 * i + j, backlog=64)
                for _ in range(per_pair):
                    cli = self.lab.connect(client, server.addr(), 7000 + 10 * i + j)
                    srv = self.lab.accept(listener)
                    self.conns.append((cli, srv))
                listener.close()
        deadline = time.monotonic() + 5
        want = {key_for(s) for pair in self.conns for s in pair}
        while not want <= set(self.lab.keys()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.live_keys = want
        self.report.live_connections = len(self.conns)
        self.report.live_entries = len(want)

    def check_live(self) -> None:
        missing = self.live_keys - set(self.lab.keys())
        if missing:
            self.report.live_entry_missing_checks += 1
            print(f"  !! {len(missing)} live entries missing", file=sys.stderr)

    # -- faults -----------------------------------------------------------------------

    def inject_stale(self) -> None:
        a, b = self.rng.sample(self.lab.pods, 2)
        n = self.rng.randint(1, 6)
        socks = [s for _ in range((n + 1) // 2) for s in self.lab.dummy_pair()]
        for s in socks[:n]:
            self.next_port += 1
            key = cilium_key(a.addr(), 9999, b.addr(), self.next_port)
            self.lab.inject(key, s)
            self.injected.add(key)
        self.report.stale_injected += n

    def vanishing_netns(self) -> None:
        name = f"sgf-{os.getpid()}-{self.rng.randrange(1 << 30):x}"
        ip("netns", "add", name)
        delay = self.rng.uniform(0.0, 0.4)

        def later() -> None:
            time.sleep(delay)
            with contextlib.suppress(Exception):
                ip("netns", "del", name)

        t = threading.Thread(target=later, daemon=True)
        t.start()
        self.threads.append(t)

    def hide_pod(self) -> None:
        if self.hidden_fds:
            return  # one hidden pod is enough; the rest keep their names
        pod = self.rng.choice(self.lab.pods)
        self.hidden_fds.append(os.open(pod.path, os.O_RDONLY | os.O_CLOEXEC))
        ip("netns", "del", pod.name)
        self.hidden.add(pod.name)

    def fd_exhaustion(self) -> None:
        proc = self.daemon.proc
        if proc is None or proc.poll() is not None:
            return
        # Only the soft limit: raising a hard limit again needs CAP_SYS_RESOURCE.
        with contextlib.suppress(ProcessLookupError):
            old = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (24, old[1]))
            time.sleep(self.rng.uniform(1, 3))
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, old)

    def map_repin(self) -> None:
        pin = self.lab.pin_path
        with contextlib.suppress(FileNotFoundError):
            pin.unlink()
        time.sleep(self.rng.uniform(0.5, 2))
        libbpf.obj_pin(self.lab.map_fd, str(pin))

    def broken_config(self) -> None:
        self.daemon.config.write_text(self.rng.choice(BROKEN_CONFIGS))
        self.daemon.signal(signal.SIGHUP)
        time.sleep(self.rng.uniform(0.3, 1.5))
        self.daemon.config.write_text(self.daemon.good)
        self.daemon.signal(signal.SIGHUP)

    def sigterm(self) -> None:
        t0 = time.monotonic()
        code = self.daemon.stop()
        seconds = time.monotonic() - t0
        if code is not None:
            self.report.sigterm_exit_codes.append(code)
            run_log = self.daemon.run_log()
            if code == -signal.SIGTERM and not run_log:
                self.report.sigterm_before_main += 1
            elif code != 0:
                tail = "\n".join(run_log.splitlines()[-15:])
                self.report.sigterm_unclean.append(
                    f"exit {code} after {seconds:.1f} s (killed after 15 s: {code == -9}); "
                    f"its log ends:\n{tail}")
        self.daemon.start()

    def churn(self) -> None:
        visible = [p for p in self.lab.pods if p.name not in self.hidden]
        if len(visible) < 2:
            return
        server, client = self.rng.sample(visible, 2)
        port = 7500 + self.rng.randrange(4)
        with contextlib.suppress(OSError):
            listener = self.lab.listen(server, port=port, backlog=16)
            try:
                src = 41000 + self.rng.randrange(3)  # a few ports, reused
                for _ in range(self.rng.randint(1, 4)):
                    cli = self.lab.connect(client, server.addr(), port, src_port=src)
                    srv = self.lab.accept(listener)
                    with contextlib.suppress(OSError):
                        cli.sendall(b"x")
                    cli.close()
                    srv.close()
            finally:
                listener.close()

    def still_flowing(self) -> int:
        ok = 0
        for cli, srv in self.conns:
            with contextlib.suppress(OSError):
                cli.sendall(b"ping")
                if recv_exact(srv, 4) == b"ping":
                    ok += 1
        return ok

    def close(self) -> None:
        for t in self.threads:
            t.join(timeout=2)
        for fd in self.hidden_fds:
            os.close(fd)


def run(duration: float, seed: int, per_pair: int = 4, pods: int = 3) -> Report:
    report = Report(seed=seed)
    rng = random.Random(seed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sg-faults-") as tmpdir:
        tmp = Path(tmpdir)
        obj = build_lab_object(tmp)
        with Lab(pods=pods, obj_path=obj) as lab:
            daemon = Daemon(tmp, lab.pin_path)
            world = World(lab, daemon, rng, report)
            try:
                world.open_connections(per_pair)
                world.inject_stale()
                daemon.start()
                time.sleep(1.0)
                counts: Counter[str] = Counter()
                while time.monotonic() - start < duration:
                    fault = rng.choice(FAULTS)
                    getattr(world, fault)()
                    counts[fault] += 1
                    time.sleep(rng.uniform(0.05, 0.5))
                    world.check_live()
                    if rng.random() < 0.5:
                        world.inject_stale()
                        counts["inject_stale"] += 1
                # Quiet: no more faults; remediation must catch up with every stale
                # entry (entries carry their own proof even while a pod stays hidden).
                quiet = time.monotonic()
                while time.monotonic() - quiet < 15 and world.injected & set(lab.keys()):
                    time.sleep(0.2)
                report.recovery_seconds = round(time.monotonic() - quiet, 1)
                report.stale_left_after_quiet = len(world.injected & set(lab.keys()))
                world.check_live()
                daemon.stop()
                report.connections_still_flowing = world.still_flowing()
            finally:
                daemon.stop()
                world.close()
            log = daemon.log()
            report.faults = dict(sorted(counts.items()))
            report.daemon_starts = daemon.starts
            report.audits_logged = log.count("audit: ")
            report.incomplete_audits_logged = log.count("INCOMPLETE")
            deleted = [bytes.fromhex(k) for _kind, k in DELETED.findall(log)]
            report.deletions = len(deleted)
            report.stale_deleted = sum(1 for k in deleted if k in world.injected)
            report.live_entries_deleted = sum(1 for k in deleted if k in world.live_keys)
            report.other_deleted = report.deletions - report.stale_deleted \
                - report.live_entries_deleted
    report.duration_seconds = round(time.monotonic() - start, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of faults")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    report = run(args.duration, seed)
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        for name, value in asdict(report).items():
            print(f"{name:28} {value}")
        print(f"{'verdict':28} {'OK: no live entry deleted' if report.ok else 'FAILED'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
