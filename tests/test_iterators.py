"""The iterators against the real kernel: iter/tcp agrees with sock_diag, and the
receive-path and SOCK_DEAD checks see what they claim (issue 4, "make the audit exact")."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sockguard.core.model import RECV_BPF, RECV_TCP, Netns
from sockguard.core.rows import COOKIE_UNKNOWN, RECV_CODE_BPF, RECV_CODE_TCP, Record
from sockguard.kernel import sockhash_lookup, sockmap_iter, tcp_iter
from sockguard.kernel.netns import NetnsRef, entered
from sockguard.kernel.sockets import scan_all
from tests.conftest import entry_source_skip_reason
from tests.lab import Lab, Namespace, cilium_key, close_rst, key_for, recv_exact

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("iterators")]

SERVER_PORT = 8080
CLIENT_PORT = 40000
SO_COOKIE = 57
TCP_FIN_WAIT1, TCP_CLOSE = 4, 7


@pytest.fixture
def iterators() -> None:
    ok, why = tcp_iter.tcp_iterator_available()
    if not ok:
        pytest.skip(f"iter/tcp unavailable: {why}")
    from sockguard.kernel.recvsyms import recv_symbols

    syms = recv_symbols()
    if not syms.usable:
        pytest.skip(f"receive paths unknown here: {'; '.join(syms.problems)}")


def read_records(lab: Lab) -> dict[bytes, Record]:
    """The lab map's records from the iterator, or from the tc lookup where it is refused."""
    if sockmap_iter.iterator_available()[0]:
        return sockmap_iter.read_records(lab.map_fd, 44)
    reason = entry_source_skip_reason("tc_lookup")
    if reason is not None:
        pytest.skip(f"no exact entry source: iterator refused, and {reason}")
    return sockhash_lookup.read_records(lab.map_fd, 44, lab.keys())


def entry_cookie(sock: socket.socket) -> int:
    """What an entry record says of ``sock``'s cookie: the tuple-only tc lookup cannot tell."""
    if not sockmap_iter.iterator_available()[0] and sockhash_lookup.lookup_exactness() != "cookie":
        return COOKIE_UNKNOWN
    return cookie(sock)


def cookie(sock: socket.socket) -> int:
    value: int = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return value


def ref(ns: Namespace) -> NetnsRef:
    return NetnsRef(Netns(os.stat(ns.path).st_ino, ns.name), ns.path)


