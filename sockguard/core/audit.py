"""The audit core: map entries and live sockets in, findings out.

Pure: no syscalls, no clock.  Adapters hand in decoded entries and the live
sockets of every namespace; this module decides what each entry is.  The rules
(see README "What the findings mean"):

- an entry whose full tuple a live socket owns is a connection's entry,
  whatever its sip (the host reaches pods from cilium_host's address, which is
  also the one L7-proxy entries carry), and is judged by the rules below;
- ``proxy``: an entry no live socket owns whose sport is a port the host
  namespace listens on (Cilium's L7 proxy; its sip is the host gateway IP).
  It describes a client socket only by its local side, so it is judged by
  that side alone, and never deleted.
- ``ok``: a live socket owns the tuple the key describes and, when we know
  which socket the entry points to, it is that socket.
- ``shadowing``: a live socket owns the tuple but the entry points to another
  socket.  The owner's peer redirects into the wrong socket: that connection
  hangs.  The owner is reported as the endangered connection.
- ``stale``: no live socket owns the tuple; or the entry points to the very
  socket that owns it, but that socket's process has closed it (SOCK_DEAD):
  the entry outlived ``close()``, which is the incident's leak caught before the
  tuple is reused.
- ``recvpath``: a live socket owns the tuple but reads with plain
  ``tcp_recvmsg`` (a socket in a sockhash reads with ``tcp_bpf_recvmsg``), and
  the entry cannot be shown to point elsewhere: the payload its peer
  redirects by this key never reaches it.  Where the entry's socket is known
  and is another one, the verdict is ``shadowing`` and the receive path is a
  detail that confirms it.

What the iterators add to an entry (``details``): ``entry_socket_state`` when
the entry's socket is not in a connected state, ``entry_socket_dead``,
``key_mismatch`` when the key does not describe the entry's own socket, and
the receive paths (``recv_path``, ``owner_recv_path``, ``entry_recv_path``).

An owner is a full TCP socket in a synchronized or closing state.  A tuple
seen only in the handshake (SYN_SENT/SYN_RECV) is neither owned nor stale:
the entry is left alone and looked at again next time.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address
from typing import cast

from sockguard.core.layout import KeyDecodeError, KeyLayout, decode, decode_fields
from sockguard.core.model import (
    RECV_TCP,
    Endpoint,
    Finding,
    IPAddress,
    Kind,
    LiveSocket,
    MapEntry,
    MapInfo,
    Netns,
    TargetSocket,
    Tuple4,
)

#: Findings that mean an entry endangers a connection (confirmed by a second
#: look, exit status 1).  Which they are, and which are deleted: policy.POLICY.
from sockguard.core.policy import BAD_KINDS as BAD_KINDS
from sockguard.core.rows import (
    RECV_CODE_TCP,
    RECV_CODE_UNKNOWN,
    RECV_NAMES,
    Interner,
    Record,
    SocketTable,
    TupleKey,
    entry_cookie,
    entry_target,
    gc_paused,
    positional_constructor,
    tuple_key,
    unmap_ipv4,
)
from sockguard.core.tcp_states import (
    HANDSHAKE_STATES,
    OWNER_STATES,
    TCP_STATE_NAMES,
    TCP_TIME_WAIT,
)

_RECV_CODES = {name: code for code, name in RECV_NAMES.items()}

_new_finding = positional_constructor(Finding)
_new_entry = positional_constructor(MapEntry)


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalize(tup: Tuple4) -> Tuple4:
    """Fold IPv4-mapped IPv6 tuples (dual-stack sockets) onto IPv4."""
    local, remote = _unmapped(tup.local.ip), _unmapped(tup.remote.ip)
    if isinstance(local, IPv4Address) and isinstance(remote, IPv4Address) and tup.family == 6:
        return Tuple4(4, Endpoint(local, tup.local.port), Endpoint(remote, tup.remote.port))
    return tup


class SocketIndex:
    """Live sockets of all namespaces, indexed the ways the rules look them up.

    The sockets are held as compact rows (:class:`~sockguard.core.rows.SocketTable`)
    keyed by their folded tuple (:func:`~sockguard.core.rows.unmap_ipv4`); a
    ``LiveSocket`` is built only for a socket a verdict names.  ``build``
    takes ``LiveSocket`` values, ``from_table`` the rows a scan produced.
    """

    def __init__(self, table: SocketTable | None = None,
                 interner: Interner | None = None, complete: bool = True) -> None:
        self.table = table if table is not None else SocketTable()
        self.interner = interner if interner is not None else Interner()
        #: Every namespace was read.  When not, the absence of an owner is no
        #: evidence: only an entry's own socket can prove it stale.
        self.complete = complete
        self.count = 0
        self._live: dict[int, LiveSocket] = {}
        self._owner: dict[TupleKey, int] = {}  # first owner row of each tuple
        self._more: dict[TupleKey, list[int]] = {}  # further owners (the same tuple in other netns)
        self._handshake: set[TupleKey] = set()
        self._timewait: dict[TupleKey, int] = {}  # first TIME_WAIT row
        self._by_cookie: dict[int, int] | None = None
        self._by_local: dict[tuple[bytes, int], list[int]] | None = None
        self._index(0)

    @classmethod
    def build(cls, sockets: Iterable[LiveSocket]) -> SocketIndex:
        index = cls()
        for sock in sockets:
            index.add(sock)
        return index

    @classmethod
    def from_table(cls, table: SocketTable, interner: Interner | None = None,
                   complete: bool = True) -> SocketIndex:
        """Index a scan's rows (the table is kept, not copied)."""
        with gc_paused():
            return cls(table, interner, complete)

    def add(self, sock: LiveSocket) -> None:
        row = len(self.table.rows)
        self.table.rows.append((tuple_key(sock.tuple), sock.state, sock.cookie, sock.inode,
                                sock.uid))
        spans = self.table.spans
        if spans and spans[-1][1] == sock.netns:
            spans[-1] = (row + 1, sock.netns)
        else:
            spans.append((row + 1, sock.netns))
        if sock.recv_path is not None:
            self.table.recv[sock.cookie] = _RECV_CODES[sock.recv_path]
        self._live[row] = sock
        self._index(row)

    def _index(self, start: int) -> None:
        rows = self.table.rows
        owner, more, handshake, timewait = self._owner, self._more, self._handshake, self._timewait
        owner_states, handshake_states = OWNER_STATES, HANDSHAKE_STATES
        for i in range(start, len(rows)):
            row = rows[i]
            k = row[0]
            if len(k[0]) == 16:
                k = unmap_ipv4(k)
            state = row[1]
            if state in owner_states:
                if owner.setdefault(k, i) != i:
                    more.setdefault(k, []).append(i)
            elif state in handshake_states:
                handshake.add(k)
            elif state == TCP_TIME_WAIT:
                timewait.setdefault(k, i)
        self.count += len(rows) - start
        self._by_cookie = self._by_local = None

    # -- lookups by compact key --------------------------------------------------

    def sock(self, row: int) -> LiveSocket:
        """The ``LiveSocket`` of a row (built once)."""
        sock = self._live.get(row)
        if sock is None:
            sock = self._live[row] = self.table.live(row, self.interner)
        return sock

    def owner_rows(self, k: TupleKey) -> list[int]:
        """Rows of the full sockets owning the folded tuple ``k``, first seen first."""
        first = self._owner.get(k)
        if first is None:
            return []
        return [first, *self._more.get(k, ())]

    def describe(self, row: int) -> str:
        """``_describe(self.sock(row))`` without building the socket."""
        k, state = self.table.rows[row][:2]
        return (f"{self.interner.tuple_text(k)} in netns {self.table.netns_of(row)} "
                f"({TCP_STATE_NAMES.get(state, state)})")

    def row_by_cookie(self, cookie: int) -> int | None:
        if self._by_cookie is None:
            self._by_cookie = {r[2]: i for i, r in enumerate(self.table.rows) if r[2]}
        return self._by_cookie.get(cookie)

    def rows_by_local(self, ip: bytes, port: int) -> list[int]:
        """Owner rows whose folded local side is ``ip:port``."""
        if self._by_local is None:
            by_local: dict[tuple[bytes, int], list[int]] = defaultdict(list)
            for k, rows in self._owner_groups():
                by_local[(k[0], k[1])].extend(rows)
            for rows in by_local.values():
                rows.sort()
            self._by_local = dict(by_local)
        return self._by_local.get((ip, port), [])

    def _owner_groups(self) -> Iterator[tuple[TupleKey, list[int]]]:
        for k in self._owner:
            yield k, self.owner_rows(k)

    # -- the same, as LiveSocket dictionaries (builds every socket: slow) -----------

    def _tuple_of(self, k: TupleKey) -> Tuple4:
        return normalize(self.interner.tuple4(k))

    @property
    def owners(self) -> dict[Tuple4, list[LiveSocket]]:
        return {self._tuple_of(k): [self.sock(r) for r in rows]
                for k, rows in self._owner_groups()}

    @property
    def handshake(self) -> dict[Tuple4, list[LiveSocket]]:
        return self._by_state(HANDSHAKE_STATES)

    @property
    def timewait(self) -> dict[Tuple4, list[LiveSocket]]:
        return self._by_state(frozenset({TCP_TIME_WAIT}))

    def _by_state(self, states: frozenset[int]) -> dict[Tuple4, list[LiveSocket]]:
        out: dict[Tuple4, list[LiveSocket]] = defaultdict(list)
        for i, row in enumerate(self.table.rows):
            if row[1] in states:
                out[self._tuple_of(unmap_ipv4(row[0]))].append(self.sock(i))
        return dict(out)

    @property
    def by_local(self) -> dict[Endpoint, list[LiveSocket]]:
        out: dict[Endpoint, list[LiveSocket]] = defaultdict(list)
        for k, rows in self._owner_groups():
            out[self.interner.endpoint(k[0], k[1])].extend(self.sock(r) for r in rows)
        return dict(out)

    @property
    def by_cookie(self) -> dict[int, LiveSocket]:
        return {r[2]: self.sock(i) for i, r in enumerate(self.table.rows) if r[2]}


