"""Which socket each key of a sockhash points to, without an iterator.

The second entry source, for nodes where ``iter/sockmap`` cannot load
(kernels before 5.10, or a policy that refuses map iterators: on some
machines of the development kind every ``iter/sockmap`` load is EPERM while
tc programs load).  ``bpf/sockhash_lookup.bpf.c`` is a SCHED_CLS program
that looks one key up in the map (``bpf_map_lookup_elem`` on a sockhash
returns the socket to tc programs, 4-byte value or not) and writes the
socket into the test packet; :class:`Reader` runs it with
``BPF_PROG_TEST_RUN`` once per key the syscall walk listed.

Records have the sockmap iterator's shape (:data:`~sockguard.core.rows.Record`),
so the audit core treats both sources alike.  How exact they are depends on
which of the object's two programs the kernel takes:

- ``lookup_btf`` (``exactness = "cookie"``): also the socket's cookie field,
  netns, SOCK_DEAD and receive path, through ``bpf_skc_to_tcp_sock``.  The
  cookie field is 0 until generated, as with the sockmap iterator's compat
  program: a look scans the sockets (which generates every listed socket's
  cookie) before it reads the map;
- ``lookup_tuple`` (``exactness = "tuple"``): family, state and tuple only.
  Their cookie is :data:`~sockguard.core.rows.COOKIE_UNKNOWN`; the audit then
  judges an entry by whether its socket's tuple and state are the owner's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import struct
import threading
from collections.abc import Collection, Iterator, Sequence

from sockguard.core.errors import LibbpfMissingError
from sockguard.core.layout import KernelKeyForm
from sockguard.core.rows import COOKIE_UNKNOWN, Record, gc_paused
from sockguard.kernel import bpf_object, libbpf, maps, recvsyms
from sockguard.kernel.libbpf import BpfError
from sockguard.kernel.sockmap_iter import KEY_MAX, REC_DEAD, REC_HAS_SOCKET, RECORD

OBJECT_PATH = bpf_object.object_path("sockhash_lookup")
BTF_PROGRAM = "lookup_btf"
TUPLE_PROGRAM = "lookup_tuple"
TARGET_MAP = "target"
REC_TUPLE_ONLY = 0x4
REC_HEALTHY = 0x8  # bpf/entry_record.h: judged healthy in the kernel (judge mode)
#: Where the records start in the test packet (bpf/sockhash_lookup.bpf.c RECORD_OFF).
RECORD_OFF = 16
#: Records per test run (bpf/sockhash_lookup.bpf.c BATCH): one syscall answers this
#: many keys.  A record the program did not reach keeps key_len 0, so a mismatch
#: with the object is an error, never a silent gap.
BATCH = 24
PACKET_SIZE = RECORD_OFF + RECORD.size
_FLAGS = RECORD.offset("flags")
_KEY_LEN = struct.Struct("=I")
_KEY_LEN_OFF = RECORD.offset("key_len")
#: The kernel's healthy counts per netns inode (judge mode; u64 -> u64).
HEALTHY_MAP = "healthy"
#: Exactness of each program's records (the JSON's ``entry_exactness``).
EXACTNESS = {BTF_PROGRAM: "cookie", TUPLE_PROGRAM: "tuple"}


def _load(map_fd: int, key_size: int, program: str, judge: KernelKeyForm | None = None,
          refused: str | None = None) -> libbpf.BpfObject:
    """The lookup object with only ``program``, its ``target`` map being ``map_fd``."""
    return bpf_object.load(OBJECT_PATH, programs=(program,),
                           settings=recvsyms.config(key_size, judge),
                           reuse={TARGET_MAP: map_fd}, refused=refused)


@functools.cache
def _probe() -> tuple[str | None, str]:
    """(the program this kernel loads, or None; why) — tried once per process."""
    try:
        fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_SOCKHASH, f"{maps.PROBE_MAP_PREFIX}sh", 44, 4, 1)
    except BpfError as exc:
        return None, f"cannot create a sockhash to probe the tc lookup: {exc}"
    except LibbpfMissingError as exc:
        return None, str(exc)
    why = ""
    try:
        for program in (BTF_PROGRAM, TUPLE_PROGRAM):
            try:
                obj = _load(fd, 44, program)
            except LibbpfMissingError as exc:
                return None, str(exc)
            except BpfError as exc:
                first = str(exc).splitlines()[0]
                why = f"the kernel refuses a tc program's sockhash lookup: {first}"
                if exc.errno == errno.EPERM:
                    why = f"loading the tc lookup program is not permitted: {exc.strerror}"
                continue
            try:
                reader = Reader(obj, program, 44)
                reader.lookup(bytes(44))  # a run must work too, not only the load
            except BpfError as exc:
                why = f"running the tc lookup program fails: {exc}"
                continue
            finally:
                obj.close()
            if program == BTF_PROGRAM:
                return program, ("tc lookup loads (bpf_map_lookup_elem from SCHED_CLS, "
                                 "BPF_PROG_TEST_RUN): tuple, state, cookie, receive path")
            return program, ("tc lookup loads with struct bpf_sock fields only (this kernel "
                             "refuses bpf_skc_to_tcp_sock there): tuple and state, no cookie")
    finally:
        os.close(fd)
    return None, why


def lookup_available() -> tuple[bool, str]:
    """Whether the tc lookup source can run here, and if not, why (cached)."""
    program, why = _probe()
    return program is not None, why


def lookup_exactness() -> str | None:
    """``"cookie"`` or ``"tuple"``: what this kernel's tc lookup records tell; None: none."""
    program = _probe()[0]
    return EXACTNESS[program] if program else None


