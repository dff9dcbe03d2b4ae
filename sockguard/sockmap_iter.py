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
from pathlib import Path

import sockguard
from sockguard import libbpf
from sockguard.compact import Interner, Record, gc_paused, target_socket
from sockguard.errors import LibbpfMissingError, NotRootError
from sockguard.libbpf import BpfError
from sockguard.model import TargetSocket

__all__ = ["Record", "iterator_available", "read_records", "read_sockmap", "target_socket"]

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


def read_records(map_fd: int, key_size: int) -> dict[bytes, Record]:
    """Each key of the sockhash/sockmap ``map_fd`` with the socket it holds, as records.

    One walk in the kernel under RCU (sock_hash_seq_*), so the result is
    consistent per bucket but not a global snapshot.  Empty sockmap slots
    are left out.
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
    result: dict[bytes, Record] = {}
    inet = socket.AF_INET
    with gc_paused():
        for (key, cookie, netns, _klen, family, state, flags, saddr, daddr, sport, dport,
             _pad) in RECORD.iter_unpack(data):
            if not flags & REC_HAS_SOCKET:
                continue  # an empty sockmap slot
            if family == inet:
                saddr, daddr = saddr[:4], daddr[:4]
            k = key[:key_size]
            result[k] = (k, cookie, netns, family, state, saddr, daddr, sport, dport)
    return result


def read_sockmap(map_fd: int, key_size: int) -> dict[bytes, TargetSocket]:
    """Map each key of the sockhash/sockmap ``map_fd`` to the socket it holds.

    One walk in the kernel under RCU (sock_hash_seq_*), so the result is
    consistent per bucket but not a global snapshot.  Empty sockmap slots
    are left out.  Non-inet sockets (AF_UNIX in a sockmap) get family 0 and
    no tuple.
    """
    records = read_records(map_fd, key_size)
    interner = Interner()
    return {k: target_socket(rec, interner) for k, rec in records.items()}


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
