"""A new connection colliding with a stale key, seen when it is established.

Units (no root): the same-socket comparison (cookie, then tuple/state/netns),
the two looks before a collision is reported, the ``collision`` detection's
plan and the event's rendering.  Kernel (the lab): the hang reproduced for
real — a stale entry's socket under the key the server side of the next
connection gets, the server blocked in ``epoll_wait``/``select`` (no read
ever returns), the client sending its request — and the tracer reporting the
collision within ~2 s of connect while the server still waits, in the
daemon's filtered configuration and in ``sockguard trace``'s unfiltered one,
with the tp_btf and the raw_tp lifecycle programs; a healthy connection
(also one that reuses a still-watched tuple) reports none; the daemon counts
it, logs it and audits at once.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockguard.core.model import Endpoint, Tuple4
from sockguard.kernel import libbpf
from sockguard.kernel.capabilities import Capabilities, Feature
from sockguard.trace.collision import (
    Candidate,
    CollisionCheck,
    CollisionGate,
    Entry,
    entry_of,
    record_tuple,
    same_socket,
)
from sockguard.trace.detections import plan
from sockguard.trace.events import Meaning, TraceEvent
from sockguard.trace.tracer import Tracer, TracerOptions, daemon_options
from sockguard.trace.watched import MapWatch
from tests.lab import Lab, cilium_key, close_rst, key_for, recv_exact
from tests.test_daemon import RunningDaemon, start_daemon, wait_for

__all__ = ["start_daemon"]

ROOT = Path(__file__).resolve().parents[1]
SOCKGUARD = ROOT / ".venv" / "bin" / "sockguard"
#: A client port of its own per run: labs of tests running at the same time use the same
#: pod addresses, and an unfiltered tracer sees every namespace's connections.
SERVER_PORT, CLIENT_PORT = 8080, 42000 + secrets.randbelow(8000)
SO_COOKIE = 57
#: The bound the task sets for "within about a second of connect".
DETECT_WITHIN = 2.0

# -- units ----------------------------------------------------------------------------------


def _t(local: str, lport: int, remote: str, rport: int) -> Tuple4:
    from ipaddress import ip_address

    lip, rip = ip_address(local), ip_address(remote)
    return Tuple4(lip.version, Endpoint(lip, lport), Endpoint(rip, rport))


SRV = _t("10.200.0.2", SERVER_PORT, "10.200.1.2", CLIENT_PORT)
STALE = _t("127.0.0.1", 45000, "127.0.0.1", 45001)


def _entry(sock: Tuple4 | None, cookie: int | None, state: int = 1,
           netns: int | None = None) -> Entry:
    return Entry(7, "cilium_sock_ops", cookie, sock, "?", state, netns, False, "tc lookup")


def test_same_socket_by_cookie_first() -> None:
    assert same_socket(11, SRV, 1, _entry(STALE, 11)) == (True, "cookie")  # cookie wins
    assert same_socket(11, SRV, 1, _entry(SRV, 12)) == (False, "cookie")
    # the event's socket had its cookie before the look; the entry's socket has none
    assert same_socket(11, SRV, 1, _entry(SRV, 0)) == (False, "cookie")


def test_same_socket_by_tuple_when_a_cookie_is_missing() -> None:
    # raw_tp: the event carries skc_cookie, 0 for a socket nobody asked about yet
    assert same_socket(0, SRV, 1, _entry(SRV, 99)) == (True, "tuple")
    assert same_socket(0, SRV, 1, _entry(STALE, 99)) == (False, "tuple")
    # a tuple-only tc lookup (cookie unknown)
    assert same_socket(11, SRV, 1, _entry(SRV, None)) == (True, "tuple")
    assert same_socket(11, SRV, 1, _entry(STALE, None)) == (False, "tuple")
    # same tuple but not connected (a reset socket keeps its entry), or another netns
    assert same_socket(0, SRV, 1, _entry(SRV, None, state=7)) == (False, "tuple")
    assert same_socket(0, SRV, 1, _entry(SRV, 0, netns=2)) == (False, "tuple")
    assert same_socket(0, SRV, 1, _entry(None, None)) == (False, "tuple")


def test_records_fold_ipv4_mapped_addresses() -> None:
    mapped = lambda ip: IPv6Address(f"::ffff:{ip}").packed  # noqa: E731
    rec = (b"k", 5, 9, socket.AF_INET6, 1, mapped("10.200.0.2"), mapped("10.200.1.2"),
           SERVER_PORT, CLIENT_PORT, False, 0)
    assert record_tuple(rec) == SRV
    v4 = (b"k", -1, 0, socket.AF_INET, 8, IPv4Address("10.200.0.2").packed,
          IPv4Address("10.200.1.2").packed, SERVER_PORT, CLIENT_PORT, False, 0)
    e = entry_of(v4, 7, "m", "tc lookup")
    assert (e.sock, e.cookie, e.netns, e.state) == (SRV, None, None, "CLOSE_WAIT")
    v6 = (b"k", 0, 0, socket.AF_INET6, 1, IPv6Address("fd00::1").packed,
          IPv6Address("fd00::2").packed, 1, 2, False, 0)
    assert record_tuple(v6) == _t("fd00::1", 1, "fd00::2", 2)


@dataclass
class FakeReader:
    """Answers per look from a script: one dict of key -> entries per call."""

    answers: list[dict[bytes, list[Entry]]]
    asked: list[set[bytes]] = field(default_factory=list)

    def read(self, keys: Collection[bytes]) -> dict[bytes, list[Entry]]:
        self.asked.append(set(keys))
        return self.answers.pop(0) if self.answers else {}


def _cand(now: float) -> Candidate:
    return Candidate(b"key", 11, SRV, 1, now, "event")


def _check(answers: list[dict[bytes, list[Entry]]]) -> tuple[CollisionCheck, FakeReader]:
    reader = FakeReader(answers)
    return CollisionCheck(reader, delay=0.05), reader  # type: ignore[arg-type]


def test_a_collision_is_reported_only_at_the_second_look() -> None:
    other = {b"key": [_entry(STALE, 0)]}
    check, reader = _check([other, other])
    check.offer(_cand(100.0))
    assert check.run(100.0) == []  # the insert may still be on its way
    assert check.next_due() == pytest.approx(100.05)
    assert check.run(100.01) == []  # not due yet: no look
    got = check.run(100.06)
    assert len(got) == 1 and got[0].entry.sock == STALE and got[0].compared_by == "cookie"
    assert got[0].first_look == 100.0 and got[0].candidate.payload == "event"
    assert check.next_due() is None and len(reader.asked) == 2


def test_no_collision_when_the_second_look_finds_the_socket_or_nothing() -> None:
    # the entry's socket owns the same tuple in another namespace: the audit's ``ok``
    for second in ({b"key": [_entry(SRV, 11)]}, {}, {b"key": [_entry(SRV, 12, netns=2)]}):
        check, _ = _check([{b"key": [_entry(STALE, 0)]}, second])
        check.offer(_cand(0.0))
        assert check.run(0.0) == [] and check.run(1.0) == []
        assert check.next_due() is None
    check, reader = _check([{b"key": [_entry(SRV, 11)]}])  # healthy: one look, done
    check.offer(_cand(0.0))
    assert check.run(0.0) == [] and check.next_due() is None and len(reader.asked) == 1


# -- the gate: when the check listens ------------------------------------------------------


def test_the_gate_listens_until_an_audit_proves_every_map() -> None:
    gate = CollisionGate()
    assert gate.listening([7])  # nothing proved yet
    gate.audited(10.0, None)  # an audit that found something, or failed
    assert gate.listening([7])
    gate.audited(20.0, [7])
    assert not gate.listening([7]) and not gate.listening([])
    assert gate.listening([7, 8])  # a map the proof did not cover
    gate.audited(30.0, None)
    assert gate.listening([7])


def test_an_entry_gone_bad_reopens_the_gate_until_a_later_audit_proves_it_again() -> None:
    gate = CollisionGate()
    gate.audited(10.0, [7])
    gate.suspect(12.0)
    assert gate.listening([7])
    gate.audited(11.0, [7])  # started before the event: it may have read the map before
    assert gate.listening([7])
    gate.suspect(5.0)  # an older report changes nothing
    gate.audited(12.0, [7])  # started at the event: still not after it
    assert gate.listening([7])
    gate.audited(12.5, [7])
    assert not gate.listening([7])


def test_always_listens_and_unknown_modes_are_refused() -> None:
    gate = CollisionGate("always")
    gate.audited(1.0, [7])
    assert gate.listening([7])
    gate.mode = "auto"  # a reload
    assert not gate.listening([7])
    with pytest.raises(ValueError, match="never"):
        CollisionGate("never")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(("audit", "fail", "suspect")),
                          st.floats(0, 100), st.frozensets(st.integers(1, 4), max_size=3)),
                max_size=12),
       st.frozensets(st.integers(1, 4), max_size=3))
def test_the_gate_is_idle_only_after_a_proof_later_than_every_suspicion(
        steps: list[tuple[str, float, frozenset[int]]], maps: frozenset[int]) -> None:
    """Fail closed: idle means the last audit proved every current map, and no entry
    went bad at or after that audit's start."""
    gate = CollisionGate()
    last: tuple[float, frozenset[int]] | None = None
    suspicions: list[float] = []
    for what, when, ids in steps:
        if what == "audit":
            gate.audited(when, ids)
            last = (when, ids)
        elif what == "fail":
            gate.audited(when, None)
            last = None
        else:
            gate.suspect(when)
            suspicions.append(when)
    if not gate.listening(maps):
        assert last is not None and maps <= last[1]
        assert all(t < last[0] for t in suspicions)
    elif last is not None and maps <= last[1] and all(t < last[0] for t in suspicions):
        pytest.fail("listening although the last audit proved every map after every "
                    "suspicion")


