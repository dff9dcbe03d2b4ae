"""The sockets adapter's second source: every TCP socket of a namespace, from ``iter/tcp``.

``bpf/tcp_iter.bpf.c`` writes one fixed-size record per TCP socket (listeners
left out): the same fields a sock_diag dump gives (tuple, state, cookie,
inode, uid) plus the socket's receive path (``sk_prot->recvmsg``, see
:mod:`sockguard.kernel.recvsyms`), which sock_diag cannot see.  The result is the
same :class:`~sockguard.kernel.sockets.Scan` as :func:`sockguard.kernel.sockets.scan_all`,
with ``table.recv`` filled, so the audit core takes either.

An ``iter/tcp`` walk covers the network namespace of the thread that creates
the iterator fd, so the program is loaded and attached once and an fd is
created inside each namespace.  sock_diag stays the independent witness: the
tests require both sources to agree on every socket.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import Sequence

from sockguard.core.errors import LibbpfMissingError, NotRootError
from sockguard.core.rows import SockRow, gc_paused
from sockguard.kernel import bpf_object, libbpf, recvsyms
from sockguard.kernel.bpf_object import CStruct
from sockguard.kernel.libbpf import BpfError
from sockguard.kernel.netns import NamespaceGone, NetnsRef, entered, enumerate_netns
from sockguard.kernel.sockets import Scan

__all__ = ["RECORD", "TcpRecord", "dump_namespace", "read_tcp", "tcp_iterator_available"]

log = logging.getLogger(__name__)

OBJECT_PATH = bpf_object.object_path("tcp_iter")
PROGRAM = "dump_tcp"

#: struct tcp_record of bpf/tcp_iter.bpf.c.
RECORD = CStruct("tcp_record", "=QQQIHBB16s16sHHB11x",
                 "cookie netns_ino ino uid family state flags saddr daddr sport dport recv")
REC_FULL, REC_TIMEWAIT, REC_REQUEST, REC_DEAD = 0x1, 0x2, 0x4, 0x8

#: One decoded record: cookie, netns inode, inode, uid, family, state, flags,
#: local address (4 bytes for AF_INET), remote address, local port, remote port, recv code.
TcpRecord = tuple[int, int, int, int, int, int, int, bytes, bytes, int, int, int]


class TcpIterator:
    """The loaded and attached ``iter/tcp`` program; ``dump`` walks one namespace."""

    def __init__(self) -> None:
        self._obj = bpf_object.load(OBJECT_PATH, settings=recvsyms.config(),
                                    refused="the tcp iterator")
        try:
            self._link = self._obj.program(PROGRAM).attach_iter()
        except BaseException:
            self._obj.close()
            raise

    def dump(self, ref: NetnsRef) -> bytes:
        """The raw records of the namespace ``ref`` names (NamespaceGone if it vanished)."""
        with entered(ref.path):
            fd = libbpf.iter_create(self._link)
        data = libbpf.iter_read_fd(fd)
        if len(data) % RECORD.size:
            raise BpfError(errno.EIO, f"tcp iterator: {len(data)} bytes is not whole records")
        return data

    def close(self) -> None:
        self._link.destroy()
        self._obj.close()

    def __enter__(self) -> TcpIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rows(data: bytes, rows: list[SockRow], recv: dict[int, int]) -> None:
    """Append a sock_diag-compatible row per record, and the known receive paths."""
    append = rows.append
    inet = socket.AF_INET
    for (cookie, _netns, ino, uid, family, state, _flags, saddr, daddr, sport, dport,
         path) in RECORD.iter_unpack(data):
        if family == inet:
            saddr, daddr = saddr[:4], daddr[:4]
        append(((saddr, sport, daddr, dport), state, cookie, ino, uid))
        if path:
            recv[cookie] = path


def dump_namespace(ref: NetnsRef) -> list[TcpRecord]:
    """Every record of one namespace, decoded (for tests and diagnostics)."""
    with TcpIterator() as it:
        data = it.dump(ref)
    out: list[TcpRecord] = []
    for (cookie, netns, ino, uid, family, state, flags, saddr, daddr, sport, dport,
         path) in RECORD.iter_unpack(data):
        if family == socket.AF_INET:
            saddr, daddr = saddr[:4], daddr[:4]
        out.append((cookie, netns, ino, uid, family, state, flags, saddr, daddr, sport, dport,
                    path))
    return out


def read_tcp(refs: Sequence[NetnsRef] | None = None) -> Scan:
    """Live TCP sockets of every namespace, with receive paths, as compact rows.

    The same contract as ``sockets.scan_all(compact=True)``: a namespace that
    vanishes is noted and skipped; ``Scan.sockets`` stays empty.
    """
    scan = Scan()
    with TcpIterator() as it, gc_paused():
        for ref in refs if refs is not None else enumerate_netns():
            try:
                data = it.dump(ref)
            except NamespaceGone:
                scan.vanished.append(ref.path)
                continue
            except PermissionError as exc:
                raise NotRootError(
                    f"cannot enter network namespace {ref.path}: {exc.strerror}"
                ) from exc
            except BpfError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                    raise
                log.warning("cannot read namespace %s: %s", ref.path, exc)
                scan.unreadable.append(f"{ref.path}: {exc}")
                continue
            except OSError as exc:
                log.warning("cannot read namespace %s: %s", ref.path, exc)
                scan.unreadable.append(f"{ref.path}: {exc.strerror or exc}")
                continue
            _rows(data, scan.table.rows, scan.table.recv)
            scan.table.close_span(ref.netns)
            scan.namespaces.append(ref.netns)
    return scan


@functools.cache
def tcp_iterator_available() -> tuple[bool, str]:
    """Whether iter/tcp can run here, and if not, why (cached)."""
    try:
        TcpIterator().close()
    except LibbpfMissingError as exc:
        return False, str(exc)
    except (NotRootError, BpfError) as exc:
        return False, f"the tcp iterator does not load: {str(exc).splitlines()[0]}"
    syms = recvsyms.recv_symbols()
    if not syms.usable:
        return True, "iter/tcp loads; receive paths unknown: " + "; ".join(syms.problems)
    return True, "iter/tcp loads"
