"""The sockets adapter: live TCP sockets of every namespace, from sock_diag.

One NETLINK_SOCK_DIAG socket is opened inside each namespace (sock_diag only
reports the namespace its socket lives in) and asked for IPv4 and IPv6 TCP
sockets in every state but LISTEN.  Requests and replies are built and decoded
here with ``struct``: pyroute2's generic decoder costs about 95 µs a socket
(1.7 s for 18,000 sockets), and importing pyroute2 at all costs ~170 ms of
every command's start-up for one 72-byte request.  A reply's
fixed 72-byte ``inet_diag_msg`` header is all that is read: no attributes are
requested, and those the kernel adds anyway (shutdown, cgroup id, sockopt) are skipped.

A scan of 100,000 sockets becomes compact rows (:class:`~sockguard.core.rows.SocketTable`);
``LiveSocket`` values are built from them only on demand.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from sockguard.core.audit import normalize
from sockguard.core.errors import NotRootError
from sockguard.core.model import Endpoint, IPAddress, LiveSocket, Netns, Tuple4
from sockguard.core.rows import SocketTable, SockRow, gc_paused, tuple_key
from sockguard.core.tcp_states import OWNER_STATES, TCP_LISTEN
from sockguard.kernel.netns import NamespaceGone, NetnsRef, entered, enumerate_netns

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
NLMSG_ERROR = 2
NLMSG_DONE = 3
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300
_NLMSGHDR = struct.Struct("=IHHII")
_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sIQIIIII")
# The fields of inet_diag_msg a scan keeps: family, state, sport, dport, src,
# dst, cookie, uid, inode.
_DIAG_ROW = struct.Struct("=BB2x2s2s16s16s4xQ12xII")
_DIAG_MIN = _NLMSGHDR.size + _DIAG_MSG.size
_ALL_BUT_LISTEN = ((1 << 13) - 1) & ~(1 << TCP_LISTEN)
_NOCOOKIE = 0xFFFFFFFFFFFFFFFF
_RECV_BUF = 1 << 20
#: Exact lookups per datagram: their answers (~1-2 KB of receive buffer each, as
#: skb truesize) must fit _RECV_BUF, or the kernel drops them (netlink_unicast, EAGAIN).
_BATCH = 128
_REPLY_TIMEOUT = 10  # seconds
_ANSWER_BUF = 1 << 16  # one exact lookup's answer is a datagram of its own, < 1 KiB


@dataclass
class Scan:
    """The sockets of every namespace that could be read, and those that could not.

    ``vanished``: paths that no longer opened (the namespace went away while
    we looked).  ``unreadable``: namespaces that exist but could not be read
    (out of fds, a dump that failed), as "path: reason".  Neither is
    "no sockets there": an audit with either is incomplete, and nothing is
    called stale for the mere absence of an owner (see audit.AuditPolicy).
    """

    sockets: list[LiveSocket] = field(default_factory=list)
    namespaces: list[Netns] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    table: SocketTable = field(default_factory=SocketTable)  # the same sockets, as rows
    unreadable: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every namespace enumerated was read."""
        return not self.vanished and not self.unreadable


def _ip(family: int, raw: bytes) -> IPAddress:
    return IPv4Address(raw[:4]) if family == socket.AF_INET else IPv6Address(raw)


#: struct nlmsghdr + struct inet_diag_req_v2 up to its sockid (include/uapi/linux/
#: inet_diag.h): family, protocol, ext, pad, states; then the sockid's ports and
#: addresses in network order, and its interface and cookie in host order.
_REQ_HEAD = struct.Struct("=IHHIIBBBxI")
_REQ_ID = struct.Struct(">HH16s16s")
_REQ_TAIL = struct.Struct("=IQ")
_REQ_LEN = _REQ_HEAD.size + _REQ_ID.size + _REQ_TAIL.size


def _request(family: int, seq: int, flags: int, *, states: int = _ALL_BUT_LISTEN,
             sport: int = 0, dport: int = 0, src: bytes = b"", dst: bytes = b"",
             cookie: int = _NOCOOKIE) -> bytes:
    """A SOCK_DIAG_BY_FAMILY request for TCP sockets (addresses packed, <= 16 bytes)."""
    return (_REQ_HEAD.pack(_REQ_LEN, SOCK_DIAG_BY_FAMILY, flags, seq, 0, family,
                           socket.IPPROTO_TCP, 0, states)
            + _REQ_ID.pack(sport, dport, src.ljust(16, b"\0"), dst.ljust(16, b"\0"))
            + _REQ_TAIL.pack(0, cookie))