class Reader:
    """The tc lookup program loaded for one map; it answers up to BATCH keys per run."""

    def __init__(self, obj: libbpf.BpfObject, program: str, key_size: int) -> None:
        self._obj = obj
        self.key_size = key_size
        self.program = program
        self._fd = obj.program(program).fd
        self._healthy_fd = obj.map(HEALTHY_MAP).fd
        self._runs: dict[int, libbpf.TestRun] = {}

    def close(self) -> None:
        """Unload the program (the object this reader was made with)."""
        self._obj.close()

    def lookup(self, key: bytes) -> Record | None:
        """The socket ``key`` points to, as a record; None when the key holds none."""
        rec = self._decode(key, self.run([key]), RECORD_OFF)
        return rec if isinstance(rec, tuple) else None

    def run(self, keys: Sequence[bytes]) -> bytes:
        """One test run over ``keys`` (at most BATCH): the packet as the program left it."""
        return bytes(self._run(keys)[1])

    def _run(self, keys: Sequence[bytes]) -> tuple[int, memoryview]:
        """(how many records need reading, the packet, valid until the next run): the
        rest were counted healthy.  Only the keys are written into the packet; the
        rest of it stays zero from run to run."""
        runner = self._runs.get(len(keys))
        if runner is None:
            runner = self._runs[len(keys)] = libbpf.TestRun(
                self._fd, RECORD_OFF + len(keys) * RECORD.size)
        packet, size, off = runner.packet, self.key_size, RECORD_OFF
        for k in keys:
            packet[off:off + size] = k
            off += RECORD.size
        unread, out = runner.run()
        last = RECORD_OFF + (len(keys) - 1) * RECORD.size
        if (unread > len(keys) or len(out) < runner.size
                or _KEY_LEN.unpack_from(out, last + _KEY_LEN_OFF)[0] == 0):
            raise BpfError(errno.EIO, f"tc lookup: program returned {unread}, {len(out)} "
                                      f"bytes, {len(keys)} keys asked: rebuild sockguard")
        return unread, out

    def read(self, keys: Sequence[bytes], records: dict[bytes, Record],
             healthy: dict[int, int]) -> None:
        """Add the records of ``keys`` the kernel did not judge healthy to ``records`` and
        count the healthy ones (judge mode only) by their socket's netns inode in
        ``healthy``; keys without a socket are left out.

        The kernel counts the healthy entries itself (bpf/sockhash_lookup.bpf.c,
        ``healthy``) and tells per run how many records need reading: a run of
        healthy entries is not looked at here."""
        self._drain_healthy(None)  # counts a single ``lookup`` may have left
        for start in range(0, len(keys), BATCH):
            chunk = keys[start:start + BATCH]
            unread, out = self._run(chunk)
            if not unread:
                continue
            for i, key in enumerate(chunk):
                off = RECORD_OFF + i * RECORD.size
                if out[off + _FLAGS] & REC_HEALTHY:
                    continue  # counted in the kernel
                rec = self._decode(key, out, off)
                if isinstance(rec, tuple):
                    records[key] = rec
        self._drain_healthy(healthy)

    def _drain_healthy(self, healthy: dict[int, int] | None) -> None:
        """Empty the kernel's healthy counts, adding them to ``healthy`` (None: drop them)."""
        fd = self._healthy_fd
        cursor = libbpf.KeyCursor(fd, 8)
        inos: list[bytes] = []
        key = cursor.next(None)
        while key is not None:  # collect first: deleting under the cursor restarts the walk
            inos.append(key)
            key = cursor.next(key)
        for raw in inos:
            value = libbpf.map_lookup(fd, raw, 8)
            libbpf.map_delete(fd, raw)
            if healthy is not None and value is not None:
                ino = int.from_bytes(raw, "little")
                healthy[ino] = healthy.get(ino, 0) + int.from_bytes(value, "little")

    @staticmethod
    def _decode(key: bytes, out: bytes | memoryview, off: int) -> Record | int | None:
        """The record at ``off``: None without a socket, the netns inode when healthy."""
        (_key, cookie, netns, _klen, family, state, flags, saddr, daddr, sport, dport,
         recv) = RECORD.unpack_from(out, off)
        if not flags & REC_HAS_SOCKET:
            return None
        if flags & REC_HEALTHY:
            return int(netns)
        if family == socket.AF_INET:
            saddr, daddr = saddr[:4], daddr[:4]
        if flags & REC_TUPLE_ONLY:
            cookie, netns, recv = COOKIE_UNKNOWN, 0, 0
        return (key, cookie, netns, family, state, saddr, daddr, sport, dport,
                bool(flags & REC_DEAD), recv)