@dataclass(frozen=True)
class AuditPolicy:
    """What we know of the node beyond its sockets and maps.

    ``proxy_ips``: the host gateway addresses (cilium_host) that L7-proxy
    entries carry as their sip.  ``host_listen_ports``: ports something
    listens on in the host namespace, where Cilium's proxy listens on the
    entry's sport; None when they could not be read.
    """

    proxy_ips: frozenset[IPAddress] = frozenset()
    host_listen_ports: frozenset[int] | None = frozenset()


def _describe(sock: LiveSocket) -> str:
    return f"{sock.tuple} in netns {sock.netns} ({TCP_STATE_NAMES.get(sock.state, sock.state)})"


_Classified = tuple[Kind | None, str, LiveSocket | None, dict[str, object]]


def _target_details(entry: MapEntry, index: SocketIndex, k: TupleKey) -> dict[str, object]:
    """What the sockmap iterator says about the entry's own socket, where it is not normal.

    ``k`` is the folded compact key of the tuple the key describes.
    """
    t = entry.target
    if t is None:
        return {}
    details: dict[str, object] = {}
    if t.state and t.state not in OWNER_STATES:
        details["entry_socket_state"] = TCP_STATE_NAMES.get(t.state, str(t.state))
    if t.dead:
        details["entry_socket_dead"] = True
    # tcp_set_state(TCP_CLOSE) releases the local port (__inet_put_port zeroes
    # inet_num), so only a socket still in a connected state has a tuple to compare.
    if t.tuple is not None and t.state in OWNER_STATES:
        tk = index.interner.key_of(t.tuple)
        if len(tk[0]) == 16:
            tk = unmap_ipv4(tk)
        if tk != k:
            details["key_mismatch"] = True
            details["entry_socket"] = str(t.tuple)
    if t.recv_path is not None:
        details["entry_recv_path"] = t.recv_path
    return details