def sockguard(*args: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-m", "sockguard", *args], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def plain_socket(lab: Lab, ns: Namespace, family: int = socket.AF_INET) -> socket.socket:
    """A socket in ``ns`` but outside the lab cgroup: sockops never puts it in the map."""
    with entered(ns.path):
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(2)
    return lab.track(sock)


@contextlib.contextmanager
def plain_pair(lab: Lab, ns: Namespace) -> Iterator[tuple[socket.socket, socket.socket]]:
    lst = plain_socket(lab, ns)
    lst.bind((ns.addr(), 0))
    lst.listen()
    cli = plain_socket(lab, ns)
    cli.connect(lst.getsockname())
    srv, _ = lst.accept()
    lab.track(srv)
    lst.close()
    yield cli, srv


def test_iter_tcp_agrees_with_sock_diag_on_every_socket(lab3: Lab) -> None:
    a, b, c = lab3.pods
    live = [
        *lab3.pair(b, a, SERVER_PORT),
        *lab3.pair(c, b, SERVER_PORT + 1, family=socket.AF_INET6),
        *lab3.pair(lab3.node, c, SERVER_PORT + 2),
    ]
    # a dual-stack listener: the IPv4 client reaches an AF_INET6 socket (v4-mapped tuple)
    dual = lab3.listen(a, ip="::", port=SERVER_PORT + 3, family=socket.AF_INET6)
    live.append(lab3.connect(c, a.addr(), SERVER_PORT + 3))
    live.append(lab3.accept(dual))
    # TIME_WAIT: the client closes first
    tw_cli, tw_srv = lab3.pair(b, c, SERVER_PORT + 4)
    tw_cli.close()
    time.sleep(0.05)
    tw_srv.close()
    # SYN_SENT: nobody answers 10.200.0.99
    pending = lab3.socket(b)
    pending.setblocking(False)
    assert pending.connect_ex(("10.200.0.99", 9)) == errno.EINPROGRESS
    refs = [ref(ns) for ns in (lab3.node, a, b, c)]
    time.sleep(0.05)

    by_iter = tcp_iter.read_tcp(refs)
    by_diag = scan_all(refs, compact=True)

    assert by_iter.namespaces == by_diag.namespaces == [r.netns for r in refs]
    assert [end for end, _ in by_iter.table.spans] == [end for end, _ in by_diag.table.spans]
    start = 0
    for end, netns in by_iter.table.spans:
        assert sorted(by_iter.table.rows[start:end]) == sorted(by_diag.table.rows[start:end]), \
            netns
        start = end
    states = {row[1] for row in by_iter.table.rows}
    assert {1, 2, 6} <= states  # ESTABLISHED, SYN_SENT, TIME_WAIT all compared
    cookies = {row[2] for row in by_iter.table.rows}
    assert {cookie(s) for s in live} <= cookies
    for s in live:  # every lab connection is accelerated: in the map, psock proto
        assert by_iter.table.recv[cookie(s)] == RECV_CODE_BPF
    assert cookie(pending) not in by_iter.table.recv or \
        by_iter.table.recv[cookie(pending)] == RECV_CODE_TCP


def test_records_carry_netns_inode_and_uid(lab: Lab) -> None:
    a, b = lab.pods
    _cli, srv = lab.pair(b, a, SERVER_PORT)
    [rec] = [r for r in tcp_iter.dump_namespace(ref(a)) if r[0] == cookie(srv)]
    _cookie, netns, ino, uid, family, state, flags, *_ = rec
    assert netns == os.stat(a.path).st_ino
    assert ino == os.fstat(srv.fileno()).st_ino and uid == os.getuid()
    assert (family, state, flags) == (socket.AF_INET, 1, tcp_iter.REC_FULL)


def test_accelerated_connection_has_the_bpf_receive_path_a_plain_one_not(lab: Lab) -> None:
    a, b = lab.pods
    cli, srv = lab.pair(b, a, SERVER_PORT)
    with plain_pair(lab, a) as (p_cli, p_srv):
        want = {  # cookies first: the tc lookup reads skc_cookie, 0 until generated
            key_for(cli): (entry_cookie(cli), False, RECV_CODE_BPF),
            key_for(srv): (entry_cookie(srv), False, RECV_CODE_BPF),
        }
        records = read_records(lab)
        assert {k: (r[1], r[9], r[10]) for k, r in records.items()} == want
        scan = tcp_iter.read_tcp([ref(a), ref(b)])
        assert scan.table.recv_path(cookie(cli)) == RECV_BPF
        assert scan.table.recv_path(cookie(srv)) == RECV_BPF
        assert scan.table.recv_path(cookie(p_cli)) == RECV_TCP
        assert scan.table.recv_path(cookie(p_srv)) == RECV_TCP
    cli.sendall(b"ping")
    assert recv_exact(srv, 4) == b"ping"


def test_incident_shadowing_is_flagged_by_the_receive_path_before_any_payload(lab: Lab) -> None:
    server_pod, client_pod = lab.pods
    s_ip, c_ip = server_pod.addr(), client_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)
    dummy, _ = lab.dummy_pair()
    future = cilium_key(s_ip, SERVER_PORT, c_ip, CLIENT_PORT)
    lab.inject(future, dummy)
    cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    srv = lab.accept(listener)
    assert key_for(srv) == future  # its insert failed with EEXIST: the psock was dropped

    # Nothing has been sent yet.  (By default only the suspicious tuples are looked up
    # with sock_diag; iter/tcp, asked for, also reads the owner's receive path.)
    code, doc = sockguard("audit", "--map", str(lab.pin_path), "--json")
    assert code == 1 and doc["socket_source"] == "sock_diag lookups"
    [f] = [f for f in doc["findings"] if f["key_hex"] == future.hex()]
    assert f["kind"] == "shadowing" and f["socket"]["cookie"] == cookie(srv)
    code, doc = sockguard("audit", "--map", str(lab.pin_path), "--json",
                          "--socket-source", "iterator")
    assert code == 1 and doc["socket_source"] == "iterator"
    [f] = [f for f in doc["findings"] if f["key_hex"] == future.hex()]
    assert f["kind"] == "shadowing" and f["confirmed"] is True
    assert f["entry_cookie"] == cookie(dummy)
    assert f["socket"]["cookie"] == cookie(srv)
    assert f["socket"]["recv_path"] == RECV_TCP
    assert f["details"]["owner_recv_path"] == RECV_TCP
    assert f["details"]["entry_recv_path"] == RECV_BPF
    assert f["details"]["key_mismatch"] is True

    # Without the entry's cookie (no sockmap iterator) the receive path alone flags it.
    code, doc = sockguard("audit", "--map", str(lab.pin_path), "--json", "--no-iterator",
                          "--socket-source", "iterator")
    assert code == 1 and doc["maps"][0]["source"] == "syscall"
    [f] = [f for f in doc["findings"] if f["key_hex"] == future.hex()]
    assert f["kind"] == "recvpath" and f["confirmed"] is True
    assert f["socket"]["cookie"] == cookie(srv)
    assert f["details"] == {"verified_by_cookie": False, "owner_recv_path": RECV_TCP}
    assert doc["maps"][0]["counts"]["recvpath"] == 1
    # ... and sock_diag, which cannot see receive paths, cannot tell it from ok.
    code, doc = sockguard("audit", "--map", str(lab.pin_path), "--json", "--no-iterator",
                          "--socket-source", "sock_diag", "--all")
    assert doc["socket_source"] == "sock_diag"
    assert [f["kind"] for f in doc["findings"] if f["key_hex"] == future.hex()] == ["ok"]

    # The prediction holds: the payload goes to the entry's socket, the server hangs.
    cli.sendall(b"GET /healthz")
    srv.settimeout(1.0)
    with pytest.raises(TimeoutError):
        srv.recv(64)
    assert recv_exact(dummy, 12) == b"GET /healthz"


