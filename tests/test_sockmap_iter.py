"""The iter/sockmap program: the kernel's view of which socket each key holds."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable
from ipaddress import ip_address

import pytest

from sockguard.core.model import RECV_BPF, Endpoint, TargetSocket, Tuple4
from sockguard.kernel import libbpf, sockmap_iter

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_kernel", "iterator_object")]

SO_COOKIE = 57
TCP_ESTABLISHED = 1
KEY = 44
SOCKHASH = libbpf.BPF_MAP_TYPE_SOCKHASH

MakeMap = Callable[..., int]
TcpPair = Callable[..., tuple[socket.socket, socket.socket]]


@pytest.fixture
def iterator_object(request: pytest.FixtureRequest) -> None:
    """Skip with the capability probe's reason where iter/sockmap cannot load.

    Where it is refused, the same guarantees are tested through the tc lookup
    (tests/test_entry_sources.py, also the probe's agreement with a real read).
    Tests marked ``no_load`` check what holds before any load.
    """
    if not sockmap_iter.OBJECT_PATH.is_file():
        pytest.skip(f"{sockmap_iter.OBJECT_PATH} not built: run pip install -e .")
    if request.node.get_closest_marker("no_load"):
        return
    ok, why = sockmap_iter.iterator_available()
    if not ok:
        pytest.skip(f"the sockmap iterator cannot run here: {why}")


def cookie_of(sock: socket.socket) -> int:
    value: int = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return value


def tuple_of(sock: socket.socket) -> Tuple4:
    local, remote = sock.getsockname(), sock.getpeername()
    family = 4 if sock.family == socket.AF_INET else 6
    return Tuple4(
        family,
        Endpoint(ip_address(local[0]), local[1]),
        Endpoint(ip_address(remote[0]), remote[1]),
    )


def cilium_key(sock: socket.socket) -> bytes:
    """The key Cilium writes for ``sock``: its tuple from the peer's point of view."""
    t = tuple_of(sock)
    fam = 1 if t.family == 4 else 2
    return (
        t.remote.ip.packed.ljust(16, b"\0")
        + t.local.ip.packed.ljust(16, b"\0")
        + bytes([fam, 0, 0, 0])
        + struct.pack(">HxxHxx", t.remote.port, t.local.port)
    )


def expected(sock: socket.socket) -> TargetSocket:
    t = tuple_of(sock)
    return TargetSocket(
        cookie=cookie_of(sock),
        family=t.family,
        state=TCP_ESTABLISHED,
        netns_ino=os.stat("/proc/self/ns/net").st_ino,
        tuple=t,
        dead=False,
        recv_path=RECV_BPF,  # in a sockhash, so its proto is the psock's (tcp_bpf_recvmsg)
    )


# The expected values are computed before each walk: SO_COOKIE generates the cookie,
# which the compat program (kernels before 5.12) can only read once it exists.


def test_cilium_like_value4_map(make_map: MakeMap, tcp_pair: TcpPair) -> None:
    fd = make_map(SOCKHASH, KEY, 4, 256, name="cilium_sock_ops")
    socks = [s for _ in range(20) for s in tcp_pair()]
    for s in socks:
        libbpf.map_update(fd, cilium_key(s), struct.pack("=i", s.fileno()), libbpf.BPF_NOEXIST)

    want = {cilium_key(s): expected(s) for s in socks}
    assert sockmap_iter.read_sockmap(fd, KEY) == want


def test_ipv6_pair(make_map: MakeMap, tcp_pair: TcpPair) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        client, server = tcp_pair(socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    fd = make_map(SOCKHASH, KEY, 4)
    for s in (client, server):
        libbpf.map_update(fd, cilium_key(s), struct.pack("=i", s.fileno()))
    want = {cilium_key(s): expected(s) for s in (client, server)}
    seen = sockmap_iter.read_sockmap(fd, KEY)
    assert seen == want
    assert {t.family for t in seen.values()} == {6}


def test_deleted_and_closed_entries_disappear(make_map: MakeMap, tcp_pair: TcpPair) -> None:
    fd = make_map(SOCKHASH, KEY, 4)
    a, b = tcp_pair()
    c, _ = tcp_pair()
    for s in (a, b, c):
        libbpf.map_update(fd, cilium_key(s), struct.pack("=i", s.fileno()))
    libbpf.map_delete(fd, cilium_key(a))
    key_c = cilium_key(c)
    c.close()  # sock_map_close unlinks the socket from every map
    assert set(sockmap_iter.read_sockmap(fd, KEY)) == {cilium_key(b)}
    assert key_c not in sockmap_iter.read_sockmap(fd, KEY)


def test_empty_map(make_map: MakeMap) -> None:
    fd = make_map(SOCKHASH, KEY, 4)
    assert sockmap_iter.read_sockmap(fd, KEY) == {}


def test_sockmap_array_skips_empty_slots(make_map: MakeMap, tcp_pair: TcpPair) -> None:
    fd = make_map(libbpf.BPF_MAP_TYPE_SOCKMAP, 4, 4, 16)
    client, server = tcp_pair()
    libbpf.map_update(fd, struct.pack("=I", 3), struct.pack("=i", client.fileno()))
    libbpf.map_update(fd, struct.pack("=I", 11), struct.pack("=i", server.fileno()))
    want = {struct.pack("=I", 3): expected(client), struct.pack("=I", 11): expected(server)}
    assert sockmap_iter.read_sockmap(fd, 4) == want


@pytest.mark.parametrize("key_size", [1, 8, 64])
def test_other_key_sizes(make_map: MakeMap, tcp_pair: TcpPair, key_size: int) -> None:
    fd = make_map(SOCKHASH, key_size, 8)
    client, _ = tcp_pair()
    k = bytes(range(1, key_size + 1))
    libbpf.map_update(fd, k, struct.pack("=Q", client.fileno()))
    want = {k: expected(client)}
    assert sockmap_iter.read_sockmap(fd, key_size) == want


@pytest.mark.no_load
@pytest.mark.parametrize("key_size", [0, 65])
def test_key_size_out_of_range(key_size: int) -> None:
    with pytest.raises(ValueError, match="key size"):
        sockmap_iter.read_sockmap(-1, key_size)


def test_not_a_sockmap_is_rejected(make_map: MakeMap) -> None:
    fd = make_map(libbpf.BPF_MAP_TYPE_HASH, KEY, 4)
    with pytest.raises(libbpf.BpfError):
        sockmap_iter.read_sockmap(fd, KEY)


@pytest.mark.no_load
def test_record_layout_matches_btf() -> None:
    """RECORD in Python and struct record in the object must agree in size."""
    bpftool = shutil.which("bpftool")
    if bpftool is None:
        pytest.skip("bpftool not installed")
    out = subprocess.run(
        [bpftool, "btf", "dump", "file", str(sockmap_iter.OBJECT_PATH)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    match = re.search(r"STRUCT 'record' size=(\d+)", out)
    assert match is not None
    assert int(match.group(1)) == sockmap_iter.RECORD.size == 128


def test_compat_program_reads_the_cookie_field_once_sock_diag_gave_one(
        make_map: MakeMap, tcp_pair: TcpPair) -> None:
    """Kernels before 5.12 (the incident's 5.10) refuse bpf_get_socket_cookie in
    iterators; the compat program reads skc_cookie, which is 0 until something
    generates it — sock_diag does for every socket it lists."""
    from sockguard.kernel.sockets import scan_all

    fd = make_map(SOCKHASH, KEY, 4, 16, name="sg_compat")
    cli, srv = tcp_pair()
    libbpf.map_update(fd, cilium_key(cli), struct.pack("i", cli.fileno()))

    def compat_records() -> dict[bytes, object]:
        obj = sockmap_iter._load(KEY, sockmap_iter.COMPAT_PROGRAM)
        try:
            with obj.program(sockmap_iter.COMPAT_PROGRAM).attach_iter_map(fd) as link:
                data = libbpf.iter_read(link)
        finally:
            obj.close()
        return {rec[0][:KEY]: rec for rec in sockmap_iter.RECORD.iter_unpack(data)}

    [before] = compat_records().values()
    # 0: nobody asked for the cookie yet.  A tracer running elsewhere on the node
    # (sockguard run's lifecycle program) may have generated it at connect: then it
    # is already the socket's real cookie, never anything else.
    assert before[1] in (0, cookie_of(cli))
    scan = scan_all()
    assert cookie_of(cli) in {s.cookie for s in scan.sockets}  # SO_COOKIE generates too
    [after] = compat_records().values()
    assert after[1] == cookie_of(cli)
    assert srv.fileno() >= 0