def _judge_proxy(entry: MapEntry, index: SocketIndex) -> _Classified:
    client = entry.key.owner.local
    target = entry.target
    rows = index.rows_by_local(client.ip.packed, client.port)
    if entry.cookie is not None:
        sock_rows = index.table.rows  # SockRow: (tuple, state, cookie, inode, uid)
        rows = [r for r in rows if sock_rows[r][2] == entry.cookie]
    if rows and not (target is not None and target.dead):
        return Kind.PROXY, f"L7 proxy redirect for client {client}", index.sock(rows[0]), {}
    details: dict[str, object] = {"proxy": True}
    if target is not None:
        if target.state and target.state not in OWNER_STATES:
            details["entry_socket_state"] = TCP_STATE_NAMES.get(target.state, str(target.state))
        if target.dead:
            details["entry_socket_dead"] = True
    return (Kind.STALE, f"L7 proxy redirect entry whose client socket {client} is gone",
            None, details)


def _owner_path(index: SocketIndex, entry: MapEntry, cookie: int) -> str | None:
    """The receive path of the owner whose cookie the entry holds.

    The sockmap iterator read it together with the entry; the socket source
    (iter/tcp) a moment later.
    """
    t = entry.target
    if t is not None and t.recv_path is not None:
        return t.recv_path
    return index.table.recv_path(cookie)


