"""The kernel's view of a sockhash/sockmap: which socket each key points to.

A userspace lookup on a map with a 4-byte value (Cilium's ``cilium_sock_ops``)
always fails with ENOSPC, so only a BPF ``iter/sockmap`` program can see the
socket behind a key.  ``bpf/sockmap_iter.bpf.c`` writes one fixed-size record
per entry; this module loads it, runs it once over a map and decodes the
records into :class:`~sockguard.core.model.TargetSocket` values.  Each record also
says whether the socket is dead (SOCK_DEAD) and which receive path it has
(``sk_prot->recvmsg``, see :mod:`sockguard.kernel.recvsyms`).
"""

from __future__ import annotations

import errno
import functools
import socket

from sockguard.core.errors import LibbpfMissingError
from sockguard.core.layout import KERNEL_KEY_MAX, KernelKeyForm
from sockguard.core.model import TargetSocket
from sockguard.core.rows import Interner, Record, gc_paused, target_socket
from sockguard.kernel import bpf_object, libbpf, recvsyms
from sockguard.kernel.bpf_object import CStruct
from sockguard.kernel.libbpf import BpfError

__all__ = ["KeyReader", "Record", "iterator_available", "read_judged", "read_records",
           "read_sockmap", "target_socket"]

OBJECT_PATH = bpf_object.object_path("sockmap_iter")
PROGRAM = "dump_sockmap"
#: Reads skc_cookie instead of calling bpf_get_socket_cookie (kernels before 5.12).
COMPAT_PROGRAM = "dump_sockmap_compat"
KEY_MAX = KERNEL_KEY_MAX  # bpf/entry_record.h

#: struct record of bpf/entry_record.h (both entry sources write it).
RECORD = CStruct("record", "=64sQQIHBB16s16sHHB3x",
                 "key cookie netns_ino key_len family state flags saddr daddr sport dport recv")
REC_HAS_SOCKET = 0x1
REC_DEAD = 0x2
REC_SUMMARY = 0x10  # bpf/entry_record.h: a judged walk's last record; cookie = healthy count

RODATA = recvsyms.CONFIG  # .rodata: struct sg_config (bpf/sock_state.h)


def _load(key_size: int, program: str | None = None, judge: KernelKeyForm | None = None,
          refused: str | None = None) -> libbpf.BpfObject:
    """Open and load the iterator object specialised for ``key_size``.

    Only ``program`` (default: the variant this kernel takes) is loaded: the
    other one would fail the whole object where its helper is missing.
    """
    return bpf_object.load(OBJECT_PATH, programs=(program or iterator_variant(),),
                           settings=recvsyms.config(key_size, judge), refused=refused)


def read_records(map_fd: int, key_size: int) -> dict[bytes, Record]:
    """Each key of the sockhash/sockmap ``map_fd`` with the socket it holds, as records.

    One walk in the kernel under RCU (sock_hash_seq_*), so the result is
    consistent per bucket but not a global snapshot.  Empty sockmap slots
    are left out.
    """
    return _walk(map_fd, key_size, judge=None)[0]


def read_judged(map_fd: int, key_size: int,
                form: KernelKeyForm) -> tuple[dict[bytes, Record], dict[int, int]]:
    """The records of the entries the kernel could not judge healthy, and the healthy ones.

    The healthy entries come as counts per netns inode of their socket (0:
    counted, namespace unknown — the kernel's table was full).

    A healthy entry (bpf/entry_record.h: its own socket alive, connected,
    not on tcp_recvmsg, with the key's tuple) costs no record and no Python
    object.  ``form``: where the map's layout puts a socket's fields.
    """
    return _walk(map_fd, key_size, judge=form)


def _healthy_by_netns(obj: libbpf.BpfObject, total: int) -> dict[int, int]:
    fd = obj.map("healthy_netns").fd
    out: dict[int, int] = {}
    key: bytes | None = None
    while (key := libbpf.map_get_next_key(fd, key, 8)) is not None:
        value = libbpf.map_lookup(fd, key, 8)
        if value is not None:
            out[int.from_bytes(key, "little")] = int.from_bytes(value, "little")
    if total > sum(out.values()):
        out[0] = out.get(0, 0) + total - sum(out.values())
    return out