def read_judged(map_fd: int, key_size: int, keys: list[bytes],
                form: KernelKeyForm) -> tuple[dict[bytes, Record], dict[int, int]]:
    """The records of the entries the kernel did not judge healthy, and the healthy ones
    as counts per netns inode of their socket (``sockmap_iter.read_judged``'s contract);
    ``form``: where the map's layout puts a socket's fields."""
    result: dict[bytes, Record] = {}
    healthy: dict[int, int] = {}
    program = _probe()[0] or BTF_PROGRAM
    with _reader(map_fd, key_size, program, judge=form) as reader, gc_paused():
        reader.read(keys, result, healthy)
    return result, healthy


_loaded = threading.local()
#: A session's reader: (map id, key size, program, the form judged by or None).
_Ident = tuple[int, int, str, KernelKeyForm | None]


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Keep each lookup program loaded until the session ends (one audit: both looks and
    the re-reads; the daemon's audit thread: its life, with ``retain`` at each audit),
    instead of loading it for every read: a load costs 10-20 ms of CO-RE relocation
    against the kernel's BTF.  Per thread; a nested session joins the outer."""
    if getattr(_loaded, "objects", None) is not None:
        yield
        return
    objects: dict[_Ident, Reader] = {}
    _loaded.objects = objects
    try:
        yield
    finally:
        _loaded.objects = None
        for reader in objects.values():
            reader.close()


def retain(map_ids: Collection[int]) -> None:
    """In a session, unload the readers of maps not in ``map_ids``.

    A loaded reader holds its map (the program references it): a daemon whose
    session outlives one audit calls this with the maps it audits, so a map
    Cilium replaced is released at the next audit, not kept alive with its sockets.
    """
    objects: dict[_Ident, Reader] | None = getattr(_loaded, "objects", None)
    if not objects:
        return
    for ident in [i for i in objects if i[0] not in map_ids]:
        objects.pop(ident).close()


@contextlib.contextmanager
def _reader(map_fd: int, key_size: int, program: str,
            judge: KernelKeyForm | None = None) -> Iterator[Reader]:
    """A reader of ``map_fd``: the session's (keyed by the map's id), or one of its own."""
    objects: dict[_Ident, Reader] | None = getattr(_loaded, "objects", None)
    if objects is None:
        reader = Reader(_load_or_refuse(map_fd, key_size, program, judge), program, key_size)
        try:
            yield reader
        finally:
            reader.close()
        return
    ident = (libbpf.map_info(map_fd).id, key_size, program, judge)
    if ident not in objects:
        objects[ident] = Reader(_load_or_refuse(map_fd, key_size, program, judge), program,
                                key_size)
    yield objects[ident]


def _load_or_refuse(map_fd: int, key_size: int, program: str,
                    judge: KernelKeyForm | None = None) -> libbpf.BpfObject:
    if not 0 < key_size <= KEY_MAX:
        raise ValueError(f"key size {key_size} not in 1..{KEY_MAX}")
    return _load(map_fd, key_size, program, judge, refused="the tc lookup program")


def read_records(map_fd: int, key_size: int, keys: list[bytes],
                 program: str | None = None) -> dict[bytes, Record]:
    """The socket behind each of ``keys`` in the sockhash/sockmap ``map_fd``.

    A key deleted since it was listed is left out, as the iterator would
    not have seen it.  Tuple-only records carry ``cookie = COOKIE_UNKNOWN``.
    ``program`` (default: the one this kernel takes) lets a caller that
    wants tuple-only records ask for ``TUPLE_PROGRAM`` where both load.
    """
    result: dict[bytes, Record] = {}
    program = program or _probe()[0] or BTF_PROGRAM
    with _reader(map_fd, key_size, program) as reader, gc_paused():
        reader.read(keys, result, {})  # not in judge mode: nothing is counted healthy
    return result