def _maybe_proxy(entry: MapEntry, policy: AuditPolicy) -> bool:
    """Whether an entry whose tuple no live socket owns may be an L7-proxy redirect.

    The gateway address alone is no evidence: the host reaches pods from it
    (kubelet's probes), and such connections' entries are judged like any
    other.  The evidence is the proxy itself listening on the entry's sport in
    the host namespace.  Where the listeners could not be read, an entry from
    a gateway address is given the benefit of the doubt (never deleted).
    """
    ports = policy.host_listen_ports
    if ports is None:
        return _unmapped(entry.key.sip) in policy.proxy_ips
    return entry.key.sport in ports


def _classify(entry: MapEntry, index: SocketIndex, policy: AuditPolicy) -> _Classified:
    key = entry.key
    k = index.interner.key_of(key.owner)
    if len(k[0]) == 16:
        k = unmap_ipv4(k)
    first = index._owner.get(k)
    if first is None and _maybe_proxy(entry, policy):
        return _judge_proxy(entry, index)
    if first is None:
        tup = normalize(key.owner)
        if k in index._handshake:
            return None, f"{tup} is in its handshake", None, {}
        t = entry.target
        if t is not None and _is_own_owner(t, index, k):
            return _owned_by_entry_socket(entry, t, index)
        if t is None and not index.complete:
            return (None, f"no live socket owns {tup} in the namespaces that could be read, "
                          "but not every namespace could be read and the entry's socket is "
                          "unknown", None, {UNVERIFIED: True})
        details: dict[str, object] = {}
        # Named by its sides: the key prints as sip -> dip (the peer's view), the
        # owner it describes has them the other way round.
        reason = (f"no live socket in any namespace has local {tup.local}, "
                  f"remote {tup.remote}")
        tw_row = index._timewait.get(k)
        if tw_row is not None:
            tw = index.sock(tw_row)
            details["closed_in_netns"] = str(tw.netns)
            reason += f"; the connection closed (TIME_WAIT in netns {tw.netns})"
        details.update(_target_details(entry, index, k))
        if details.get("entry_socket_state") == "CLOSE":
            # A reset socket keeps its entry until its fd is closed (sock_map_close);
            # it is out of the established hash, so sock_diag no longer lists it.
            reason += "; the entry's socket was reset but its process still holds it open"
        if details.get("entry_socket_dead"):
            reason += "; the entry's socket was closed by its process but the entry outlived it"
        if details.get("key_mismatch"):
            reason += f"; the key does not describe the entry's socket {details['entry_socket']}"
        return Kind.STALE, reason, None, details
    rows = index.table.rows
    cookie = entry.cookie
    if not cookie and entry.target is not None:
        # No cookie, or one never generated (0: no scanned socket, maybe the
        # owner in a namespace no scan reached): judge the entry's socket by tuple.
        return _judge_by_tuple(entry, index, k, first)
    if cookie is None:
        path = index.table.recv_path(rows[first][2])
        if path == RECV_TCP:
            return (Kind.RECVPATH,
                    f"owned by {index.describe(first)}, which reads with tcp_recvmsg: the "
                    "payload its peer redirects by this key never reaches it",
                    index.sock(first), {"verified_by_cookie": False, "owner_recv_path": path})
        details = {"verified_by_cookie": False}
        if path is not None:
            details["recv_path"] = path
        return Kind.OK, f"owned by {index.describe(first)}", index.sock(first), details
    more = index._more.get(k)
    for r in (first,) if more is None else (first, *more):
        if rows[r][2] == cookie:
            if entry.target is not None and entry.target.dead:
                return (Kind.STALE,
                        f"entry points to {index.describe(r)}, which its process has closed: "
                        "the entry outlived close() (sock_map_close did not remove it)",
                        None, {"entry_socket_dead": True, "owner_cookie": cookie})
            return _owner_verdict(index.describe(r), index.sock(r),
                                  _owner_path(index, entry, cookie), {"verified_by_cookie": True})
    victim = index.sock(first)
    details = {"entry_cookie": cookie, "owner_cookie": victim.cookie}
    target_row = index.row_by_cookie(cookie)
    if target_row is not None:
        target = index.sock(target_row)
        details["entry_socket"] = f"{target.tuple} in netns {target.netns}"
    details.update({n: v for n, v in _target_details(entry, index, k).items()
                    if n != "entry_socket" or "entry_socket" not in details})
    reason = (f"entry points to socket {cookie}, not to the live owner {_describe(victim)}: "
              "its peer's payload goes to the wrong socket")
    owner_path = index.table.recv_path(victim.cookie)
    if owner_path is not None:
        details["owner_recv_path"] = owner_path
        if owner_path == RECV_TCP:
            reason += "; the owner reads with tcp_recvmsg, so it never sees that payload"
    return Kind.SHADOWING, reason, victim, details