def _caps(**available: bool) -> Capabilities:
    from sockguard.kernel.capabilities import FEATURE_ORDER

    return Capabilities({n: Feature(n, available.get(n, True), f"{n} said so")
                         for n in FEATURE_ORDER})


def test_collision_detection_plan() -> None:
    got = plan(_caps())["collision"]
    assert (got.active, got.via) == (True, "tc lookup") and "tp_btf" in got.reason
    got = plan(_caps(tc_lookup=False, tp_btf_sock=False))["collision"]
    assert (got.active, got.via) == (True, "iter/sockmap") and "raw_tp" in got.reason
    assert "tc_lookup said so" in got.reason
    got = plan(_caps(tc_lookup=False, iter_sockmap=False))["collision"]
    assert not got.active and got.via is None
    assert "tc_lookup said so" in got.reason and "iter_sockmap said so" in got.reason
    got = plan(_caps(tp_btf_sock=False, raw_tp=False))["collision"]
    assert not got.active and "lifecycle" in got.reason


def test_collision_event_rendering() -> None:
    key = cilium_key("10.200.0.2", SERVER_PORT, "10.200.1.2", CLIENT_PORT)
    ev = TraceEvent(kind="collision", time=1.5, pid=0, tid=0, comm="swapper/0", netns=4,
                    cookie=11, sock=SRV, state="ESTABLISHED", source="tp_btf",
                    old_state="SYN_RECV", key_hex=key.hex(), map_id=7,
                    map_name="cilium_sock_ops", key_in_maps=("cilium_sock_ops#7",),
                    entry=_entry(STALE, 0), compared_by="cookie", detected_after=0.06)
    assert ev.collision and not ev.left_behind and not ev.mismatch
    doc = ev.as_dict()
    assert doc["event"] == "collision" and doc["local"] == "10.200.0.2:8080"
    assert doc["entry"] == {"cookie": 0, "state": "?", "netns": None, "via": "tc lookup",
                            "local": "127.0.0.1:45000", "remote": "127.0.0.1:45001"}
    assert doc["key_hex"] == key.hex() and doc["compared_by"] == "cookie"
    assert doc["detected_after"] == 0.06
    json.dumps(doc)
    line = ev.line()
    assert "COLLISION" in line and "127.0.0.1:45000 -> 127.0.0.1:45001" in line


