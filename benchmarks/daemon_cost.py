"""What does the always-on `sockguard run` cost on a node at Cilium's scale?

Builds the world of ``audit_scale.py`` (a full ``cilium_sock_ops``-shaped sockhash,
65,535 entries at most, ~100,000 established loopback sockets over ``--netns``
namespaces: imported from there, not copied), then runs ``.venv/bin/sockguard run
--config <tmp toml>`` as a subprocess: that map only, remediation off, tracer on,
metrics on a free 127.0.0.1 port, log to stderr at info. Its CPU time (utime + stime
of every thread, from ``/proc/<pid>/stat`` and ``/proc/<pid>/task/*/stat``) and RSS
(``/proc/<pid>/status``) are sampled every second, its audits from its own metrics
(``sockguard_audits_total``, ``sockguard_audit_duration_seconds``).

Two phases, one daemon process:

a) ``audit.interval = 10`` for ``--minutes`` (default 10), counted from the end of the
   first audit: CPU share = CPU seconds / wall seconds, audits done, CPU per audit
   (whole process, and the audit thread alone). Target (issue 11): <= 2 % of one core.
b) the config rewritten to ``interval = 0.3`` and reloaded (SIGHUP) until ``--audits``
   (default 1,000) more audits are done: the low point of RSS in each block of
   ``--block`` (50) audits, and the spread of that series. Target: flat within
   +-2 MB over 1,000 audits.

Everything (daemon, workers, namespaces, pin) is removed on exit, error or Ctrl-C.

    sudo .venv/bin/python benchmarks/daemon_cost.py [--minutes 10] [--netns 50] [--json]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_scale import MAX_ENTRIES, World, _die_with_parent, exact_source_missing, sockguard_argv

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
TARGET_CPU_SHARE = 0.02
TARGET_RSS_BAND_MB = 2.0


# --- the daemon ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, pin: str, port: int, interval: float, tracer: bool = True) -> None:
    text = (
        "[audit]\n"
        f"interval = {interval!r}\n"
        f"maps = [{json.dumps(pin)}]\n"
        "\n[remediation]\nenabled = false\n"
        "\n[metrics]\nenabled = true\n"
        f'address = "127.0.0.1"\nport = {port}\n'
        '\n[log]\ntarget = "stderr"\nlevel = "info"\n'
        f"\n[tracer]\nenabled = {str(tracer).lower()}\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reload never reads half a file


@dataclass
class Sample:
    t: float  # monotonic
    cpu: float  # seconds, utime + stime of all threads
    cpu_children: float  # cutime + cstime (waited-for children)
    rss_kb: int
    threads: dict[int, tuple[str, float]]  # tid -> (comm, cpu seconds)
    fds: int
    audits_started: float | None = None
    audits_done: float | None = None
    duration_sum: float | None = None


def _stat_fields(path: str) -> list[str]:
    with open(path) as f:
        text = f.read()
    # comm may hold spaces and parentheses: split after the last ')'
    return text[text.rindex(")") + 2:].split()


def read_proc(pid: int) -> Sample:
    t = time.monotonic()
    f = _stat_fields(f"/proc/{pid}/stat")
    # fields after "(comm)": state=0 ... utime=11 stime=12 cutime=13 cstime=14
    cpu = (int(f[11]) + int(f[12])) / TICKS
    children = (int(f[13]) + int(f[14])) / TICKS
    rss = 0
    with open(f"/proc/{pid}/status") as st:
        for line in st:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    threads: dict[int, tuple[str, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/task/{tid}/comm") as c:
                comm = c.read().strip()
            tf = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            threads[int(tid)] = (comm, (int(tf[11]) + int(tf[12])) / TICKS)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return Sample(t, cpu, children, rss, threads, fds)


METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.M)


def scrape(port: int) -> dict[str, float]:
    """The unlabelled series (and histogram _sum/_count) of the daemon's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name, labels, value in METRIC_RE.findall(text):
        if not labels:
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


@dataclass
class Daemon:
    argv: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = None

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        return scrape(self.port)

    def stop(self, grace: float = 15.0) -> int | None:
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            rc = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def wait_for(cond: Callable[[], bool], timeout: float, what: str, daemon: Daemon) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise RuntimeError(f"daemon exited ({daemon.proc.returncode if daemon.proc else '?'})"
                               f" while waiting for {what}:\n{daemon.log_tail()}")
        with contextlib.suppress(OSError, ValueError):
            if cond():
                return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n{daemon.log_tail()}")