def _owner_verdict(owner: str, sock: LiveSocket, path: str | None,
                   details: dict[str, object]) -> _Classified:
    """The entry points to its live owner: ``ok``, or ``recvpath`` when that owner reads
    with plain ``tcp_recvmsg`` (the payload redirected to it is never read)."""
    if path == RECV_TCP:
        details["owner_recv_path"] = path
        return (Kind.RECVPATH, f"entry points to its owner {owner}, which reads with "
                               "tcp_recvmsg: payload redirected to it is never read",
                sock, details)
    if path is not None:
        details["recv_path"] = path
    return Kind.OK, f"owned by {owner}", sock, details


#: ``details`` marker of a no-verdict entry that only a complete scan could judge.
UNVERIFIED = "unverified"


def _is_own_owner(t: TargetSocket, index: SocketIndex, k: TupleKey) -> bool:
    """The entry's own socket is alive, connected and has the key's tuple: it owns the key.

    Positive evidence from the map side, needing no namespace scan: where no
    scan lists that socket (its namespace unreachable or unreadable, or it
    connected after the scan) the entry is still its own connection's.
    """
    if t.dead or t.tuple is None or t.state not in OWNER_STATES:
        return False
    tk = index.interner.key_of(t.tuple)
    if len(tk[0]) == 16:
        tk = unmap_ipv4(tk)
    return tk == k


def _owned_by_entry_socket(entry: MapEntry, t: TargetSocket, index: SocketIndex) -> _Classified:
    assert t.tuple is not None
    netns = Netns(t.netns_ino, f"unscanned:{t.netns_ino}" if t.netns_ino else "unknown")
    sock = LiveSocket(t.tuple, t.state, t.cookie, 0, netns, 0, t.recv_path)
    where = f"netns {t.netns_ino}" if t.netns_ino else "a namespace"
    return _owner_verdict(f"{normalize(t.tuple)} in {where} (the entry's own socket; no "
                          "socket scan listed it)", sock, t.recv_path,
                          {"owner_from_entry_socket": True, "verified_by_cookie": False,
                           "verified_by_tuple": True})