# -- kernel: the lab ------------------------------------------------------------------------

VARIANTS = ("tp_btf", "raw_tp")
MODES = ("daemon", "trace")


def _caps_for(variant: str) -> Capabilities:
    """The probe's answers, with the tp_btf lifecycle variant taken away for ``raw_tp``."""
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    from sockguard.kernel.capabilities import probe

    caps = probe()
    if variant == "raw_tp":
        if not caps.ok("raw_tp"):
            pytest.skip(f"raw_tp cannot run here: {caps['raw_tp'].reason}")
        caps = Capabilities({**caps.features, "tp_btf_sock": Feature(
            "tp_btf_sock", False, "left out by the test: the raw_tp variant")})
    elif not caps.ok("tp_btf_sock"):
        pytest.skip(f"the tp_btf lifecycle variant cannot run here: "
                    f"{caps['tp_btf_sock'].reason}")
    return caps


class Traced:
    """A started tracer on the lab's map (daemon or trace configuration)."""

    def __init__(self, lab: Lab, mode: str, variant: str) -> None:
        from sockguard.kernel.maps import resolve_map

        self.events: list[TraceEvent] = []
        options = daemon_options() if mode == "daemon" else TracerOptions()
        watch = MapWatch(lambda: [resolve_map(str(lab.pin_path))], refresh=0.0)
        self.tracer = Tracer(self.events.append, options, watch, caps=_caps_for(variant))
        self.detections = self.tracer.start()
        for name in ("lifecycle", "collision"):
            det = self.detections[name]
            if not det.active:
                self.tracer.close()
                pytest.skip(f"{name} cannot run here: {det.reason}")
        assert self.detections["lifecycle"].via == variant
        if mode == "daemon":
            assert self.tracer.filtering

    def refresh(self) -> None:
        """Make the watched set catch up with the map now (the daemon does it every second)."""
        if self.tracer.watched is not None:
            self.tracer.watched.due = 0.0
        self.tracer.poll(0)

    def collisions(self, netns: set[int]) -> list[TraceEvent]:
        """Collisions of sockets in ``netns`` (the lab's; other tests' labs run alongside)."""
        return [e for e in self.events if e.collision and e.netns in netns]

    def wait_collision(self, timeout: float, netns: set[int]) -> TraceEvent | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tracer.poll(20)
            if self.collisions(netns):
                return self.collisions(netns)[0]
        return None