def _exact_request(tup: Tuple4, seq: int) -> bytes:
    """The exact lookup of ``tup`` (any state) as request ``seq``."""
    return _request(socket.AF_INET if tup.family == 4 else socket.AF_INET6, seq, NLM_F_REQUEST,
                    states=0xFFFFFFFF, sport=tup.local.port, dport=tup.remote.port,
                    src=tup.local.ip.packed, dst=tup.remote.ip.packed)


def _messages(sock: socket.socket, seq: int) -> Iterator[memoryview]:
    """Payloads of the replies to request ``seq``, until NLMSG_DONE or one reply."""
    while True:
        data = sock.recv(_RECV_BUF)
        if not data:
            return
        view = memoryview(data)
        off = 0
        while off + _NLMSGHDR.size <= len(data):
            length, mtype, flags, mseq, _pid = _NLMSGHDR.unpack_from(view, off)
            if length < _NLMSGHDR.size:
                return
            payload = view[off + _NLMSGHDR.size : off + length]
            off += (length + 3) & ~3
            if mseq != seq:
                continue
            if mtype == NLMSG_DONE:
                return
            if mtype == NLMSG_ERROR:
                code = -struct.unpack_from("=i", payload)[0]
                if code == 0:
                    return
                raise OSError(code, f"sock_diag: {errno.errorcode.get(code, code)}")
            yield payload
            if not flags & NLM_F_MULTI:  # a single reply is the whole answer
                return


def _decode(payload: memoryview, netns: Netns) -> LiveSocket:
    """One exact-lookup reply (bulk dumps decode to rows, see ``dump_rows``)."""
    (family, state, _timer, _retrans, sport, dport, src, dst, _if, cookie,
     _exp, _rq, _wq, uid, inode) = _DIAG_MSG.unpack_from(payload)
    fam = 4 if family == socket.AF_INET else 6
    tup = Tuple4(
        fam,
        Endpoint(_ip(family, src), int.from_bytes(sport, "big")),
        Endpoint(_ip(family, dst), int.from_bytes(dport, "big")),
    )
    return LiveSocket(tup, state, cookie, inode, netns, uid)


def open_diag_socket(ref: NetnsRef) -> socket.socket:
    """A sock_diag socket living in the namespace ``ref`` names."""
    with entered(ref.path):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             NETLINK_SOCK_DIAG)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECV_BUF)
    # A reply the kernel could not queue is dropped, not retried: wait for it only so
    # long.  SO_RCVTIMEO, not settimeout(), which would add a poll() to every receive.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("=qq", _REPLY_TIMEOUT, 0))
    sock.bind((0, 0))
    return sock


def _dump_rows(sock: socket.socket, family: int, seq: int, rows: list[SockRow]) -> None:
    """Append a row for every non-listening TCP socket of ``family`` that ``sock`` sees."""
    sock.send(_request(family, seq, NLM_F_REQUEST | NLM_F_DUMP))
    unpack_hdr, unpack_row = _NLMSGHDR.unpack_from, _DIAG_ROW.unpack_from
    append, big = rows.append, int.from_bytes
    v4 = family == socket.AF_INET
    while True:
        data = sock.recv(_RECV_BUF)
        if not data:
            return
        off, end = 0, len(data)
        while off + 16 <= end:
            length, mtype, flags, mseq, _pid = unpack_hdr(data, off)
            if length < 16:
                return
            if mseq == seq:
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, off + 16)[0]
                    if code == 0:
                        return
                    raise OSError(code, f"sock_diag: {errno.errorcode.get(code, code)}")
                if length >= _DIAG_MIN:
                    (_fam, state, sport, dport, src, dst, cookie, uid,
                     inode) = unpack_row(data, off + 16)
                    if v4:
                        src, dst = src[:4], dst[:4]
                    append(((src, big(sport, "big"), dst, big(dport, "big")),
                            state, cookie, inode, uid))
                if not flags & NLM_F_MULTI:
                    return
            off += (length + 3) & ~3