def _entry_socket_text(t: TargetSocket) -> str:
    state = TCP_STATE_NAMES.get(t.state, str(t.state))
    if t.tuple is not None and t.state in OWNER_STATES:
        return f"{normalize(t.tuple)} ({state})"
    return f"a socket in state {state}"


def _judge_by_tuple(entry: MapEntry, index: SocketIndex, k: TupleKey, first: int) -> _Classified:
    """The verdict on an owned tuple when the entry's socket is known by tuple and state only.

    A source that cannot name the entry's socket by cookie (the tc lookup on
    kernels that refuse ``bpf_skc_to_tcp_sock`` there) still tells whether
    that socket is connected and has the owner's tuple: if not, the entry
    points to another socket and the owner's peer redirects into it.  Where
    several namespaces hold the same tuple, a matching tuple is taken as the
    owner's (it cannot be shadowing *by tuple*).
    """
    t = entry.target
    assert t is not None
    tk: TupleKey | None = None
    if t.tuple is not None and t.state in OWNER_STATES:
        tk = index.interner.key_of(t.tuple)
        if len(tk[0]) == 16:
            tk = unmap_ipv4(tk)
    rows = index.table.rows
    if tk == k:
        if t.dead:
            return (Kind.STALE,
                    f"entry points to {index.describe(first)}, which its process has closed: "
                    "the entry outlived close() (sock_map_close did not remove it)",
                    None, {"entry_socket_dead": True, "verified_by_tuple": True})
        return _owner_verdict(index.describe(first), index.sock(first),
                              t.recv_path or index.table.recv_path(rows[first][2]),
                              {"verified_by_cookie": False, "verified_by_tuple": True})
    victim = index.sock(first)
    details: dict[str, object] = {"verified_by_cookie": False, "verified_by_tuple": True}
    details.update(_target_details(entry, index, k))
    details.setdefault("entry_socket", _entry_socket_text(t))
    reason = (f"entry points to {_entry_socket_text(t)}, not to the live owner "
              f"{_describe(victim)}: its peer's payload goes to the wrong socket")
    owner_path = index.table.recv_path(victim.cookie)
    if owner_path is not None:
        details["owner_recv_path"] = owner_path
        if owner_path == RECV_TCP:
            reason += "; the owner reads with tcp_recvmsg, so it never sees that payload"
    return Kind.SHADOWING, reason, victim, details


#: An ``ok`` entry whose finding is not built yet: its key, iterator record, owner row.
_UnbuiltOk = tuple[bytes, Record, int]