def _walk(map_fd: int, key_size: int,
          judge: KernelKeyForm | None) -> tuple[dict[bytes, Record], dict[int, int]]:
    if not 0 < key_size <= KEY_MAX:
        raise ValueError(f"key size {key_size} not in 1..{KEY_MAX}")
    # EACCES here is the verifier refusing the program, not a permission problem
    obj = _load(key_size, judge=judge, refused="the sockmap iterator")
    by_netns: dict[int, int] = {}
    try:
        with obj.program(iterator_variant()).attach_iter_map(map_fd) as link:
            data = libbpf.iter_read(link)
        if judge is not None:
            summary = [r for r in RECORD.iter_unpack(data[-RECORD.size:]) if r[6] & REC_SUMMARY]
            by_netns = _healthy_by_netns(obj, summary[0][1] if summary else 0)
    finally:
        obj.close()
    if len(data) % RECORD.size:
        raise BpfError(errno.EIO, f"sockmap iterator: {len(data)} bytes is not whole records")
    result: dict[bytes, Record] = {}
    inet = socket.AF_INET
    healthy = 0
    summaries = 0
    with gc_paused():
        for (key, cookie, netns, _klen, family, state, flags, saddr, daddr, sport, dport,
             recv) in RECORD.iter_unpack(data):
            if flags & REC_SUMMARY:
                healthy, summaries = cookie, summaries + 1
                continue
            if not flags & REC_HAS_SOCKET:
                continue  # an empty sockmap slot
            if family == inet:
                saddr, daddr = saddr[:4], daddr[:4]
            k = key[:key_size]
            result[k] = (k, cookie, netns, family, state, saddr, daddr, sport, dport,
                         bool(flags & REC_DEAD), recv)
    if judge is not None and (summaries != 1 or sum(by_netns.values()) != healthy):
        raise BpfError(errno.EIO, f"sockmap iterator: {summaries} summary records in one walk, "
                                  f"{healthy} healthy entries, {by_netns} by netns")
    return result, by_netns


_FLAGS_AT = RECORD.offset("flags")


class KeyReader:
    """Only the keys of sockhash/sockmap maps, with the iterator object loaded once.

    For the tracer's watched set, refreshed every second or so: loading the
    object (the verifier) costs more than walking a few thousand entries.
    """

    def __init__(self, key_size: int) -> None:
        if not 0 < key_size <= KEY_MAX:
            raise ValueError(f"key size {key_size} not in 1..{KEY_MAX}")
        self.key_size = key_size
        self._obj: libbpf.BpfObject | None = _load(key_size)

    def keys(self, map_fd: int) -> list[bytes]:
        """Every key of ``map_fd`` that holds a socket (one kernel walk, see read_records)."""
        if self._obj is None:
            raise BpfError(errno.EBADF, "sockmap iterator: reader is closed")
        with self._obj.program(iterator_variant()).attach_iter_map(map_fd) as link:
            data = libbpf.iter_read(link)
        size, ks, at = RECORD.size, self.key_size, _FLAGS_AT
        if len(data) % size:
            raise BpfError(errno.EIO, f"sockmap iterator: {len(data)} bytes is not whole records")
        return [data[i : i + ks] for i in range(0, len(data), size)
                if data[i + at] & REC_HAS_SOCKET]

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None


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
def _probe() -> tuple[str | None, str]:
    """(the program this kernel loads, or None; why) — tried once per process."""
    why = ""
    for program in (PROGRAM, COMPAT_PROGRAM):
        try:
            obj = _load(4, program)
        except LibbpfMissingError as exc:
            return None, str(exc)
        except BpfError as exc:
            if exc.errno == errno.EPERM:
                return None, f"loading the sockmap iterator is not permitted: {exc.strerror}"
            why = f"the kernel rejects the sockmap iterator: {str(exc).splitlines()[0]}"
            continue
        obj.close()
        if program == COMPAT_PROGRAM:
            return program, ("iter/sockmap loads (reading skc_cookie: this kernel has no "
                             "bpf_get_socket_cookie for iterators)")
        return program, "iter/sockmap loads"
    return None, why


def iterator_variant() -> str:
    """The iterator program this kernel loads (PROGRAM, or COMPAT_PROGRAM before 5.12)."""
    return _probe()[0] or PROGRAM


def cookies_need_scan_first() -> bool:
    """Whether live sockets must be scanned by sock_diag before the map is read.

    The compat program reads skc_cookie, which is 0 until sock_gen_cookie runs;
    sock_diag calls it for every socket it reports.
    """
    return _probe()[0] == COMPAT_PROGRAM


def iterator_available() -> tuple[bool, str]:
    """Whether the sockmap iterator can run here, and if not, why (cached)."""
    program, why = _probe()
    return program is not None, why
