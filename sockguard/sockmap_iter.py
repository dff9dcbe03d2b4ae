"""The kernel's view of a sockhash/sockmap: which socket each key points to.

A userspace lookup on a map with a 4-byte value (Cilium's ``cilium_sock_ops``)
always fails with ENOSPC, so only a BPF ``iter/sockmap`` program can see the
socket behind a key.  ``bpf/sockmap_iter.bpf.c`` writes one fixed-size record
per entry; this module loads it, runs it once over a map and decodes the
records into :class:`~sockguard.model.TargetSocket` values.
"""

from __future__ import annotations

import errno
import functools
import socket
import struct
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import sockguard
from sockguard import libbpf
from sockguard.errors import LibbpfMissingError, NotRootError
from sockguard.libbpf import BpfError
from sockguard.model import Endpoint, TargetSocket, Tuple4

OBJECT_PATH = Path(sockguard.__file__).parent / "bpf" / "sockmap_iter.bpf.o"
PROGRAM = "dump_sockmap"
KEY_MAX = 64

# struct record in bpf/sockmap_iter.bpf.c: key[64], cookie, netns_ino, key_len,
# family, state, flags, saddr[16], daddr[16], sport, dport, pad.
RECORD = struct.Struct("=64sQQIHBB16s16sHHI")
REC_HAS_SOCKET = 0x1


RODATA = struct.Struct("=I")  # .rodata: const volatile __u32 key_size


def _load(key_size: int) -> libbpf.BpfObject:
    """Open and load the iterator object specialised for ``key_size``."""
    if not OBJECT_PATH.is_file():
        raise LibbpfMissingError(
            f"{OBJECT_PATH} is missing: reinstall sockguard (pip install .) to build BPF objects"
        )
    obj = libbpf.BpfObject(OBJECT_PATH)
    try:
        rodata = obj.rodata()
        if len(rodata) != RODATA.size:
            raise LibbpfMissingError(
                f"{OBJECT_PATH}: unexpected .rodata size {len(rodata)}; rebuild sockguard"
            )
        obj.set_rodata(RODATA.pack(key_size))
        obj.load()
    except BaseException:
        obj.close()
        raise
    return obj


def _decode(rec: tuple[object, ...], key_size: int) -> tuple[bytes, TargetSocket] | None:
    (key, cookie, netns, _klen, family, state, flags, saddr, daddr, sport, dport, _pad) = rec
    assert isinstance(key, bytes) and isinstance(saddr, bytes) and isinstance(daddr, bytes)
    assert isinstance(cookie, int) and isinstance(netns, int) and isinstance(family, int)
    assert isinstance(state, int) and isinstance(flags, int)
    assert isinstance(sport, int) and isinstance(dport, int)
    if not flags & REC_HAS_SOCKET:
        return None  # an empty sockmap slot
    tup: Tuple4 | None = None
    fam = 0
    if family == socket.AF_INET:
        fam = 4
        tup = Tuple4(
            4,
            Endpoint(IPv4Address(saddr[:4]), sport),
            Endpoint(IPv4Address(daddr[:4]), dport),
        )
    elif family == socket.AF_INET6:
        # v4-mapped peers of dual-stack sockets stay IPv6 (::ffff:a.b.c.d), as
        # sock_diag reports them.
        fam = 6
        tup = Tuple4(6, Endpoint(IPv6Address(saddr), sport), Endpoint(IPv6Address(daddr), dport))
    target = TargetSocket(cookie=cookie, family=fam, state=state, netns_ino=netns, tuple=tup)
    return key[:key_size], target


def read_sockmap(map_fd: int, key_size: int) -> dict[bytes, TargetSocket]:
    """Map each key of the sockhash/sockmap ``map_fd`` to the socket it holds.

    One walk in the kernel under RCU (sock_hash_seq_*), so the result is
    consistent per bucket but not a global snapshot.  Empty sockmap slots
    are left out.  Non-inet sockets (AF_UNIX in a sockmap) get family 0 and
    no tuple.
    """
    if not 0 < key_size <= KEY_MAX:
        raise ValueError(f"key size {key_size} not in 1..{KEY_MAX}")
    try:
        obj = _load(key_size)
    except BpfError as exc:
        # EACCES here is the verifier refusing the program, not a permission problem
        if exc.errno == errno.EPERM:
            raise NotRootError(f"loading the sockmap iterator: {exc.strerror}") from None
        raise
    try:
        with obj.program(PROGRAM).attach_iter_map(map_fd) as link:
            data = libbpf.iter_read(link)
    finally:
        obj.close()
    if len(data) % RECORD.size:
        raise BpfError(errno.EIO, f"sockmap iterator: {len(data)} bytes is not whole records")
    result: dict[bytes, TargetSocket] = {}
    for rec in RECORD.iter_unpack(data):
        decoded = _decode(rec, key_size)
        if decoded is not None:
            result[decoded[0]] = decoded[1]
    return result


@functools.cache
def iterator_available() -> tuple[bool, str]:
    """Whether the sockmap iterator can run here, and if not, why (cached)."""
    try:
        obj = _load(4)
    except LibbpfMissingError as exc:
        return False, str(exc)
    except BpfError as exc:
        if exc.errno == errno.EPERM:
            return False, f"loading the sockmap iterator is not permitted: {exc.strerror}"
        if exc.errno == errno.EINVAL:
            return False, f"the kernel rejects the sockmap iterator: {exc.strerror}"
        return False, f"the sockmap iterator does not load: {str(exc).splitlines()[0]}"
    obj.close()
    return True, "iter/sockmap loads"