def _netns(lab: Lab) -> set[int]:
    """Inode numbers of the lab's pod namespaces."""
    return {os.stat(p.path).st_ino for p in lab.pods}


@pytest.fixture
def traced(lab: Lab) -> Iterator[Callable[[str, str], Traced]]:
    made: list[Traced] = []

    def make(mode: str, variant: str) -> Traced:
        t = Traced(lab, mode, variant)
        made.append(t)
        return t

    yield make
    for t in made:
        t.tracer.close()


class BlockedServer:
    """Accepts one connection, then waits for it to be readable and nothing else.

    ``how`` = "epoll" (epoll_wait) or "select": the server never calls recvmsg
    before data arrives, so the receive-path tracer has nothing to see.
    """

    def __init__(self, lab: Lab, listener: socket.socket, how: str, wait: float = 5.0) -> None:
        self.lab, self.listener, self.how, self.wait = lab, listener, how, wait
        self.conn: socket.socket | None = None
        self.readable_at: float | None = None  # when the wait returned with data
        self.read: bytes | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._serve()
        except (OSError, ValueError) as exc:  # the lab closed the socket under a failed test
            self.error = exc

    def _serve(self) -> None:
        conn = self.lab.accept(self.listener)
        self.conn = conn
        if self.how == "epoll":
            ep = select.epoll()
            try:
                ep.register(conn.fileno(), select.EPOLLIN)
                ready = bool(ep.poll(self.wait))
            finally:
                ep.close()
        else:
            ready = bool(select.select([conn], [], [], self.wait)[0])
        if ready:
            self.readable_at = time.monotonic()
            conn.setblocking(True)
            self.read = conn.recv(4096)

    def join(self) -> None:
        self.thread.join(self.wait + 5)