def lookup_tuples(tuples: Sequence[Tuple4], refs: Sequence[NetnsRef] | None = None,
                  placed: Mapping[Tuple4, int] | None = None) -> Scan:
    """The sockets with exactly these tuples, in every namespace: a scan of just those.

    For an audit whose entries the kernel judged healthy but for a few: one
    exact sock_diag lookup per tuple and namespace instead of dumping every
    socket of every namespace (``placed`` ones only in their namespace, see
    ``OwnerProbe.found_all``).  Namespaces that cannot be opened are
    ``unreadable``, as in ``scan_all``.
    """
    scan = Scan()
    with OwnerProbe(refs) as probe:
        scan.unreadable.extend(probe.unreadable)
        by_netns: dict[int, list[LiveSocket]] = {}
        for socks in probe.found_all(tuples, placed).values():
            for sock in socks:
                by_netns.setdefault(sock.netns.ino, []).append(sock)
        for netns in probe.namespaces:
            for sock in by_netns.get(netns.ino, ()):
                scan.table.rows.append((tuple_key(sock.tuple), sock.state, sock.cookie, sock.inode,
                                        sock.uid))
            scan.table.close_span(netns)
            scan.namespaces.append(netns)
    return scan


def listen_ports(netns_path: str) -> frozenset[int]:
    """The TCP ports something listens on in one namespace (IPv4 and IPv6).

    Used as evidence for L7-proxy entries: Cilium's proxy listens on the
    entry's sport in the host namespace.  Raises OSError/NamespaceGone when
    the namespace cannot be read, so the caller can tell "none" from "could
    not look".
    """
    ports: set[int] = set()
    sock = open_diag_socket(NetnsRef(Netns(0, "listen"), netns_path))
    try:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            sock.send(_request(family, seq, NLM_F_REQUEST | NLM_F_DUMP,
                               states=1 << TCP_LISTEN))
            for payload in _messages(sock, seq):
                ports.add(int.from_bytes(_DIAG_MSG.unpack_from(payload)[4], "big"))
    finally:
        sock.close()
    return frozenset(ports)


def dump_rows(sock: socket.socket, rows: list[SockRow]) -> None:
    """Append a row for every non-listening TCP socket of the namespace ``sock`` lives in."""
    for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
        _dump_rows(sock, family, seq, rows)


def scan_all(refs: Sequence[NetnsRef] | None = None, *, compact: bool = False) -> Scan:
    """Live sockets of every namespace; a namespace that vanishes is noted and skipped.

    With ``compact`` the sockets are left as rows in ``Scan.table`` and
    ``Scan.sockets`` stays empty (what the audit wants: 100,000 ``LiveSocket``
    values cost far more than the scan).
    """
    scan = Scan()
    with gc_paused():
        for ref in refs if refs is not None else enumerate_netns():
            try:
                sock = open_diag_socket(ref)
            except NamespaceGone:
                scan.vanished.append(ref.path)
                continue
            except PermissionError as exc:
                raise NotRootError(
                    f"cannot enter network namespace {ref.path}: {exc.strerror}"
                ) from exc
            except OSError as exc:
                log.warning("cannot read namespace %s: %s", ref.path, exc)
                scan.unreadable.append(f"{ref.path}: {exc.strerror or exc}")
                continue
            start = len(scan.table.rows)
            with sock:
                try:
                    dump_rows(sock, scan.table.rows)
                except OSError as exc:  # a dump cut short: none of its rows count
                    del scan.table.rows[start:]
                    log.warning("cannot read namespace %s: %s", ref.path, exc)
                    scan.unreadable.append(f"{ref.path}: {exc.strerror or exc}")
                    continue
            scan.table.close_span(ref.netns)
            scan.namespaces.append(ref.netns)
        if not compact:
            scan.sockets = scan.table.sockets()
    return scan


