"""Socket helpers for the lab that need no BPF: RST close, TCP state, TCP_INFO.

Kept separate from the ``Lab`` so tests can use them on any socket, including
the dummy sockets made outside the lab cgroup.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from sockguard.kernel.netns import entered

#: Every lab socket gets this timeout unless told otherwise: no test may hang.
DEFAULT_TIMEOUT = 2.0

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}


def close_rst(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER {1, 0}) so the 4-tuple is reusable at once.

    A normal close leaves the active closer in TIME_WAIT for 60 s, and the
    incident's scenario needs the *same* client port again right away.
    """
    if sock.fileno() < 0:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_exact(sock: socket.socket, size: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Read exactly ``size`` bytes or raise (TimeoutError / ConnectionError)."""
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)


@dataclass(frozen=True)
class TcpInfo:
    """The few ``struct tcp_info`` fields the tests use (uapi linux/tcp.h offsets).

    ``bytes_acked`` / ``bytes_received`` count what crossed the TCP stack, so a
    payload delivered by sk_msg redirect leaves them untouched: the redirect is
    visible from userspace this way.
    """

    state: str
    bytes_acked: int
    bytes_received: int
    segs_out: int
    segs_in: int


def tcp_info(sock: socket.socket) -> TcpInfo:
    """TCP_INFO of a socket (state byte at 0, u64 bytes_acked at 120, ...)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(raw) < 144:
        raise RuntimeError(f"TCP_INFO too short ({len(raw)} bytes) for bytes_acked/segs_in")
    bytes_acked, bytes_received = struct.unpack_from("QQ", raw, 120)
    segs_out, segs_in = struct.unpack_from("II", raw, 136)
    return TcpInfo(TCP_STATES.get(raw[0], str(raw[0])), bytes_acked, bytes_received,
                   segs_out, segs_in)  # fmt: skip


@dataclass(frozen=True)
class ProcTcpEntry:
    """One line of /proc/net/tcp{,6}: what ``ss`` would show for a socket."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: str
    inode: int


def _parse_addr(text: str) -> tuple[str, int]:
    """``0200C80A:1F90`` -> ("10.200.0.2", 8080); v6 is four host-order u32 words."""
    hexaddr, hexport = text.split(":")
    raw = bytes.fromhex(hexaddr)
    # The kernel prints each 32-bit word of the (network-order) address as a
    # host-order integer; undo that per word.
    fixed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    addr: IPv4Address | IPv6Address = ip_address(fixed)
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr), int(hexport, 16)


def proc_net_tcp(netns_path: str) -> list[ProcTcpEntry]:
    """Every TCP socket of the namespace at ``netns_path``, from /proc/net/tcp{,6}.

    /proc/self/net follows the *process's* main thread; /proc/thread-self/net
    follows the calling thread, which is the one ``entered`` moved.
    """
    entries: list[ProcTcpEntry] = []
    with entered(netns_path):
        for name in ("tcp", "tcp6"):
            with open(f"/proc/thread-self/net/{name}") as fh:
                lines = fh.read().splitlines()[1:]
            for line in lines:
                cols = line.split()
                entries.append(
                    ProcTcpEntry(
                        local=_parse_addr(cols[1]),
                        remote=_parse_addr(cols[2]),
                        state=TCP_STATES.get(int(cols[3], 16), cols[3]),
                        inode=int(cols[9]),
                    )
                )
    return entries


def _norm(addr: tuple[str, int] | tuple[str, int, int, int]) -> tuple[str, int]:
    ip = ip_address(addr[0])
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), addr[1]


def proc_tcp_state(netns_path: str, sock: socket.socket) -> str | None:
    """The state /proc/net/tcp shows in that namespace for this connected socket."""
    local, remote = _norm(sock.getsockname()), _norm(sock.getpeername())
    for entry in proc_net_tcp(netns_path):
        if entry.local == local and entry.remote == remote:
            return entry.state
    return None