def _cookie(s: socket.socket) -> int:
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def _tuple_of(s: socket.socket) -> Tuple4:
    return _t(*s.getsockname()[:2], *s.getpeername()[:2])


def _map_id(lab: Lab) -> int:
    return libbpf.map_info(lab.map_fd).id


@pytest.mark.kernel
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("mode", "how"), [("daemon", "epoll"), ("trace", "select")])
def test_collision_reported_at_connect_while_the_server_waits(
        lab: Lab, traced: Callable[[str, str], Traced], mode: str, how: str,
        variant: str) -> None:
    """The hang for real: no read returns, yet the collision is reported within ~2 s."""
    t = traced(mode, variant)
    server_pod, client_pod = lab.pods
    s_ip, c_ip = server_pod.addr(), client_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)
    server_key = cilium_key(s_ip, SERVER_PORT, c_ip, CLIENT_PORT)
    stale, _peer = lab.dummy_pair()
    lab.inject(server_key, stale)
    t.refresh()  # the stale key has been in the map for a while: the daemon watches it
    server = BlockedServer(lab, listener, how)

    t0 = time.monotonic()
    cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    request = b"GET /healthz HTTP/1.1\r\n\r\n"
    cli.sendall(request)
    ev = t.wait_collision(DETECT_WITHIN + 1.0, _netns(lab))
    latency = time.monotonic() - t0
    mine = [e.line() for e in t.events if e.netns in _netns(lab)]
    why = f"latency {latency:.3f} s, server {server.__dict__}; lab's events:\n" + \
        "\n".join(mine)
    assert ev is not None, why
    assert server.readable_at is None and server.read is None, why  # nothing read
    assert latency < DETECT_WITHIN, why
    print(f"collision ({mode}, {variant}) reported {latency * 1000:.0f} ms after connect, "
          f"{(ev.detected_after or 0) * 1000:.0f} ms after ESTABLISHED", file=sys.stderr)

    # the event names the socket, the key and the socket the entry points to
    assert server.conn is not None
    srv = server.conn
    assert ev.sock == _tuple_of(srv) and ev.old_state == "SYN_RECV", why
    assert ev.key_hex == server_key.hex() and ev.key is not None and ev.key.owner == ev.sock
    assert (ev.map_id, ev.map_name) == (_map_id(lab), "cilium_sock_ops")
    assert ev.entry is not None and ev.entry.sock == _tuple_of(stale), why
    assert ev.entry.state == "ESTABLISHED" and ev.entry.map_id == _map_id(lab), why
    if variant == "tp_btf":  # bpf_get_socket_cookie in the program: the socket's own cookie
        assert ev.cookie == _cookie(srv) and ev.compared_by == "cookie", why
    else:  # raw_tp reads skc_cookie: 0 for a new socket, so the tuple decides
        assert ev.compared_by in ("cookie", "tuple")
    if ev.entry.cookie:
        assert ev.entry.cookie == _cookie(stale), why
    assert ev.detected_after is not None and 0 <= ev.detected_after < DETECT_WITHIN, why
    assert len(t.collisions(_netns(lab))) == 1, why  # the client's side is healthy
    doc = ev.as_dict()
    assert doc["event"] == "collision" and doc["entry"]["local"] == "{}:{}".format(
        *stale.getsockname()[:2])

    # and it really is the hang: the request sits in the stale entry's socket
    assert recv_exact(stale, len(request)) == request
    server.join()
    assert server.read is None