class AuditResult:
    """One look at one map.

    ``findings`` holds one finding per classified entry, in map order.  The
    ``ok`` findings of the fast path (:func:`audit_records`) are kept compact
    and built the first time ``findings`` is read; ``count``, ``bad`` and the
    confirmation steps do not need them.
    """

    def __init__(self, map: MapInfo, entries: int, findings: Iterable[Finding],
                 pending: int = 0, undecodable: Iterable[str] = (),
                 *, lazy: tuple[Callable[[_UnbuiltOk], Finding], int] | None = None,
                 unverified: int = 0, healthy: int = 0) -> None:
        self.map = map
        self.entries = entries
        self._parts: list[Finding | _UnbuiltOk] = list(findings)
        self.pending = pending  # entries whose tuple is mid-handshake
        #: entries no owner was found for, which only a complete scan could call
        #: stale (the namespaces could not all be read, the entry's socket is unknown)
        self.unverified = unverified
        #: ``ok`` entries judged in the kernel: counted, never built as findings
        self.healthy = healthy
        self.undecodable = list(undecodable)
        self._make: Callable[[_UnbuiltOk], Finding] | None = None
        self._lazy = 0
        if lazy is not None:
            self._make, self._lazy = lazy

    @property
    def findings(self) -> list[Finding]:
        if self._lazy:
            make = self._make
            assert make is not None
            self._parts = [p if isinstance(p, Finding) else make(p) for p in self._parts]
            self._lazy = 0
        return cast("list[Finding]", self._parts)  # no lazy part is left

    @findings.setter
    def findings(self, value: list[Finding]) -> None:
        self._parts = cast("list[Finding | _UnbuiltOk]", value)
        self._lazy = 0

    def _built(self) -> Iterator[Finding]:
        return (p for p in self._parts if isinstance(p, Finding))

    def count(self, kind: Kind) -> int:
        lazy = self._lazy + self.healthy if kind is Kind.OK else 0
        return lazy + sum(1 for f in self._built() if f.kind is kind)

    @property
    def bad(self) -> list[Finding]:
        return [f for f in self._built() if f.kind in BAD_KINDS]

    @property
    def proven_healthy(self) -> bool:
        """Every entry was judged, and a live socket owns its tuple (``ok`` or ``proxy``).

        Nothing undecodable, mid-handshake or unverified: what was not looked
        at is not proven (the collision check listens while anything is not).
        """
        if self.undecodable or self.pending or self.unverified:
            return False
        return self.count(Kind.OK) + self.count(Kind.PROXY) == self.entries

    def reported(self, include_ok: bool = False) -> list[Finding]:
        """The findings a report lists: every one, or all but ``ok`` (without building those)."""
        if include_ok:
            return self.findings
        return [f for f in self._built() if f.kind is not Kind.OK]

    def confirm_bad(self, second: Sequence[Finding]) -> None:
        """``findings = confirm(findings, second)``, leaving compact ``ok`` findings be."""
        again = _by_key(second)
        parts: list[Finding | _UnbuiltOk] = []
        for p in self._parts:
            if isinstance(p, Finding) and p.kind in BAD_KINDS:
                if _seen_again(p, again):
                    parts.append(replace(p, confirmed=True))
            else:
                parts.append(p)
        self._parts = parts

    def substitute(self, new: dict[int, Finding]) -> None:
        """Replace built findings by ``new[id(finding)]`` where given."""
        self._parts = [new.get(id(p), p) if isinstance(p, Finding) else p for p in self._parts]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AuditResult):
            return NotImplemented
        return (self.map, self.entries, self.findings, self.pending, self.undecodable) == (
            other.map, other.entries, other.findings, other.pending, other.undecodable)

    def __repr__(self) -> str:
        return (f"AuditResult(map={self.map!r}, entries={self.entries}, "
                f"findings=<{len(self._parts)}>, pending={self.pending}, "
                f"undecodable={self.undecodable!r})")


class NoVerdict(enum.Enum):
    """Why ``finding_of`` has no finding for an entry yet."""

    PENDING = "pending"  # its tuple is mid-handshake
    UNVERIFIED = "unverified"  # no owner seen, and only a complete scan could call it stale


def finding_of(info: MapInfo, entry: MapEntry, index: SocketIndex,
               policy: AuditPolicy) -> Finding | NoVerdict:
    """The finding for one entry, or why there is none yet."""
    kind, reason, sock, details = _classify(entry, index, policy)
    if kind is None:
        return NoVerdict.UNVERIFIED if details.get(UNVERIFIED) else NoVerdict.PENDING
    return _new_finding(kind, info, entry, reason, sock, None, False, details)


