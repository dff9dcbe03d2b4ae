"""The lab is Cilium-faithful: proven on the real kernel, not assumed.

Every other kernel test builds on the lab, so these tests pin down what it
does: which keys the sockops program stores (and their byte layout), that
sk_msg really redirects, that the kernel drops entries on close, and that the
incident (a stale key shadowing a new connection's server side)
reproduces end to end and is cured by deleting that one key.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sockguard.kernel import libbpf
from tests.lab import (
    Lab,
    Namespace,
    cilium_key,
    close_rst,
    describe,
    key_for,
    proc_tcp_state,
    raw_key,
    recv_exact,
    sockmap_prog_query_supported,
    tcp_info,
)
from tests.lab.cgroup import CGROUP2_ROOT

SERVER_PORT = 8080
CLIENT_PORT = 40000


def _wait_until(pred: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``pred``: key removal on close and program release are asynchronous-ish."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def _show(keys: list[bytes]) -> list[str]:
    return sorted(describe(k) for k in keys)


# -- the oracle itself (no kernel) ------------------------------------------------


def test_oracle_matches_design_worked_example() -> None:
    """The README's worked key example ("Cilium's key layout").

    sip 10.10.134.48:8080, dip 10.10.101.249:56184.
    """
    incident_key = bytes.fromhex(
        "0a0a8630" + "00" * 12 + "0a0a65f9" + "00" * 12 + "01000000" + "1f900000" + "db780000"
    )
    assert raw_key("10.10.134.48", 8080, "10.10.101.249", 56184) == incident_key
    # That entry belongs to the socket whose local side is dip:dport.
    assert cilium_key("10.10.101.249", 56184, "10.10.134.48", 8080) == incident_key


def test_oracle_ipv6_and_mapped() -> None:
    key = cilium_key("fd00::1", 1, "fd00::2", 2, socket.AF_INET6)
    assert key[:16] == socket.inet_pton(socket.AF_INET6, "fd00::2")
    assert key[32:36] == b"\x02\x00\x00\x00"
    mapped = cilium_key("::ffff:10.0.0.1", 1, "::ffff:10.0.0.2", 2, socket.AF_INET6)
    assert mapped == cilium_key("10.0.0.1", 1, "10.0.0.2", 2)


# -- keys the sockops program stores ---------------------------------------------------


def _assert_port_bytes(key: bytes, sport: int, dport: int) -> None:
    """README, "Cilium's key layout": big-endian u16 in bytes 36-37 / 40-41, then two zeros."""
    assert key[36:38] == struct.pack("!H", sport), describe(key)
    assert key[38:40] == b"\0\0"
    assert key[40:42] == struct.pack("!H", dport), describe(key)
    assert key[42:44] == b"\0\0"
    assert key[33:36] == b"\0\0\0"


@pytest.mark.kernel
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_pod_to_pod_stores_both_peer_perspective_keys(lab: Lab, family: int) -> None:
    a, b = lab.pods
    cli, srv = lab.pair(b, a, SERVER_PORT, family=family, src_port=CLIENT_PORT)
    b_ip, a_ip = b.addr(family), a.addr(family)

    # Client socket (local b:40000, remote a:8080): key is written as the
    # server would see it.  And the other way round.
    client_key = cilium_key(b_ip, CLIENT_PORT, a_ip, SERVER_PORT, family)
    server_key = cilium_key(a_ip, SERVER_PORT, b_ip, CLIENT_PORT, family)
    assert key_for(cli) == client_key and key_for(srv) == server_key
    assert _show(lab.keys()) == _show([client_key, server_key])

    _assert_port_bytes(client_key, SERVER_PORT, CLIENT_PORT)
    _assert_port_bytes(server_key, CLIENT_PORT, SERVER_PORT)
    fam_byte = 1 if family == socket.AF_INET else 2
    assert {k[32] for k in lab.keys()} == {fam_byte}
    if family == socket.AF_INET:
        assert client_key[0:4] == socket.inet_aton(a_ip) and client_key[4:16] == bytes(12)
        assert client_key[16:20] == socket.inet_aton(b_ip)
    st = lab.stats()
    assert (st["insert_ok"], st["insert_eexist"], st["insert_other"]) == (2, 0, 0)


@pytest.mark.kernel
def test_node_to_pod_stores_both_keys(lab: Lab) -> None:
    pod = lab.pods[0]
    listener = lab.listen(pod, port=SERVER_PORT)
    cli = lab.connect(lab.node, pod.addr(), SERVER_PORT)
    srv = lab.accept(listener)
    # The node reaches pod-a from its veth address.
    assert cli.getsockname()[0] == str(pod.gw4)
    assert _show(lab.keys()) == _show([key_for(cli), key_for(srv)])


@pytest.mark.kernel
def test_ipv4_mapped_ipv6_socket_gets_ipv4_key(lab: Lab) -> None:
    """As in Cilium, a dual-stack socket talking IPv4 is keyed by remote_ip4, family 1."""
    a, b = lab.pods
    listener = lab.listen(a, ip="::", port=SERVER_PORT, family=socket.AF_INET6)
    cli = lab.connect(b, f"::ffff:{a.ip4}", SERVER_PORT, family=socket.AF_INET6)
    srv = lab.accept(listener)
    expected = [
        cilium_key(str(b.ip4), cli.getsockname()[1], str(a.ip4), SERVER_PORT),
        cilium_key(str(a.ip4), SERVER_PORT, str(b.ip4), cli.getsockname()[1]),
    ]
    assert _show(lab.keys()) == _show(expected)
    assert key_for(srv) in expected


@pytest.mark.kernel
def test_sockets_outside_the_lab_cgroup_are_not_inserted(lab: Lab) -> None:
    """The dummy sockets tests inject must not be in the map by themselves."""
    before = lab.stats()
    d1, d2 = lab.dummy_pair()
    d1.sendall(b"x")
    assert recv_exact(d2, 1) == b"x"
    assert lab.keys() == []
    assert lab.stats() == before


# -- the redirect ----------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_payload_is_redirected_both_ways(lab: Lab, family: int) -> None:
    a, b = lab.pods
    cli, srv = lab.pair(b, a, SERVER_PORT, family=family)
    before = lab.stats()["redirects"]

    request = b"GET /healthz" * 100
    cli.sendall(request)
    assert recv_exact(srv, len(request)) == request
    srv.sendall(b"200 OK")
    assert recv_exact(cli, 6) == b"200 OK"

    assert lab.stats()["redirects"] >= before + 2
    # The payload never crossed TCP: bytes_acked only counts the SYN (1),
    # bytes_received nothing.
    assert tcp_info(cli).bytes_acked <= 1 and tcp_info(srv).bytes_received == 0
    assert tcp_info(srv).bytes_acked <= 1 and tcp_info(cli).bytes_received == 0


# -- entries go away with their sockets ------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_closing_sockets_removes_their_keys(lab: Lab, how: str) -> None:
    a, b = lab.pods
    cli, srv = lab.pair(b, a, SERVER_PORT)
    cli_key, srv_key = key_for(cli), key_for(srv)
    assert _show(lab.keys()) == _show([cli_key, srv_key])
    close = close_rst if how == "rst" else socket.socket.close
    close(cli)
    # Only close() removes an entry (tcp_bpf_close -> sock_map_remove_links).
    # FIN leaves the server in CLOSE_WAIT; RST leaves it in CLOSE, unhashed
    # but still in the map, because since 6.3 sockmap no longer hooks unhash.
    assert _wait_until(lambda: _show(lab.keys()) == _show([srv_key])), _show(lab.keys())
    assert tcp_info(srv).state == ("CLOSE_WAIT" if how == "fin" else "CLOSE")
    close(srv)
    assert _wait_until(lambda: lab.keys() == []), _show(lab.keys())


# -- the incident's hang, end to end ------------------------------------------------------------


@pytest.mark.kernel
def test_incident_hang_stale_server_key_then_recovery(lab: Lab) -> None:
    """A stale key shadows the next connection's server side; deleting it heals.

    Client pod-b 10.200.1.2:40000 -> server pod-a 10.200.0.2:8080.
    """
    server_pod, client_pod = lab.pods
    s_ip, c_ip = server_pod.addr(), client_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)

    # 1. A stale entry: some other socket sits under the key the server side
    #    of the future connection will want.
    server_key = cilium_key(s_ip, SERVER_PORT, c_ip, CLIENT_PORT)
    client_key = cilium_key(c_ip, CLIENT_PORT, s_ip, SERVER_PORT)
    stale, stale_peer = lab.dummy_pair()
    lab.inject(server_key, stale)
    with pytest.raises(libbpf.BpfError) as exc:
        lab.inject(server_key, stale_peer)  # BPF_NOEXIST, as the sockops insert
    assert exc.value.errno == errno.EEXIST
    before = lab.stats()

    # 2. The connection: established on both ends, server insert fails EEXIST.
    cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    srv = lab.accept(listener)
    assert proc_tcp_state(client_pod.path, cli) == "ESTABLISHED"
    assert proc_tcp_state(server_pod.path, srv) == "ESTABLISHED"
    after = lab.stats()
    assert after["insert_eexist"] == before["insert_eexist"] + 1
    assert after["insert_ok"] == before["insert_ok"] + 1  # the client's own key
    assert _show(lab.keys()) == _show([server_key, client_key])

    # 3. The hang: the client's payload is redirected by key into the stale
    #    socket; the server never sees it, and TCP carried nothing.
    request = b"GET /healthz HTTP/1.1\r\n\r\n"
    cli.sendall(request)
    srv.settimeout(1.0)
    with pytest.raises(TimeoutError):
        srv.recv(4096)
    assert recv_exact(stale, len(request)) == request
    assert tcp_info(cli).bytes_acked <= 1
    assert tcp_info(srv).bytes_received == 0

    # 4. The cure: delete that one key, reset the broken connection.
    assert lab.delete(server_key)
    close_rst(cli)
    close_rst(srv)
    assert _wait_until(lambda: lab.keys() == []), _show(lab.keys())

    # 5. Same 5-tuple again: both inserts succeed and data flows both ways.
    cli2 = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    srv2 = lab.accept(listener)
    assert cli2.getsockname() == (c_ip, CLIENT_PORT)
    final = lab.stats()
    assert final["insert_eexist"] == after["insert_eexist"]
    assert final["insert_ok"] == after["insert_ok"] + 2
    assert _show(lab.keys()) == _show([server_key, client_key])
    cli2.sendall(request)
    assert recv_exact(srv2, len(request)) == request
    srv2.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    assert recv_exact(cli2, 19) == b"HTTP/1.1 200 OK\r\n\r\n"
    # Nothing more reached the stale socket.
    stale.settimeout(0.2)
    with pytest.raises(TimeoutError):
        stale.recv(1)


# -- the lab's own hygiene -------------------------------------------------------------------


def _prog_alive(prog_id: int) -> bool:
    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except libbpf.BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    os.close(fd)
    return True


@pytest.mark.kernel
def test_lab_attaches_to_its_child_cgroup_and_leaves_nothing(lab_object: Path) -> None:
    root_fd = os.open(CGROUP2_ROOT, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with Lab(pods=1, obj_path=lab_object) as lab:
            sockops_id = libbpf.prog_info(lab.obj.program("lab_sockops").fd).id
            sk_msg_id = libbpf.prog_info(lab.obj.program("lab_sk_msg").fd).id
            cg_ids = libbpf.prog_query(lab.cgroup.fd, libbpf.BPF_CGROUP_SOCK_OPS)
            assert cg_ids == [sockops_id]
            assert sockops_id not in libbpf.prog_query(root_fd, libbpf.BPF_CGROUP_SOCK_OPS)
            if sockmap_prog_query_supported():  # kernel 6.0+
                assert libbpf.prog_query(lab.map_fd, libbpf.BPF_SK_MSG_VERDICT) == [sk_msg_id]
            assert lab.pin_path.exists()
            info = libbpf.map_info(lab.map_fd)
            assert (info.name, info.key_size, info.value_size, info.max_entries) == (
                "cilium_sock_ops", 44, 4, 65535)  # fmt: skip
            namespaces: list[Namespace] = [lab.node, *lab.pods]
            cgroup_dir, pin_dir = lab.cgroup.path, lab.pin_dir
            lab.pair(lab.pods[0], lab.pods[0], SERVER_PORT)  # leave sockets for teardown
    finally:
        os.close(root_fd)

    assert not cgroup_dir.exists()
    assert not pin_dir.exists()
    for ns in namespaces:
        assert not os.path.exists(ns.path), ns
    assert _wait_until(lambda: not _prog_alive(sockops_id) and not _prog_alive(sk_msg_id))