@pytest.mark.kernel
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_healthy_connections_report_no_collision(
        lab: Lab, traced: Callable[[str, str], Traced], mode: str, variant: str) -> None:
    t = traced(mode, variant)
    server_pod, client_pod = lab.pods
    s_ip = server_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)

    # 1. A fresh tuple: the server (blocked in epoll_wait) gets the request.
    server = BlockedServer(lab, listener, "epoll")
    cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    cli.sendall(b"ping")
    server.join()
    assert server.read == b"ping"
    t.refresh()  # now both keys are watched

    # 2. The same tuple again before the watched set has caught up: its ESTABLISHED
    #    events are sent (the key is still watched), and the look finds the new sockets.
    assert server.conn is not None
    close_rst(cli)
    close_rst(server.conn)
    assert wait_for(lambda: lab.keys() == [], 5)
    checked = t.tracer.collisions.checked if t.tracer.collisions else 0
    server = BlockedServer(lab, listener, "epoll")
    cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    cli.sendall(b"pong")
    server.join()
    assert server.read == b"pong"
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        t.tracer.poll(50)
    assert t.collisions(_netns(lab)) == []
    assert t.tracer.collisions is not None and t.tracer.collisions.checked >= checked + 2
    established = [e for e in t.events if e.kind == "state" and e.state == "ESTABLISHED"
                   and e.sock == _tuple_of(server.conn)]
    assert established, "the reused tuple's ESTABLISHED was not seen"


def _reset_event(t: Traced, srv_tuple: Tuple4, timeout: float = 3.0) -> TraceEvent | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t.refresh()  # a parked reset is taken at a refresh
        for e in t.events:
            if e.kind == "reset" and e.sock == srv_tuple:
                return e
        t.tracer.poll(20)
    return None


@pytest.mark.kernel
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_reset_is_seen_and_collisions_are_checked_only_while_listening(
        lab: Lab, traced: Callable[[str, str], Traced], variant: str) -> None:
    """The daemon's tracer sees the stale entry of a reset as it is born, and
    detached (``listen_for_collisions(False)``) its ESTABLISHED program runs no
    more: the colliding reconnect is seen only once it listens again."""
    t = traced("daemon", variant)
    if t.tracer.blind_spot is not None:
        pytest.skip(f"the collision check cannot idle here: {t.tracer.blind_spot}")
    assert t.tracer.listening
    assert t.tracer.listen_for_collisions(False) is False and not t.tracer.listening
    server_pod, client_pod = lab.pods
    s_ip = server_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)
    cli, srv = lab.pair(client_pod, server_pod, SERVER_PORT, src_port=CLIENT_PORT,
                        listener=listener)
    srv_key, srv_tuple = key_for(srv), _tuple_of(srv)
    assert wait_for(lambda: srv_key in lab.keys(), 5)
    t.refresh()  # both keys watched
    close_rst(cli)  # the server's socket is reset; the test holds its fd
    ev = _reset_event(t, srv_tuple)
    mine = "\n".join(e.line() for e in t.events if e.netns in _netns(lab))
    assert ev is not None, mine
    assert ev.errno_name == "ECONNRESET" and ev.state == "CLOSE", ev.line()
    assert ev.key_in_maps == (f"cilium_sock_ops#{_map_id(lab)}",)
    assert ev.meaning is Meaning.RESET_HELD and not ev.left_behind
    assert srv_key in lab.keys()  # the stale entry of a reset, held open

    def reconnect() -> socket.socket:
        server = BlockedServer(lab, listener, "epoll", wait=1.0)
        c = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
        c.sendall(b"GET /")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            t.tracer.poll(20)
        server.join()
        assert server.read is None  # the hang: the payload went to the reset socket
        if server.conn is not None:
            close_rst(server.conn)
        return c

    # detached: the colliding connection's ESTABLISHED is not even seen
    close_rst(reconnect())
    seen = [e for e in t.events if e.kind == "state" and e.netns in _netns(lab)]
    assert seen == [] and t.collisions(_netns(lab)) == []
    # listening again: the next reconnect on that tuple is reported
    assert t.tracer.listen_for_collisions(True) and t.tracer.listening
    close_rst(reconnect())
    found = t.collisions(_netns(lab)) or [t.wait_collision(DETECT_WITHIN, _netns(lab))]
    assert found[0] is not None, "\n".join(e.line() for e in t.events)
    assert found[0].entry is not None and found[0].entry.state == "CLOSE"
    assert found[0].key_hex == srv_key.hex()


