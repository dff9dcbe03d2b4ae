"""The test oracle for Cilium's sockhash keys.

Written independently of ``sockguard/`` on purpose: tests compare what the
kernel stored (via the lab's BPF object) and what sockguard decodes against
this encoder, so it must not share code with either.  It is a direct reading
of Cilium v1.11's ``struct sock_key`` (bpf/sockops/bpf_sockops.h):

    offset  0  sip     16 bytes (IPv4 in the first 4, rest zero)
    offset 16  dip     16 bytes
    offset 32  family   1 byte  (1 = IPv4, 2 = IPv6), then 3 zero bytes
    offset 36  sport    u32 whose first two bytes are the big-endian port
    offset 40  dport    same

and of its semantics: the key stored FOR a socket is written from its PEER's
point of view (sip = the socket's remote address, sport = its remote port).
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

KEY_SIZE = 44
FAMILY_IPV4 = 1
FAMILY_IPV6 = 2


def _addr16(ip: str | IPv4Address | IPv6Address, family: int) -> tuple[bytes, int]:
    """The 16-byte address field and the key family code for ``ip``.

    An IPv4-mapped IPv6 address gets an IPv4 key, as the lab's BPF (and
    Cilium, which reads ``remote_ip4`` of such a socket) does.
    """
    addr = ip_address(ip) if isinstance(ip, str) else ip
    if family == socket.AF_INET6 and isinstance(addr, IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if isinstance(addr, IPv4Address):
        return addr.packed + bytes(12), FAMILY_IPV4
    return addr.packed, FAMILY_IPV6


def _port(port: int) -> bytes:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return struct.pack("!H", port) + bytes(2)


def raw_key(
    sip: str | IPv4Address | IPv6Address,
    sport: int,
    dip: str | IPv4Address | IPv6Address,
    dport: int,
    family: int = socket.AF_INET,
) -> bytes:
    """A key with the fields exactly as given (no peer-perspective swap)."""
    s, fam_s = _addr16(sip, family)
    d, fam_d = _addr16(dip, family)
    if fam_s != fam_d:
        raise ValueError(f"mixed address families: {sip} / {dip}")
    key = s + d + bytes([fam_s, 0, 0, 0]) + _port(sport) + _port(dport)
    assert len(key) == KEY_SIZE
    return key


def cilium_key(
    local_ip: str | IPv4Address | IPv6Address,
    local_port: int,
    remote_ip: str | IPv4Address | IPv6Address,
    remote_port: int,
    family: int = socket.AF_INET,
) -> bytes:
    """The key Cilium (and the lab) stores FOR a socket with this local/remote side.

    Peer perspective: sip = remote, sport = remote port, dip = local,
    dport = local port.  This is also the key the peer's sk_msg builds.
    """
    return raw_key(remote_ip, remote_port, local_ip, local_port, family)


def key_for(sock: socket.socket) -> bytes:
    """The key the lab should have stored for a connected socket."""
    local = sock.getsockname()
    remote = sock.getpeername()
    return cilium_key(local[0], local[1], remote[0], remote[1], sock.family)


def describe(key: bytes) -> str:
    """Human-readable key for assertion messages: ``sip:sport -> dip:dport (fam)``."""
    if len(key) != KEY_SIZE:
        return f"<{len(key)}-byte key {key.hex()}>"
    fam = key[32]
    if fam == FAMILY_IPV4:
        sip: IPv4Address | IPv6Address = IPv4Address(key[0:4])
        dip: IPv4Address | IPv6Address = IPv4Address(key[16:20])
    else:
        sip, dip = IPv6Address(key[0:16]), IPv6Address(key[16:32])
    sport = struct.unpack("!H", key[36:38])[0]
    dport = struct.unpack("!H", key[40:42])[0]
    return f"{sip}:{sport} -> {dip}:{dport} (family {fam})"