class OwnerProbe:
    """Asks each namespace whether a full socket owns an exact tuple right now.

    Used to re-verify an entry immediately before deleting it: an exact
    sock_diag lookup (not a dump) per namespace, through sockets opened once.
    """

    def __init__(self, refs: Sequence[NetnsRef] | None = None) -> None:
        self._socks: list[tuple[Netns, socket.socket]] = []
        #: Namespaces that exist but could not be opened ("path: reason"): an owner
        #: there cannot be seen, so ``owner() is None`` proves nothing while any is listed.
        self.unreadable: list[str] = []
        for ref in refs if refs is not None else enumerate_netns():
            try:
                self._socks.append((ref.netns, open_diag_socket(ref)))
            except NamespaceGone:
                continue
            except OSError as exc:
                log.warning("re-verification cannot read namespace %s: %s", ref.path, exc)
                self.unreadable.append(f"{ref.path}: {exc.strerror or exc}")
        self._seq = 100
        # One receive buffer for every answer: sock.recv(n) would allocate n bytes
        # per datagram, which cost more than the kernel's lookup itself.
        self._buffer = memoryview(bytearray(_ANSWER_BUF))

    @property
    def complete(self) -> bool:
        """Every enumerated namespace that still exists can be asked."""
        return not self.unreadable

    def owner(self, tup: Tuple4) -> LiveSocket | None:
        """The live full socket with exactly ``tup`` in any namespace, if one exists."""
        return next((s for s in self.found(tup) if s.state in OWNER_STATES), None)

    def found(self, tup: Tuple4) -> list[LiveSocket]:
        """Every socket with exactly ``tup`` (any state) in each namespace: a targeted scan."""
        return self.found_all([tup]).get(normalize(tup), [])

    def found_all(self, tuples: Sequence[Tuple4],
                  placed: Mapping[Tuple4, int] | None = None) -> dict[Tuple4, list[LiveSocket]]:
        """The sockets with exactly each of ``tuples``, keyed by the normalized tuple.

        ``placed`` tuples are looked up only in the namespace (inode) given,
        where the caller knows the one socket it asks about lives; one whose
        namespace is not among those probed is looked up everywhere.

        Each namespace gets its exact lookups in batches: sock_diag_rcv() hands a
        whole datagram to netlink_rcv_skb(), which answers every request in it
        (one reply or one error each), so a batch costs one send instead of a
        send and a receive per tuple.
        """
        everywhere = list(tuples)
        here: dict[int, list[Tuple4]] = {}
        probed = {netns.ino for netns, _sock in self._socks}
        for tup, ino in (placed or {}).items():
            if ino in probed:
                here.setdefault(ino, []).append(tup)
            else:
                everywhere.append(tup)
        found: dict[Tuple4, list[LiveSocket]] = {}
        for start in range(0, len(everywhere), _BATCH):
            # Each namespace has its own socket, so one datagram serves them all.
            batch = everywhere[start:start + _BATCH]
            self._ask(self._socks, batch, found)
        for netns, sock in self._socks:
            for start in range(0, len(here.get(netns.ino, ())), _BATCH):
                self._ask([(netns, sock)], here[netns.ino][start:start + _BATCH], found)
        return found

    def _ask(self, socks: Sequence[tuple[Netns, socket.socket]], batch: Sequence[Tuple4],
             found: dict[Tuple4, list[LiveSocket]]) -> None:
        """Send one batch to each of ``socks`` and add the sockets found to ``found``."""
        first = self._seq + 1
        self._seq += len(batch)
        request = b"".join(_exact_request(tup, first + i) for i, tup in enumerate(batch))
        for netns, sock in socks:
            for live in self._answers(netns, sock, request, first, batch):
                found.setdefault(normalize(live.tuple), []).append(live)

    def _answers(self, netns: Netns, sock: socket.socket, request: bytes, first: int,
                 batch: Sequence[Tuple4]) -> Iterator[LiveSocket]:
        """One namespace's answers to one batch of exact lookups (seq ``first`` on)."""
        sock.send(request)
        answered = [False] * len(batch)
        pending = len(batch)
        data = self._buffer
        while pending:
            try:
                end = sock.recv_into(data)
            except BlockingIOError as exc:  # SO_RCVTIMEO expired
                raise TimeoutError(errno.ETIMEDOUT, "sock_diag: no answer") from exc
            off = 0
            while off + _NLMSGHDR.size <= end:
                length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    break
                payload = data[off + _NLMSGHDR.size : off + length]
                off += (length + 3) & ~3
                index = mseq - first
                if not 0 <= index < len(batch) or answered[index]:
                    continue  # an answer to an earlier request: not ours
                answered[index] = True
                pending -= 1
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code not in (0, errno.ENOENT, errno.EINVAL):
                        raise OSError(code, f"sock_diag: {errno.errorcode.get(code, code)}")
                    continue
                live = _decode(payload, netns)
                # inet_diag_find_one_icsk() falls back to a listener on the local port
                # (inet_lookup), so the reply must be checked.
                if normalize(live.tuple) == normalize(batch[index]):
                    yield live

    @property
    def namespaces(self) -> list[Netns]:
        return [netns for netns, _sock in self._socks]

    def close(self) -> None:
        for _netns, sock in self._socks:
            sock.close()
        self._socks.clear()

    def __enter__(self) -> OwnerProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