@pytest.mark.kernel
def test_trace_json_prints_the_collision(lab: Lab) -> None:
    if os.geteuid() != 0 or not SOCKGUARD.exists():
        pytest.skip("sockguard trace needs root and the installed command")
    caps = _caps_for("tp_btf")
    if not plan(caps)["collision"].active:
        pytest.skip(f"collision cannot run here: {plan(caps)['collision'].reason}")
    server_pod, client_pod = lab.pods
    s_ip, c_ip = server_pod.addr(), client_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)
    key = cilium_key(s_ip, SERVER_PORT, c_ip, CLIENT_PORT)
    stale, _peer = lab.dummy_pair()
    lab.inject(key, stale)
    proc = subprocess.Popen([str(SOCKGUARD), "trace", "--json", "--duration", "3",
                             "--map", str(lab.pin_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()
        assert "collision (" in banner, banner
        server = BlockedServer(lab, listener, "epoll", wait=3.0)
        cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
        cli.sendall(b"GET /")
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    found = [json.loads(line) for line in out.splitlines()
             if json.loads(line)["event"] == "collision"
             and json.loads(line)["netns"] in _netns(lab)]
    assert len(found) == 1, out
    ev = found[0]
    assert ev["local"] == f"{s_ip}:{SERVER_PORT}" and ev["remote"] == f"{c_ip}:{CLIENT_PORT}"
    assert ev["key_hex"] == key.hex()
    assert ev["entry"]["local"] == "{}:{}".format(*stale.getsockname()[:2])
    server.join()
    assert server.read is None


# -- daemon -----------------------------------------------------------------------------------

ALWAYS = '[tracer]\ncollision_check = "always"\n'


def _tracer_started(d: RunningDaemon) -> str:
    assert wait_for(lambda: "tracer active" in d.log() or "tracer unavailable" in d.log(), 30), \
        d.log()
    return d.log()


@pytest.mark.kernel
def test_daemon_reports_a_collision_at_connect_and_audits_at_once(
        lab: Lab, start_daemon: Callable[..., RunningDaemon]) -> None:
    """Interval 60 s, the server in epoll_wait: only the collision check can see it now.

    The stale key is injected, a birth no tracer event sees, so the check is kept
    listening (``always``); ``auto`` is the next test's.
    """
    d = start_daemon(lab.pin_path, interval=60.0, extra=ALWAYS)
    d.wait_value("sockguard_last_successful_audit_timestamp_seconds", lambda v: v > 0, 90)
    log = _tracer_started(d)
    if "collision (" not in log:
        pytest.skip("collision detection inactive here: " + log)
    assert d.value("sockguard_detection_active", detection="collision") == 1
    assert d.value("sockguard_tracer_collisions_total") == 0
    server_pod, client_pod = lab.pods
    s_ip, c_ip = server_pod.addr(), client_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)
    stale, _peer = lab.dummy_pair()
    lab.inject(cilium_key(s_ip, SERVER_PORT, c_ip, CLIENT_PORT), stale)
    time.sleep(2.5)  # a stale key is old: the watched set (refreshed every second) has it
    server = BlockedServer(lab, listener, "epoll", wait=10.0)
    t0 = time.monotonic()
    cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    cli.sendall(b"GET /")
    d.wait_value("sockguard_tracer_collisions_total", lambda v: v >= 1, 10)
    latency = time.monotonic() - t0
    assert server.readable_at is None  # still blocked, nothing read
    assert latency < DETECT_WITHIN + 0.5, latency  # + the scrape's own round trips
    print(f"daemon: collision counted {latency * 1000:.0f} ms after connect", file=sys.stderr)
    d.wait_value("sockguard_findings", lambda v: v == 1, 15, kind="shadowing")
    # the collision's, or where kprobes/fentry see the insert fail (EEXIST) first, that
    # failure's: an early audit takes the first trigger
    assert sum(d.value("sockguard_early_audits_total", trigger=t) or 0
               for t in ("collision", "update_failure")) >= 1
    out = d.log()
    assert "SOCKGUARD_EVENT=collision" in out and "became established while the entry" in out
    assert f"SOCKGUARD_KEY={cilium_key(s_ip, SERVER_PORT, c_ip, CLIENT_PORT).hex()}" in out
    assert "SOCKGUARD_ENTRY_SOCKET=127.0.0.1:" in out
    assert d.value("sockguard_recvmsg_mismatches_total") == 0  # no read returned to see
    server.join()


@pytest.mark.kernel
def test_daemon_idles_the_check_on_healthy_maps_and_listens_from_a_reset(
        lab: Lab, start_daemon: Callable[..., RunningDaemon]) -> None:
    """``auto``: detached while every entry is owned; a reset held open (the stale entry
    of a reset, no injection) re-attaches it at once, the reconnect that collides is
    reported, and once the entry is gone an audit proves the map again."""
    d = start_daemon(lab.pin_path, interval=30.0)
    d.wait_value("sockguard_last_successful_audit_timestamp_seconds", lambda v: v > 0, 90)
    log = _tracer_started(d)
    if "collision (" not in log:
        pytest.skip("collision detection inactive here: " + log)
    always = [line for line in log.splitlines() if "collision check always listening" in line]
    if always:
        pytest.skip("the collision check cannot idle here: " + always[0].split(": ", 1)[-1])
    listening = "sockguard_tracer_collision_check_listening"
    d.wait_value(listening, lambda v: v == 0, 15)  # the empty lab map is proven healthy
    assert "collision check idle" in d.log()
    server_pod, client_pod = lab.pods
    s_ip = server_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)
    cli, srv = lab.pair(client_pod, server_pod, SERVER_PORT, src_port=CLIENT_PORT,
                        listener=listener)
    srv_key = key_for(srv)
    assert wait_for(lambda: srv_key in lab.keys(), 5)
    time.sleep(1.5)  # owned entries keep it idle; the watched set takes their keys
    assert d.value(listening) == 0, d.log()

    audits = d.value("sockguard_audit_duration_seconds_count")
    close_rst(cli)  # the server's socket is reset and stays open: a stale entry is born
    d.wait_value(listening, lambda v: v == 1, 5)
    assert d.value("sockguard_audit_duration_seconds_count") == audits  # the tracer's doing
    assert "collision check listening" in d.log()
    server = BlockedServer(lab, listener, "epoll", wait=10.0)
    cli2 = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    cli2.sendall(b"GET /")
    d.wait_value("sockguard_tracer_collisions_total", lambda v: v >= 1, 10)
    assert server.readable_at is None  # the hang, seen at connect
    assert "SOCKGUARD_EVENT=collision" in d.log()
    # the collision's early audit finds the reset socket's entry, so it keeps listening
    d.wait_value("sockguard_findings", lambda v: v == 1, 15, kind="shadowing")
    assert d.value(listening) == 1

    # recovery: the held socket closes (its entry goes), the shadowed pair ends, and the
    # next periodic audit proves the map again
    close_rst(cli2)
    server.join()
    if server.conn is not None:
        server.conn.close()
    srv.close()
    assert wait_for(lambda: srv_key not in lab.keys(), 5)
    d.wait_value(listening, lambda v: v == 0, 60)
