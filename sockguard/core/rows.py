"""Compact forms of connection tuples and sockets, and cheap model values.

Pure, like the audit core.  A node has up to 65,535 map entries and 100,000
sockets; building a frozen dataclass per endpoint, tuple and socket, and
hashing ``Tuple4`` (which hashes its ``IPv4Address`` objects through
``hex()``) on every lookup cost seconds.  So:

- a tuple is indexed as a :data:`TupleKey` — ``(local ip bytes, local port,
  remote ip bytes, remote port)``, 4-byte addresses for IPv4 and 16 for IPv6 —
  which hashes in a few hundred nanoseconds;
- the sockets adapter hands the core :class:`SocketTable` rows, and a
  ``LiveSocket`` is built only for a socket a verdict names;
- an :class:`Interner` shares the address, endpoint and tuple objects of one
  look between the map entries and the sockets (a connection's two sockets
  and its map entries all name the same two endpoints), and formats them;
- :func:`positional_constructor` builds frozen dataclass instances without their generated
  ``__init__`` (which pays ``object.__setattr__`` per field for frozenness).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TypeVar

from sockguard.core.model import (
    RECV_BPF,
    RECV_OTHER,
    RECV_TCP,
    Endpoint,
    IPAddress,
    LiveSocket,
    Netns,
    TargetSocket,
    Tuple4,
)

#: A connection tuple as one socket sees it: local ip, local port, remote ip, remote port.
TupleKey = tuple[bytes, int, bytes, int]
#: A live socket: its tuple as reported (not folded), state, cookie, inode, uid.
SockRow = tuple[TupleKey, int, int, int, int]
#: A map entry as the sockmap iterator reported it: key, socket cookie, netns
#: inode, family (AF_*), state, local address, remote address (4 bytes for
#: AF_INET), local port, remote port, dead (SOCK_DEAD), receive path code.
Record = tuple[bytes, int, int, int, int, bytes, bytes, int, int, bool, int]

#: A record's cookie when its source tells only the socket's tuple and state
#: (the tc lookup on kernels that refuse bpf_skc_to_tcp_sock there).
COOKIE_UNKNOWN = -1

#: A record's family when no source told anything of the entry's socket (a map read
#: with syscalls alone): the entry has no ``TargetSocket``.
FAMILY_UNKNOWN = -1

#: Receive path codes the iterators write (bpf/sock_state.h RECV_*), and their names.
RECV_CODE_UNKNOWN, RECV_CODE_TCP, RECV_CODE_BPF, RECV_CODE_OTHER = 0, 1, 2, 3
RECV_NAMES: dict[int, str] = {RECV_CODE_TCP: RECV_TCP, RECV_CODE_BPF: RECV_BPF,
                              RECV_CODE_OTHER: RECV_OTHER}

_MAPPED = bytes(10) + b"\xff\xff"

T = TypeVar("T")


def unmap_ipv4(k: TupleKey) -> TupleKey:
    """Fold an IPv4-mapped IPv6 tuple (dual-stack socket) onto IPv4, as ``normalize`` does."""
    lip, rip = k[0], k[2]
    if len(lip) == 16 and lip[:12] == _MAPPED and rip[:12] == _MAPPED:
        return (lip[12:], k[1], rip[12:], k[3])
    return k


def tuple_key(tup: Tuple4) -> TupleKey:
    """The compact key of ``tup``, unfolded."""
    return (tup.local.ip.packed, tup.local.port, tup.remote.ip.packed, tup.remote.port)


def positional_constructor(cls: type[T]) -> Callable[..., T]:
    """A positional constructor for the frozen dataclass ``cls`` that skips ``__init__``.

    It takes every field in order (defaults are not applied) and fills the
    instance's ``__dict__``: the value is equal to, hashes like and behaves
    like ``cls(*args)``.  Refused for classes where that would not hold.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if (params is None or not params.frozen or "__slots__" in cls.__dict__
            or hasattr(cls, "__post_init__")):
        raise TypeError(f"{cls.__name__}: not a plain frozen dataclass")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if not all(f.init for f in fields):
        raise TypeError(f"{cls.__name__}: has non-init fields")
    names = tuple(f.name for f in fields)
    new = object.__new__

    def make(*args: Any) -> T:
        obj = new(cls)
        obj.__dict__.update(zip(names, args, strict=True))
        return obj

    return make