def audit_records(
    info: MapInfo,
    layout: KeyLayout,
    records: Iterable[Record],
    index: SocketIndex,
    policy: AuditPolicy,
    healthy: int = 0,
) -> AuditResult:
    """Classify every entry of one map against the live sockets, building little for ``ok``.

    ``records`` come from the entry sources (sockmap iterator, tc lookup), or
    for a map read with syscalls alone from ``rows.syscall_record`` (no
    entry socket: its target is None).  ``healthy``: entries the kernel judged
    healthy and did not report (bpf/entry_record.h); they count as ``ok`` but
    have no finding.

    Each record is decoded into a ``MapEntry`` (key with ``decode``, target
    with ``entry_target``) and judged by ``_classify``.  The common case — one
    live owner, the entry points to it by cookie, and that socket is neither
    dead nor on the plain receive path — is recognised on compact keys first
    (the ``ok`` of ``_owner_verdict``, without building anything), and its
    finding is built only when read.
    """
    interner = index.interner
    parts: list[Finding | _UnbuiltOk] = []
    undecodable: list[str] = []
    pending = lazy = total = unverified = 0
    owner, more, rows, recv = index._owner, index._more, index.table.rows, index.table.recv
    dst_local = layout.owner_local == "dst"
    append = parts.append
    with gc_paused():
        for rec in records:
            raw = rec[0]
            try:
                _family, sip, sport, dip, dport = decode_fields(layout, raw)
            except KeyDecodeError as exc:
                undecodable.append(f"{raw.hex()}: {exc}")
                continue
            total += 1
            k = (dip, dport, sip, sport) if dst_local else (sip, sport, dip, dport)
            if len(sip) == 16:
                k = unmap_ipv4(k)
            first = owner.get(k)
            if (first is not None and rows[first][2] == rec[1] and k not in more
                    and not rec[9] and rec[10] != RECV_CODE_TCP
                    and (rec[10] != RECV_CODE_UNKNOWN or recv.get(rec[1]) != RECV_CODE_TCP)):
                append((raw, rec, first))
                lazy += 1
                continue
            entry = _new_entry(raw.hex(), decode(layout, raw, interner), entry_cookie(rec),
                               entry_target(rec, interner))
            found = finding_of(info, entry, index, policy)
            if isinstance(found, Finding):
                append(found)
            elif found is NoVerdict.UNVERIFIED:
                unverified += 1
            else:
                pending += 1

    def make(part: _UnbuiltOk) -> Finding:
        raw, rec, row = part
        entry = _new_entry(raw.hex(), decode(layout, raw, interner), entry_cookie(rec),
                           entry_target(rec, interner))
        details: dict[str, object] = {"verified_by_cookie": True}
        path = RECV_NAMES.get(rec[10]) or index.table.recv_path(rec[1])
        if path is not None:
            details["recv_path"] = path
        return _new_finding(Kind.OK, info, entry, f"owned by {index.describe(row)}",
                            index.sock(row), None, False, details)

    # entries: every key, as `sockguard maps` counts them, undecodable ones included
    result = AuditResult(info, total + healthy + len(undecodable), [], pending, undecodable,
                         lazy=(make, lazy),
                         unverified=unverified, healthy=healthy)
    result._parts = parts
    return result


def _by_key(findings: Sequence[Finding]) -> dict[tuple[str, Kind], list[Finding]]:
    out: dict[tuple[str, Kind], list[Finding]] = defaultdict(list)
    for f in findings:
        out[(f.entry.key_hex, f.kind)].append(f)
    return out


def _same_socket(a: MapEntry, b: MapEntry) -> bool:
    """Whether two looks' entries point to the same socket, as far as they tell.

    Cookies decide where both looks have one (0 is "not generated yet": the
    first look's scan may generate it, so it does not count); else the entry
    socket's state and tuple; with neither, the key and kind must do.
    """
    if a.cookie and b.cookie:
        return a.cookie == b.cookie
    if a.target is not None and b.target is not None:
        return (a.target.state, a.target.tuple) == (b.target.state, b.target.tuple)
    return True


def _seen_again(f: Finding, again: dict[tuple[str, Kind], list[Finding]]) -> bool:
    return any(_same_socket(f.entry, g.entry) for g in again.get((f.entry.key_hex, f.kind), ()))


def confirm(first: Sequence[Finding], second: Sequence[Finding]) -> list[Finding]:
    """Findings of ``first`` that a later, independent look saw again.

    A stale or shadowing verdict from one look can be a race with a
    connection opening or closing while the map and the sockets were read
    one after the other.  It is confirmed only when the second look gives
    the same key the same kind and — when the entry's socket cookie is known —
    the entry still points to the same socket (it was not re-inserted for a
    new connection).  Other kinds pass through unconfirmed.
    """
    again = _by_key(second)
    out: list[Finding] = []
    for f in first:
        if f.kind in BAD_KINDS:
            if _seen_again(f, again):
                out.append(replace(f, confirmed=True))
        else:
            out.append(f)
    return out