def sample(daemon: Daemon, scrape_now: bool) -> Sample:
    s = read_proc(daemon.pid)
    if scrape_now:
        m = daemon.metrics()
        s.audits_started = m.get("sockguard_audits_total")
        s.audits_done = m.get("sockguard_audit_duration_seconds_count")
        s.duration_sum = m.get("sockguard_audit_duration_seconds_sum")
    return s


def thread_cpu(first: Sample, last: Sample) -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread between two samples (threads alive at the end)."""
    out = {}
    for tid, (comm, cpu) in last.threads.items():
        before = first.threads.get(tid, (comm, 0.0))[1]
        out[tid] = (comm, cpu - before)
    return out


# --- phases --------------------------------------------------------------------------


def phase_a(daemon: Daemon, minutes: float, scrape_every: float,
            log: Callable[..., None]) -> tuple[dict[str, Any], list[Sample]]:
    first = sample(daemon, True)
    samples = [first]
    end = first.t + minutes * 60
    next_scrape = first.t + scrape_every
    next_log = first.t + 60
    while True:
        now = time.monotonic()
        if now >= end:
            break
        time.sleep(min(1.0, end - now))
        if not daemon.alive():
            raise RuntimeError(f"daemon died in phase a:\n{daemon.log_tail()}")
        scrape_now = time.monotonic() >= next_scrape or time.monotonic() >= end
        s = sample(daemon, scrape_now)
        if scrape_now:
            next_scrape += scrape_every
        samples.append(s)
        if s.t >= next_log:
            next_log += 60
            log(f"  phase a: {(s.t - first.t) / 60:.0f} min, CPU {s.cpu - first.cpu:.2f}s, "
                f"RSS {s.rss_kb / 1024:.1f} MB")
    last = sample(daemon, True)
    samples.append(last)
    wall = last.t - first.t
    cpu = last.cpu - first.cpu
    assert first.audits_done is not None and last.audits_done is not None
    audits = last.audits_done - first.audits_done
    threads = thread_cpu(first, last)
    dur = ((last.duration_sum or 0) - (first.duration_sum or 0)) / audits if audits else None
    rss = [s.rss_kb for s in samples]
    res = {
        "interval_s": 10.0,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 3),
        "cpu_children_s": round(last.cpu_children - first.cpu_children, 3),
        "cpu_share": round(cpu / wall, 5),
        "target_cpu_share": TARGET_CPU_SHARE,
        "met": cpu / wall <= TARGET_CPU_SHARE,
        "audits": int(audits),
        "audits_started": int((last.audits_started or 0) - (first.audits_started or 0)),
        "cpu_per_audit_s": round(cpu / audits, 4) if audits else None,
        "audit_wall_mean_s": round(dur, 4) if dur is not None else None,
        "threads": {f"{tid}": {"comm": comm, "cpu_s": round(c, 3), "role": ""}
                    for tid, (comm, c) in sorted(threads.items())},
        "rss_mb": {"first": round(rss[0] / 1024, 1), "last": round(rss[-1] / 1024, 1),
                   "min": round(min(rss) / 1024, 1), "max": round(max(rss) / 1024, 1)},
        "fds": [first.fds, last.fds],
        "thread_count": [len(first.threads), len(last.threads)],
    }
    return res, samples


def name_threads(pid: int, a: dict[str, Any], samples_a: list[Sample],
                 cpu_b: dict[int, tuple[str, float]]) -> None:
    """Give phase a's threads their roles (Python 3.11 does not name threads in the kernel).

    ``Daemon.run`` starts the metrics, audit and tracer threads in that order, so their
    thread ids ascend in that order: the roles go by start order.  The cross-check is
    phase b, where an audit starts every 0.3 s: its busiest thread must be the one
    named "audit" (``roles_checked``).  (A rule by CPU right after a scrape named the
    tracer "metrics" when its refreshes fell in step with the scrapes.)
    """
    del samples_a  # kept in the signature: the samples stay in the JSON for a re-check
    threads = {int(t): v for t, v in a["threads"].items()}
    rest = sorted(t for t in threads if t != pid)
    padded: list[int | None] = [*rest, None, None, None]
    metrics, audit, tracer = padded[:3]  # with --no-tracer there is no third thread
    busiest_b = max(cpu_b, key=lambda t: cpu_b[t][1]) if cpu_b else None
    a["roles_checked"] = busiest_b is None or busiest_b == audit
    for t, v in threads.items():
        v["role"] = {pid: "main", audit: "audit", metrics: "metrics",
                     tracer: "tracer"}.get(t, "")
    if audit in threads and a["audits"]:
        cpu = threads[audit]["cpu_s"]
        a["audit_thread_cpu_s"] = cpu
        a["audit_thread_cpu_per_audit_s"] = round(cpu / a["audits"], 4)
    if tracer in threads:
        a["tracer_thread_cpu_share"] = round(threads[tracer]["cpu_s"] / a["wall_s"], 5)


def phase_b(daemon: Daemon, config: Path, pin: str, audits: int, block: int, period: float,
            tracer: bool, log: Callable[..., None]) -> dict[str, Any]:
    write_config(config, pin, daemon.port, 0.3, tracer)
    before = daemon.metrics().get("sockguard_config_reloads_total", 0.0)
    os.kill(daemon.pid, signal.SIGHUP)

    def reloaded() -> bool:
        m = scrape(daemon.port)
        return (m.get("sockguard_audit_interval_seconds") == 0.3
                or m.get("sockguard_config_reloads_total", 0.0) > before)

    wait_for(reloaded, 30, "the reload to interval 0.3", daemon)
    m = daemon.metrics()
    if m.get("sockguard_audit_interval_seconds") != 0.3:
        raise RuntimeError("reload did not set interval 0.3: "
                           f"{m.get('sockguard_audit_interval_seconds')}")
    first = sample(daemon, True)
    assert first.audits_done is not None
    start_count = first.audits_done
    samples = [first]
    count = start_count
    next_scrape = first.t + 1.0
    next_log = first.t + 60
    deadline = first.t + audits * 3.0 + 120  # an audit taking 3 s would be a defect anyway
    while count - start_count < audits:
        time.sleep(period)
        if not daemon.alive():
            raise RuntimeError(f"daemon died in phase b:\n{daemon.log_tail()}")
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"phase b: only {count - start_count:.0f} audits in "
                               f"{now - first.t:.0f}s")
        scrape_now = now >= next_scrape
        s = sample(daemon, scrape_now)
        if scrape_now:
            next_scrape += 1.0
            assert s.audits_done is not None
            count = s.audits_done
        else:
            s.audits_done = count  # the last scraped count (blocks are ~15 s long)
        samples.append(s)
        if now >= next_log:
            next_log += 60
            log(f"  phase b: {count - start_count:.0f} audits, RSS {s.rss_kb / 1024:.1f} MB")
    last = sample(daemon, True)
    samples.append(last)
    assert last.audits_done is not None
    done = last.audits_done - start_count
    blocks: list[int] = []
    for s in samples[1:]:
        assert s.audits_done is not None
        b = int((s.audits_done - start_count - 1) // block) if s.audits_done > start_count else 0
        b = min(b, audits // block - 1)
        while len(blocks) <= b:
            blocks.append(s.rss_kb)
        blocks[b] = min(blocks[b], s.rss_kb)
    series_mb = [round(kb / 1024, 2) for kb in blocks]
    ref = series_mb[0]
    dev = max(abs(x - ref) for x in series_mb)
    wall = last.t - first.t
    dur = ((last.duration_sum or 0) - (first.duration_sum or 0)) / done if done else None
    rss_all = [s.rss_kb for s in samples]
    return {
        "interval_s": 0.3,
        "audits": int(done),
        "wall_s": round(wall, 1),
        "cpu_s": round(last.cpu - first.cpu, 2),
        "cpu_per_audit_s": round((last.cpu - first.cpu) / done, 4) if done else None,
        "audit_wall_mean_s": round(dur, 4) if dur is not None else None,
        "block": block,
        "sample_period_s": period,
        "samples": len(samples),
        "rss_low_series_mb": series_mb,
        "rss_low_spread_mb": round(max(series_mb) - min(series_mb), 2),
        "rss_low_drift_mb": round(series_mb[-1] - series_mb[0], 2),
        "rss_low_max_dev_from_first_mb": round(dev, 2),
        "target_band_mb": TARGET_RSS_BAND_MB,
        "met": dev <= TARGET_RSS_BAND_MB,
        "rss_mb": {"min": round(min(rss_all) / 1024, 1), "max": round(max(rss_all) / 1024, 1)},
        "fds": [first.fds, last.fds],
        "thread_count": [len(first.threads), len(last.threads)],
        "thread_cpu": thread_cpu(first, last),
    }


# --- main ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--entries", type=int, default=MAX_ENTRIES,
                   help="map entries (default 65535, the maximum); all ok")
    p.add_argument("--sockets", type=int, default=100_000, help="established sockets in all")
    p.add_argument("--netns", type=int, default=50, help="benchmark namespaces (default 50)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="phase a: minutes at interval 10 s after the first audit (default 10)")
    p.add_argument("--audits", type=int, default=1000,
                   help="phase b: audits at interval 0.3 s (default 1000; 0 skips it)")
    p.add_argument("--block", type=int, default=50, help="phase b: audits per RSS block")
    p.add_argument("--period", type=float, default=0.25,
                   help="phase b: seconds between RSS samples (default 0.25)")
    p.add_argument("--scrape", type=float, default=10.0,
                   help="phase a: seconds between metrics scrapes (default 10; /proc is "
                        "read every second)")
    p.add_argument("--no-tracer", dest="tracer", action="store_false",
                   help="tracer.enabled = false (for comparison; the target is with the tracer)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    if not 0 < args.entries <= MAX_ENTRIES or args.sockets < 2 or args.netns < 1:
        p.error(f"--entries in 1..{MAX_ENTRIES}, --sockets >= 2, --netns >= 1")
    if args.minutes <= 0 or args.audits < 0 or args.block < 1 or args.period <= 0:
        p.error("--minutes > 0, --audits >= 0, --block >= 1, --period > 0")
    if args.audits and args.audits < args.block:
        p.error("--audits must be 0 or at least --block")
    return args


def fmt_report(doc: dict[str, Any]) -> str:
    w, a, b = doc["world"], doc["phase_a"], doc.get("phase_b")
    lines = [f"{doc['date']}  kernel {doc['machine']['kernel']}, {doc['machine']['cpus']} cpus; "
             f"{w['sockets']} sockets in {w['netns']} netns (+ host), {w['entries']} ok "
             f"entries; daemon start to first audit {doc['startup']['seconds']:.2f}s, "
             f"{doc['startup']['cpu_s']:.2f} CPU s, RSS {doc['startup']['rss_mb']:.1f} MB",
             "",
             f"{'figure':<52} {'value':>16}  target",
             "-" * 90]

    def row(label: str, value: str, target: str = "") -> None:
        lines.append(f"{label:<52} {value:>16}  {target}")

    row(f"a) interval 10 s, {a['wall_s'] / 60:.1f} min, tracer "
        + ("on" if doc.get("tracer", True) else "OFF"), "")
    row("   CPU share (CPU s / wall s, whole process)", f"{a['cpu_share'] * 100:.2f} %",
        f"<= {TARGET_CPU_SHARE * 100:.0f} % of one core: "
        + ("met" if a["met"] else "NOT MET"))
    row("   CPU seconds / wall seconds", f"{a['cpu_s']:.2f} / {a['wall_s']:.0f}")
    row("   audits done", f"{a['audits']}")
    if a["cpu_per_audit_s"] is not None:
        row("   CPU per audit, whole process", f"{a['cpu_per_audit_s'] * 1e3:.1f} ms")
    if "audit_thread_cpu_per_audit_s" in a:
        row("   CPU per audit, audit thread", f"{a['audit_thread_cpu_per_audit_s'] * 1e3:.1f} ms")
    if "tracer_thread_cpu_share" in a:
        row("   tracer thread alone (CPU s / wall s)",
            f"{a['tracer_thread_cpu_share'] * 100:.2f} %")
    if a["audit_wall_mean_s"] is not None:
        row("   audit duration (metrics, mean)", f"{a['audit_wall_mean_s'] * 1e3:.1f} ms")
    for tid, t in a["threads"].items():
        row(f"   thread {tid} {t['role']}", f"{t['cpu_s']:.2f} CPU s")
    row("   RSS min / max", f"{a['rss_mb']['min']:.1f} / {a['rss_mb']['max']:.1f} MB")
    row("   fds, threads: start -> end", f"{a['fds'][0]}->{a['fds'][1]}, "
        f"{a['thread_count'][0]}->{a['thread_count'][1]}")
    if b:
        row(f"b) interval 0.3 s, {b['audits']} audits in {b['wall_s']:.0f}s", "")
        row("   CPU per audit, whole process", f"{b['cpu_per_audit_s'] * 1e3:.1f} ms")
        row("   audit duration (metrics, mean)", f"{b['audit_wall_mean_s'] * 1e3:.1f} ms")
        row(f"   RSS low point per {b['block']} audits: spread", f"{b['rss_low_spread_mb']:.2f} MB",
            f"flat within +-{TARGET_RSS_BAND_MB:.0f} MB: " + ("met" if b["met"] else "NOT MET"))
        row("   drift (last block - first)", f"{b['rss_low_drift_mb']:+.2f} MB")
        row("   fds, threads: start -> end", f"{b['fds'][0]}->{b['fds'][1]}, "
            f"{b['thread_count'][0]}->{b['thread_count'][1]}")
        lines.append("   series (MB): " + " ".join(f"{x:.1f}" for x in b["rss_low_series_mb"]))
    lines.append(f"daemon exit status after SIGTERM: {doc['daemon_exit']}; "
                 f"log lines at warning or above: {doc['log_warnings']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (bpf, netns)", file=sys.stderr)
        return 2
    for tool in ("ip",):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    why_not = exact_source_missing()
    if why_not:
        print(why_not, file=sys.stderr)
        return 2
    log: Callable[..., None] = (
        (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json
        else (lambda *a: print(*a, flush=True)))

    world = World()
    tmp = Path(tempfile.mkdtemp(prefix="sg-daemon-cost-"))
    config = tmp / "sockguard.toml"
    port = free_port()
    daemon = Daemon([*sockguard_argv(), "run", "--config", str(config)], port, tmp / "daemon.log")

    def cleanup() -> None:
        daemon.stop()
        world.teardown()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        t0 = time.perf_counter()
        world.build(args.entries, args.sockets, args.netns, 0)
        log(f"world: {world.sockets} sockets in {len(world.procs)} workers over "
            f"{len(world.netns)} netns, {world.entries} entries in {world.pin} "
            f"({time.perf_counter() - t0:.1f}s to build)")
        write_config(config, world.pin, port, 10.0, args.tracer)
        t_start = time.monotonic()
        daemon.start()
        wait_for(lambda: (daemon.metrics().get("sockguard_audit_duration_seconds_count", 0)
                          >= 1), 120, "the first audit", daemon)
        s0 = read_proc(daemon.pid)
        startup = {"seconds": round(s0.t - t_start, 2), "cpu_s": round(s0.cpu, 2),
                   "rss_mb": round(s0.rss_kb / 1024, 1)}
        log(f"daemon pid {daemon.pid}: first audit after {startup['seconds']}s; "
            f"phase a: {args.minutes:g} min at interval 10 s ...")
        res_a, samples_a = phase_a(daemon, args.minutes, args.scrape, log)
        res_b = None
        cpu_b: dict[int, tuple[str, float]] = {}
        if args.audits:
            log(f"phase b: {args.audits} audits at interval 0.3 s ...")
            res_b = phase_b(daemon, config, world.pin, args.audits, args.block, args.period,
                            args.tracer, log)
            cpu_b = res_b.pop("thread_cpu")
        name_threads(daemon.pid, res_a, samples_a, cpu_b)
        rc = daemon.stop()
        text = daemon.log_path.read_text(errors="replace")
        warnings = [ln for ln in text.splitlines()
                    if re.search(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b", ln)]
        doc: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                        "python": platform.python_version()},
            "tracer": args.tracer,
            "world": {"sockets": world.sockets, "entries": world.entries,
                      "netns": len(world.netns), "workers": len(world.procs)},
            "startup": startup,
            "phase_a": res_a,
            "phase_b": res_b,
            "daemon_exit": rc,
            "log_warnings": len(warnings),
            "log_warning_lines": warnings[:20],
        }
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print()
            print(fmt_report(doc))
            for ln in warnings[:10]:
                print("  log:", ln)
        return 0 if res_a["met"] and (res_b is None or res_b["met"]) and rc == 0 else 1
    except KeyboardInterrupt:
        log("interrupted; tearing down")
        return 130
    except RuntimeError as exc:
        log(f"error: {exc}")
        return 2
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
