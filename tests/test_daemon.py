"""``sockguard run`` as a real process against the kernel lab.

Every test starts ``.venv/bin/sockguard run`` as a subprocess on the lab's
pinned map, talks to it only the way systemd and Prometheus do (signals, a
NOTIFY_SOCKET datagram socket the test binds, HTTP scrapes of /metrics with
urllib), fabricates map entries with the lab and checks what the daemon makes
of them.  Nothing is mocked: the daemon reads the real map and the real
sockets of the lab's namespaces.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.lab import Lab, cilium_key
from tests.lab.world import Lab as LabWorld

ROOT = Path(__file__).resolve().parents[1]
SOCKGUARD = ROOT / ".venv" / "bin" / "sockguard"
SERVER_PORT = 8080
CLIENT_PORT = 40000
STALE_PORT = 41000

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="sockguard run needs root (bpf, setns)"),
    pytest.mark.skipif(not SOCKGUARD.exists(), reason=f"{SOCKGUARD} not installed (make venv)"),
]


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RunningDaemon:
    """One ``sockguard run`` subprocess: its config file, log, metrics and signals."""

    def __init__(self, tmp: Path, map_path: Path, interval: float = 0.5,
                 remediate: bool = False, env: dict[str, str] | None = None,
                 entry_source: str = "auto", nofile: int | None = None,
                 extra: str = "", liveness_timeout: float | None = None) -> None:
        self.tmp = tmp
        self.liveness_timeout = liveness_timeout
        self.entry_source = entry_source
        self.port = free_port()
        self.config = tmp / "sockguard.toml"
        self.log_path = tmp / "daemon.log"
        self.map_path = map_path
        self.write_config(interval=interval, remediate=remediate, extra=extra)
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                 "JOURNAL_STREAM")}
        full_env.update(env or {})
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        def limit() -> None:  # RLIMIT_NOFILE as a unit's LimitNOFILE= would set it
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [str(SOCKGUARD), "run", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
            preexec_fn=limit if nofile is not None else None,
        )

    def write_config(self, interval: float, remediate: bool, extra: str = "") -> None:
        self.config.write_text(
            f'[audit]\ninterval = {interval}\nmaps = ["{self.map_path}"]\n'
            f'entry_source = "{self.entry_source}"\n'
            f"[remediation]\nenabled = {'true' if remediate else 'false'}\nmax_deletes = 10\n"
            f'[metrics]\naddress = "127.0.0.1"\nport = {self.port}\n'
            + (f"liveness_timeout = {self.liveness_timeout}\n"
               if self.liveness_timeout is not None else "") +
            f'[log]\ntarget = "stderr"\nlevel = "info"\n{extra}'
        )

    # -- observation -------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text()

    def healthz(self) -> tuple[int, str]:
        """What a Kubernetes livenessProbe sees: the status of GET /healthz and its body."""
        url = f"http://127.0.0.1:{self.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read()
        out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float | None:
        """One sample; labels given must match, others (map_id/map_name) are summed over."""
        try:
            samples = self.scrape()
        except OSError:
            return None
        want = set(labels.items())
        hits = [v for (n, lv), v in samples.items() if n == name and want <= set(lv)]
        return sum(hits) if hits else None

    def wait_value(self, name: str, pred: Callable[[float], bool], timeout: float,
                   **labels: str) -> float:
        seen: list[float | None] = []

        def check() -> bool:
            v = self.value(name, **labels)
            seen.append(v)
            return v is not None and pred(v)

        assert wait_for(check, timeout, 0.1), \
            f"{name}{labels}: last values {seen[-5:]}\n--- daemon log ---\n{self.log()}"
        v = self.value(name, **labels)
        assert v is not None
        return v

    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- control -----------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., RunningDaemon]]:
    started: list[RunningDaemon] = []

    def start(map_path: Path, **kwargs: object) -> RunningDaemon:
        d = RunningDaemon(tmp_path, map_path, **kwargs)  # type: ignore[arg-type]
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def _ready(d: RunningDaemon) -> float:
    """Wait for the first successful audit; its timestamp."""
    return d.wait_value("sockguard_last_successful_audit_timestamp_seconds",
                        lambda v: v > 0, timeout=SLOW)


T = TypeVar("T")
#: Generous bound for "eventually": audits of a loaded node take seconds, not 0.3 s.
SLOW = 30.0


def _within_one_interval(d: RunningDaemon, act: Callable[[], T], gauge: str,
                         **labels: str) -> T:
    """Do ``act``; the first audit that *started* after it must show ``gauge`` == 1.

    Counted in completed audits rather than seconds, so a loaded machine cannot make
    it flaky: the audit running during ``act`` may have read the map before it, the
    next one may not miss it.  The snapshot is published before the completion is
    counted (metrics.audit_succeeded), so once two more audits completed, the gauge
    shows at least the second one.
    """
    done = d.value("sockguard_audit_duration_seconds_count") or 0
    result = act()
    d.wait_value("sockguard_audit_duration_seconds_count", lambda v: v >= done + 2,
                 timeout=SLOW)
    assert d.value(gauge, **labels) == 1, d.log()
    return result


def _make_stale(lab: Lab) -> bytes:
    """A key for a tuple nobody uses, pointing at a dummy socket: a stale entry."""
    dummy, _peer = lab.dummy_pair()
    key = cilium_key(lab.pods[0].addr(), SERVER_PORT, lab.pods[1].addr(), STALE_PORT)
    lab.inject(key, dummy)
    return key


def _make_shadowing(lab: Lab) -> tuple[bytes, bytes, socket.socket, socket.socket]:
    """The incident: a dummy under the server key of a connection, then the connection.

    Returns (server key, client key, client socket, server socket).
    """
    server_pod, client_pod = lab.pods
    s_ip, c_ip = server_pod.addr(), client_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)
    server_key = cilium_key(s_ip, SERVER_PORT, c_ip, CLIENT_PORT)
    client_key = cilium_key(c_ip, CLIENT_PORT, s_ip, SERVER_PORT)
    dummy, _peer = lab.dummy_pair()
    lab.inject(server_key, dummy)
    cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    srv = lab.accept(listener)
    listener.close()
    return server_key, client_key, cli, srv


# -- findings and remediation ---------------------------------------------------------------


def test_gauges_follow_stale_and_shadowing_entries_and_nothing_is_deleted(
        lab: Lab, start_daemon: Callable[..., RunningDaemon]) -> None:
    """Remediation off (the default): findings are counted within an interval, never deleted."""
    d = start_daemon(lab.pin_path, interval=0.5)
    _ready(d)
    assert d.value("sockguard_map_entries") == 0
    assert d.value("sockguard_findings", kind="stale") == 0
    assert d.value("sockguard_remediation_enabled") == 0

    stale_key = _within_one_interval(d, lambda: _make_stale(lab), "sockguard_findings",
                                     kind="stale")
    assert d.value("sockguard_map_entries") == 1

    server_key, client_key, _cli, _srv = _within_one_interval(
        d, lambda: _make_shadowing(lab), "sockguard_findings", kind="shadowing")
    assert d.value("sockguard_map_entries") == 3  # stale + shadowing + the client's own key
    assert d.value("sockguard_findings", kind="stale") == 1
    assert d.value("sockguard_live_sockets") is not None
    assert (d.value("sockguard_namespaces_scanned") or 0) >= 3  # host + node + pods

    # Several more cycles: nothing is deleted.
    audits = d.value("sockguard_audits_total") or 0
    d.wait_value("sockguard_audits_total", lambda v: v >= audits + 3, timeout=SLOW)
    keys = set(lab.keys())
    assert {stale_key, server_key, client_key} <= keys
    assert d.value("sockguard_deletions_total") == 0
    log = d.log()
    assert "SOCKGUARD_KIND=stale" in log and "SOCKGUARD_KIND=shadowing" in log
    assert f"SOCKGUARD_KEY={stale_key.hex()}" in log
    assert log.count(f"SOCKGUARD_KEY={stale_key.hex()}") == 1, "a finding is logged once"
    assert d.alive()


def test_remediation_deletes_stale_and_shadowing_entries(
        lab: Lab, start_daemon: Callable[..., RunningDaemon], entry_source: str) -> None:
    d = start_daemon(lab.pin_path, interval=0.5, remediate=True, entry_source=entry_source)
    _ready(d)
    assert d.value("sockguard_remediation_enabled") == 1
    assert d.value("sockguard_entry_source_info", source=entry_source, exactness="cookie") == 1

    stale_key = _make_stale(lab)
    d.wait_value("sockguard_deletions_total", lambda v: v == 1, timeout=SLOW, kind="stale")
    assert stale_key not in lab.keys()

    server_key, client_key, _cli, _srv = _make_shadowing(lab)
    d.wait_value("sockguard_deletions_total", lambda v: v == 1, timeout=SLOW,
                 kind="shadowing")
    assert f"SOCKGUARD_KEY={server_key.hex()}" in d.log()
    keys = lab.keys()
    assert server_key not in keys
    assert client_key in keys, "the live client's own (ok) entry is kept"
    # And the gauges settle at zero once the deletes are seen by the next audit.
    d.wait_value("sockguard_findings", lambda v: v == 0, timeout=SLOW, kind="shadowing")
    d.wait_value("sockguard_findings", lambda v: v == 0, timeout=SLOW, kind="stale")
    assert "deleted stale entry" in d.log() and "deleted shadowing entry" in d.log()


def test_failing_audits_are_counted_and_the_daemon_keeps_running(
        lab_object: Path, lab: Lab, start_daemon: Callable[..., RunningDaemon]) -> None:
    """The map vanishes under a running daemon (Cilium restarted): logged, counted, alive.

    Its per-map series stop being exported (README: they vanish with their map), the
    ERROR is logged once however many cycles fail, and once more when audits recover.
    """
    with LabWorld(pods=2, obj_path=lab_object) as doomed:
        d = start_daemon(doomed.pin_path, interval=0.3)
        _ready(d)
        _make_stale(doomed)
        d.wait_value("sockguard_findings", lambda v: v == 1, timeout=SLOW, kind="stale")
        assert d.value("sockguard_map_entries") == 1
    # The lab is gone: its pin, map and namespaces with it.
    d.wait_value("sockguard_audit_failures_total", lambda v: v >= 4, timeout=SLOW,
                 reason="map_not_found")
    assert d.alive()
    failures = d.value("sockguard_audit_failures_total") or 0
    d.wait_value("sockguard_audits_total", lambda v: v >= failures + 1, timeout=SLOW)
    samples = d.scrape()
    gone = [k for k in samples if k[0] in ("sockguard_map_entries", "sockguard_findings",
                                           "sockguard_pending_entries",
                                           "sockguard_entry_source_info")]
    assert not gone, f"per-map series of a destroyed map still exported: {gone}"
    log = d.log()
    assert "audit failed (map_not_found)" in log
    assert log.count("ERROR: audit failed") == 1, "the same failure is logged once, not " \
        "every interval:\n" + log
    # Point the daemon at a live map: one line says audits work again.
    d.map_path = lab.pin_path
    d.write_config(interval=0.3, remediate=False)
    d.signal(signal.SIGHUP)
    assert wait_for(lambda: "audit succeeded again after" in d.log(), SLOW), d.log()
    assert d.log().count("audit succeeded again after") == 1


# -- systemd notify protocol -----------------------------------------------------------------


class NotifySocket:
    """The test's side of NOTIFY_SOCKET: a bound unix datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[str]:
        """Messages received during the next ``seconds``."""
        got: list[str] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            got.append(data.decode())
            self.messages.append((time.monotonic(), data.decode()))
        return got

    def wait(self, pred: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.collect(min(0.2, max(0.01, deadline - time.monotonic()))):
                if pred(msg):
                    return msg
        raise AssertionError(f"no matching notify message in {timeout} s; "
                             f"got {[m for _, m in self.messages[-10:]]}")

    def close(self) -> None:
        self.sock.close()


def _has(msgs: list[str], line: str) -> bool:
    return any(line in m.split("\n") for m in msgs)


def test_ready_status_and_watchdog_follow_audit_progress(
        lab: Lab, start_daemon: Callable[..., RunningDaemon], tmp_path: Path) -> None:
    block = tmp_path / "block"
    block.touch()  # the first audit hangs from the start
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        # WatchdogSec=2: pings every 0.5 s while the audit thread beat within 1 s.
        d = start_daemon(lab.pin_path, interval=1.0, env={
            "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000",
            "SOCKGUARD_TEST_BLOCK_FILE": str(block)})
        assert wait_for(lambda: "test hook: audit blocked" in d.log(), SLOW), d.log()
        # The heartbeat is older than WatchdogSec/2 after 1 s: from then on, silence.
        notify.collect(1.5)
        quiet = notify.collect(2.5)
        assert not _has(quiet, "READY=1"), "READY=1 before the first audit completed"
        assert not _has(quiet, "WATCHDOG=1"), f"pinged while the audit hung: {quiet}"

        block.unlink()
        ready = notify.wait(lambda m: "READY=1" in m.split("\n"), timeout=SLOW)
        status = [ln for ln in ready.split("\n") if ln.startswith("STATUS=")]
        assert status and "entries" in status[0] and "stale" in status[0] \
            and "last audit" in status[0], ready
        later = notify.collect(3.0)
        assert _has(later, "WATCHDOG=1"), f"no pings while healthy: {later}"
        assert any(m.startswith("STATUS=1 maps") for m in later), later

        # A hung audit later on stops the pings again ...
        block.touch()
        assert wait_for(lambda: d.log().count("test hook: audit blocked") >= 2, SLOW), d.log()
        notify.collect(1.5)
        assert not _has(notify.collect(2.5), "WATCHDOG=1")
        # ... and they come back with progress.
        block.unlink()
        notify.wait(lambda m: m == "WATCHDOG=1", timeout=SLOW)
        assert d.alive()

        d.signal(signal.SIGTERM)
        assert d.proc.wait(timeout=5) == 0
        assert _has(notify.collect(0.3) + [m for _, m in notify.messages], "STOPPING=1")
    finally:
        notify.close()
        if block.exists():
            block.unlink()


def test_healthz_answers_503_while_an_audit_hangs_and_200_with_progress(
        lab: Lab, start_daemon: Callable[..., RunningDaemon], tmp_path: Path) -> None:
    """The livenessProbe's view of the watchdog test above: no systemd, only HTTP."""
    block = tmp_path / "block"
    d = start_daemon(lab.pin_path, interval=0.3, liveness_timeout=1.0,
                     env={"SOCKGUARD_TEST_BLOCK_FILE": str(block)})
    try:
        _ready(d)
        status, body = d.healthz()
        assert status == 200 and body.startswith("ok: the audit thread made progress"), body
        assert d.scrape(), "/metrics still serves the metrics"

        block.touch()  # the next cycle hangs, as in a syscall that never returns
        assert wait_for(lambda: "test hook: audit blocked" in d.log(), SLOW), d.log()
        assert wait_for(lambda: d.healthz()[0] == 503, 5.0), d.healthz()
        status, body = d.healthz()
        assert "no progress from the audit thread" in body \
            and "metrics.liveness_timeout = 1 s" in body, body
        assert d.scrape(), "a hung audit does not take the metrics endpoint down"

        audits = d.value("sockguard_audits_total") or 0
        block.unlink()
        assert wait_for(lambda: d.healthz()[0] == 200, SLOW), d.healthz()
        d.wait_value("sockguard_audits_total", lambda v: v > audits, timeout=SLOW)
        assert d.alive()
    finally:
        if block.exists():
            block.unlink()


# -- signals ---------------------------------------------------------------------------------


def test_sighup_with_a_good_config_applies_the_new_interval(
        lab: Lab, start_daemon: Callable[..., RunningDaemon]) -> None:
    d = start_daemon(lab.pin_path, interval=30.0)
    _ready(d)
    assert d.value("sockguard_audit_interval_seconds") == 30.0
    audits = d.value("sockguard_audits_total") or 0
    time.sleep(1.0)
    assert d.value("sockguard_audits_total") == audits, "30 s interval: no second audit yet"

    d.write_config(interval=0.2, remediate=False)
    d.signal(signal.SIGHUP)
    d.wait_value("sockguard_config_reloads_total", lambda v: v == 1, timeout=5,
                 result="success")
    assert d.value("sockguard_audit_interval_seconds") == 0.2
    # The new interval takes effect at once, not after the old 30 s wait.
    d.wait_value("sockguard_audits_total", lambda v: v >= audits + 4, timeout=SLOW)
    assert "configuration reloaded: audit.interval=0.2" in d.log()
    assert d.alive()


# (Every kind of bad file is a unit test in test_config.py; here: the daemon's handling.)
@pytest.mark.parametrize("bad", [
    "[audit\ninterval = 1\n",                 # not TOML
    "[audit]\ninterval = 1\nspeed = 3\n",     # unknown key
    "[audit]\ninterval = inf\n",              # one audit, then silence
    "[audit]\ninterval = nan\n",
    "[audit]\ninterval = 1e308\n",
    "[audit]\nconfirm_delay = inf\n",         # every cycle would crash
])
def test_sighup_with_a_bad_config_keeps_the_old_one(
        lab: Lab, start_daemon: Callable[..., RunningDaemon], bad: str) -> None:
    d = start_daemon(lab.pin_path, interval=0.3)
    _ready(d)
    d.config.write_text(bad)
    d.signal(signal.SIGHUP)
    d.wait_value("sockguard_config_reloads_total", lambda v: v == 1, timeout=5,
                 result="failure")
    assert d.log().count("reload rejected, keeping the running configuration") == 1
    assert d.value("sockguard_audit_interval_seconds") == 0.3
    audits = d.value("sockguard_audits_total") or 0
    d.wait_value("sockguard_audits_total", lambda v: v >= audits + 2, timeout=SLOW)
    assert d.alive()


def test_sigterm_during_a_hung_audit_exits_0_promptly(
        lab: Lab, start_daemon: Callable[..., RunningDaemon], tmp_path: Path) -> None:
    block = tmp_path / "block"
    d = start_daemon(lab.pin_path, interval=0.3,
                     env={"SOCKGUARD_TEST_BLOCK_FILE": str(block)})
    _ready(d)
    block.touch()
    try:
        assert wait_for(lambda: "test hook: audit blocked" in d.log(), SLOW), d.log()
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 5.0
        assert "abandoning the audit in progress" in d.log()
    finally:
        block.unlink()


def test_sigterm_between_audits_exits_0(
        lab: Lab, start_daemon: Callable[..., RunningDaemon]) -> None:
    d = start_daemon(lab.pin_path, interval=30.0)  # after the first audit: a long wait
    _ready(d)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(timeout=5) == 0
    assert time.monotonic() - t0 < 5.0
    assert "stopped" in d.log()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics", timeout=1)



def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for ``sig`` (the SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines()
                if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_as_soon_as_the_handlers_are_in_is_not_fatal(
        lab: Lab, start_daemon: Callable[..., RunningDaemon], sig: int) -> None:
    """Start-up takes a while (imports, config, metrics, BPF loads); the handlers go
    in first, so SIGTERM then is a clean stop and SIGHUP a no-op, not death."""
    d = start_daemon(lab.pin_path, interval=0.3)
    assert wait_for(lambda: _catches(d.proc.pid, signal.SIGTERM)
                    and _catches(d.proc.pid, signal.SIGHUP), 10, step=0.001), d.log()
    d.signal(sig)
    if sig == signal.SIGTERM:
        assert d.proc.wait(timeout=10) == 0, d.log()
        assert "stopp" in d.log() and "Traceback" not in d.log()
        return
    _ready(d)
    assert d.alive()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(timeout=10) == 0, d.log()


def test_a_burst_of_sighups_then_sigterm_exits_0(
        lab: Lab, start_daemon: Callable[..., RunningDaemon]) -> None:
    """Thousands of SIGHUPs land wherever the main thread is: reloads, audits and a
    clean stop must survive them.  (That the handler takes no lock at all is
    test_signals.py's deterministic test; a burst only rarely hits the window.)"""
    d = start_daemon(lab.pin_path, interval=0.3)
    _ready(d)
    deadline = time.monotonic() + 3.0
    sent = 0
    while time.monotonic() < deadline:
        d.signal(signal.SIGHUP)
        sent += 1
        time.sleep(0.0005)
    assert d.alive(), d.log()[-3000:]
    reloads = d.wait_value("sockguard_config_reloads_total", lambda v: v >= 1, timeout=5,
                           result="success")
    assert reloads <= sent
    audits = d.value("sockguard_audits_total") or 0
    d.wait_value("sockguard_audits_total", lambda v: v >= audits + 2, timeout=SLOW)
    d.signal(signal.SIGTERM)
    try:
        code = d.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"SIGTERM after {sent} SIGHUPs: still running 10 s later\n"
                    f"{d.log()[-3000:]}")
    assert code == 0, d.log()[-3000:]
    assert "stopped" in d.log()


# -- the metrics endpoint under a local user's idle connections --------------------------------

#: A local user's connections: more than the 1024 fds systemd gives a service by default.
IDLE_CONNECTIONS = 1100


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_idle_connections_to_the_metrics_port_starve_neither_scrapes_nor_audits(
        lab: Lab, start_daemon: Callable[..., RunningDaemon]) -> None:
    """1,100 idle TCP connections to the port, the daemon at the default RLIMIT_NOFILE 1024.

    Before the endpoint was bounded each connection held a thread and an fd forever:
    scrapes failed and audits failed with EMFILE. Now scrapes answer in < 1 s, the
    daemon's fds and threads stay bounded and the next audits see the lab's entries.
    """
    d = start_daemon(lab.pin_path, interval=0.5, nofile=1024)
    _ready(d)
    stale_key = _make_stale(lab)
    d.wait_value("sockguard_findings", lambda v: v == 1, timeout=SLOW, kind="stale")
    pid = d.proc.pid
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_CONNECTIONS + 512:  # this test process holds the connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE_CONNECTIONS + 1024), hard))
    conns: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            conns.append(socket.create_connection(("127.0.0.1", d.port), timeout=10))
        latencies = []
        for _ in range(5):
            t0 = time.monotonic()
            body = urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics",
                                          timeout=5).read()
            latencies.append(time.monotonic() - t0)
            assert b"sockguard_audits_total" in body
        print(f"scrape latency under {IDLE_CONNECTIONS} idle connections: "
              f"max {max(latencies) * 1000:.1f} ms")
        assert max(latencies) < 1.0, latencies
        assert _fds(pid) < 200, f"daemon holds {_fds(pid)} fds"
        assert _threads(pid) < 20, f"daemon runs {_threads(pid)} threads"
        # The next audits complete and see the lab's entry as it is.
        done = d.value("sockguard_audit_duration_seconds_count") or 0
        d.wait_value("sockguard_audit_duration_seconds_count", lambda v: v >= done + 2,
                     timeout=SLOW)
        assert d.value("sockguard_findings", kind="stale") == 1
        assert d.value("sockguard_map_entries") == 1
        assert d.value("sockguard_audit_failures_total") == 0, d.log()
        assert stale_key in lab.keys()
        assert d.alive()
    finally:
        for c in conns:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