new_endpoint = positional_constructor(Endpoint)
new_tuple4 = positional_constructor(Tuple4)
new_live_socket = positional_constructor(LiveSocket)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Suspend the cyclic garbage collector for a burst of acyclic allocations.

    A look allocates millions of small objects and frees none; each
    generation-0 collection would then traverse them again and again.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Interner:
    """Address, endpoint and tuple objects (and their text) shared within one look."""

    def __init__(self) -> None:
        self._ips: dict[bytes, IPAddress] = {}
        self._ip_text: dict[bytes, str] = {}
        self._eps: dict[tuple[bytes, int], Endpoint] = {}
        self._tuples: dict[TupleKey, Tuple4] = {}
        self._keys: dict[int, TupleKey] = {}  # id(Tuple4 made here) -> its key

    def ip(self, raw: bytes) -> IPAddress:
        ip = self._ips.get(raw)
        if ip is None:
            ip = self._ips[raw] = IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw)
        return ip

    def endpoint(self, raw: bytes, port: int) -> Endpoint:
        k = (raw, port)
        ep = self._eps.get(k)
        if ep is None:
            ep = self._eps[k] = new_endpoint(self.ip(raw), port)
        return ep

    def tuple4(self, k: TupleKey) -> Tuple4:
        """The ``Tuple4`` of ``k`` (family from the address length)."""
        t = self._tuples.get(k)
        if t is None:
            t = new_tuple4(4 if len(k[0]) == 4 else 6,
                           self.endpoint(k[0], k[1]), self.endpoint(k[2], k[3]))
            self._tuples[k] = t
            self._keys[id(t)] = k
        return t

    def key_of(self, tup: Tuple4) -> TupleKey:
        """The compact key of ``tup``, unfolded (cheap for tuples made here)."""
        k = self._keys.get(id(tup))  # ids stay unique: the tuples made here are kept alive
        return tuple_key(tup) if k is None else k

    def endpoint_text(self, raw: bytes, port: int) -> str:
        """``str(Endpoint)`` of an address and port."""
        text = self._ip_text.get(raw)
        if text is None:
            if len(raw) == 16 and raw[:12] == _MAPPED:  # as Endpoint.__str__: IPv4-mapped
                raw4 = raw[12:]
                text = self._ip_text[raw] = str(self.ip(raw4))
            else:
                ip = str(self.ip(raw))
                text = self._ip_text[raw] = ip if len(raw) == 4 else f"[{ip}]"
        return f"{text}:{port}"

    def tuple_text(self, k: TupleKey) -> str:
        """``str(Tuple4)`` of ``k``."""
        return f"{self.endpoint_text(k[0], k[1])} -> {self.endpoint_text(k[2], k[3])}"


@dataclass
class SocketTable:
    """Live sockets as plain rows, grouped by namespace.

    ``spans`` lists each namespace with the end (exclusive) of its rows, in
    row order: rows ``spans[i-1][0]:spans[i][0]`` live in ``spans[i][1]``.
    ``recv`` maps a socket cookie to its receive path code (``RECV_CODE_*``),
    for the sockets whose path the source knows (iter/tcp; sock_diag knows none).
    """

    rows: list[SockRow] = field(default_factory=list)
    spans: list[tuple[int, Netns]] = field(default_factory=list)
    recv: dict[int, int] = field(default_factory=dict)

    def recv_path(self, cookie: int) -> str | None:
        """The receive path name of the socket with this cookie, if known."""
        return RECV_NAMES.get(self.recv.get(cookie, RECV_CODE_UNKNOWN))

    def close_span(self, netns: Netns) -> None:
        """Mark the rows added since the last span as ``netns``'s."""
        self.spans.append((len(self.rows), netns))

    def netns_of(self, row: int) -> Netns:
        for end, netns in self.spans:
            if row < end:
                return netns
        raise IndexError(row)

    def live(self, row: int, interner: Interner) -> LiveSocket:
        k, state, cookie, inode, uid = self.rows[row]
        return new_live_socket(interner.tuple4(k), state, cookie, inode, self.netns_of(row), uid,
                               self.recv_path(cookie))

    def sockets(self, interner: Interner | None = None) -> list[LiveSocket]:
        """Every row as a ``LiveSocket``."""
        interner = interner or Interner()
        out: list[LiveSocket] = []
        start = 0
        for end, netns in self.spans:
            for k, state, cookie, inode, uid in self.rows[start:end]:
                out.append(new_live_socket(interner.tuple4(k), state, cookie, inode, netns, uid,
                                           self.recv_path(cookie)))
            start = end
        return out


new_target_socket = positional_constructor(TargetSocket)


def entry_cookie(rec: Record) -> int | None:
    """The cookie of the socket a record's entry points to; None when the source cannot tell."""
    cookie = rec[1]
    return None if cookie == COOKIE_UNKNOWN else cookie


def syscall_record(key: bytes, cookie: int | None) -> Record:
    """The record of an entry read with syscalls alone: its key and what its value says.

    ``cookie``: the socket cookie an 8-byte value holds, None for a 4-byte
    value (the kernel refuses that lookup).  Nothing else is known of the
    socket, so the audit judges it as it would a ``MapEntry`` without a target.
    """
    return (key, COOKIE_UNKNOWN if cookie is None else cookie, 0, FAMILY_UNKNOWN, 0, b"", b"",
            0, 0, False, RECV_CODE_UNKNOWN)


def entry_target(rec: Record, interner: Interner) -> TargetSocket | None:
    """The entry's socket as its record describes it; None where no source told of it."""
    return None if rec[3] == FAMILY_UNKNOWN else target_socket(rec, interner)


def target_socket(rec: Record, interner: Interner) -> TargetSocket:
    """The :class:`TargetSocket` a record describes (cookie 0 where unknown)."""
    _key, cookie, netns, family, state, saddr, daddr, sport, dport, dead, recv = rec
    cookie = max(cookie, 0)
    path = RECV_NAMES.get(recv)
    if family == socket.AF_INET:
        return new_target_socket(cookie, 4, state, netns,
                                 interner.tuple4((saddr, sport, daddr, dport)), dead, path)
    if family == socket.AF_INET6:
        # v4-mapped peers of dual-stack sockets stay IPv6 (::ffff:a.b.c.d), as
        # sock_diag reports them.
        return new_target_socket(cookie, 6, state, netns,
                                 interner.tuple4((saddr, sport, daddr, dport)), dead, path)
    return new_target_socket(cookie, 0, state, netns, None, dead, path)