def test_entry_of_a_reset_but_open_socket_reports_the_closed_state(lab: Lab) -> None:
    a, b = lab.pods
    cli, srv = lab.pair(b, a, SERVER_PORT, src_port=CLIENT_PORT)
    srv_key, srv_cookie = key_for(srv), entry_cookie(srv)  # generated before any read
    close_rst(cli)
    deadline = time.monotonic() + 2
    while len(read_records(lab)) != 1:  # the client's entry goes at its close
        assert time.monotonic() < deadline
        time.sleep(0.01)
    [rec] = read_records(lab).values()
    assert rec[0] == srv_key and rec[1] == srv_cookie
    assert (rec[4], rec[9], rec[10]) == (TCP_CLOSE, False, RECV_CODE_BPF)
    assert rec[7] == 0  # tcp_done released the local port: the tuple is no longer the key's
    # out of the established hash: neither socket source lists it
    assert cookie(srv) not in {r[2] for r in tcp_iter.read_tcp([ref(a)]).table.rows}
    assert cookie(srv) not in {r[2] for r in scan_all([ref(a)], compact=True).table.rows}
    code, doc = sockguard("audit", "--map", str(lab.pin_path), "--json")
    assert code == 1
    [f] = doc["findings"]
    assert (f["kind"], f["details"]["entry_socket_state"]) == ("stale", "CLOSE")
    assert "entry_socket_dead" not in f["details"] and "key_mismatch" not in f["details"]


def test_an_orphaned_socket_is_dead_in_iter_tcp(lab: Lab) -> None:
    """close() with unsent data and a peer that reads nothing: FIN_WAIT1, SOCK_DEAD set."""
    a, _ = lab.pods
    with plain_pair(lab, a) as (cli, srv):
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        cli.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(10_000):
                cli.send(b"x" * 4096)
        gone = cookie(cli)
        cli.close()
        time.sleep(0.05)
        rows = {r[0]: r for r in tcp_iter.dump_namespace(ref(a))}
        _c, _n, ino, _u, _f, state, flags, *_rest, recv = rows[gone]
        assert state == TCP_FIN_WAIT1 and ino == 0
        assert flags & tcp_iter.REC_DEAD and recv == RECV_CODE_TCP
        assert not rows[cookie(srv)][6] & tcp_iter.REC_DEAD
        diag = {r[2]: r for r in scan_all([ref(a)], compact=True).table.rows}
        assert diag[gone][1] == TCP_FIN_WAIT1
