"""The audit core: map entries and live sockets in, findings out.

Pure: no syscalls, no clock.  Adapters hand in decoded entries and the live
sockets of every namespace; this module decides what each entry is.  The rules
(see README "What the findings mean"):

- ``proxy``: the key's source is a host/proxy address (Cilium's L7 redirect,
  where sip is the host gateway IP and sport the proxy port).  It describes a
  client socket only by its local side, so it is judged by that side alone.
- ``ok``: a live socket owns the tuple the key describes and, when we know
  which socket the entry points to, it is that socket.
- ``shadowing``: a live socket owns the tuple but the entry points to another
  socket.  The owner's peer redirects into the wrong socket: that connection
  hangs.  The owner is reported as the endangered connection.
- ``stale``: no live socket owns the tuple.

An owner is a full TCP socket in a synchronized or closing state.  A tuple
seen only in the handshake (SYN_SENT/SYN_RECV) is neither owned nor stale:
the entry is left alone and looked at again next time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address

from .model import Endpoint, Finding, IPAddress, Kind, LiveSocket, MapEntry, MapInfo, Tuple4

# include/net/tcp_states.h
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11
TCP_NEW_SYN_RECV = 12

TCP_STATE_NAMES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
    11: "CLOSING", 12: "NEW_SYN_RECV",
}

OWNER_STATES = frozenset(
    {TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING}
)
HANDSHAKE_STATES = frozenset({TCP_SYN_SENT, TCP_SYN_RECV, TCP_NEW_SYN_RECV})

#: Findings that mean an entry should not be in the map.
BAD_KINDS = frozenset({Kind.STALE, Kind.SHADOWING})


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


@dataclass
class SocketIndex:
    """Live sockets of all namespaces, indexed the ways the rules look them up."""

    owners: dict[Tuple4, list[LiveSocket]] = field(default_factory=lambda: defaultdict(list))
    handshake: dict[Tuple4, list[LiveSocket]] = field(default_factory=lambda: defaultdict(list))
    timewait: dict[Tuple4, list[LiveSocket]] = field(default_factory=lambda: defaultdict(list))
    by_local: dict[Endpoint, list[LiveSocket]] = field(default_factory=lambda: defaultdict(list))
    by_cookie: dict[int, LiveSocket] = field(default_factory=dict)
    count: int = 0

    @classmethod
    def build(cls, sockets: Iterable[LiveSocket]) -> SocketIndex:
        index = cls()
        for sock in sockets:
            index.add(sock)
        return index

    def add(self, sock: LiveSocket) -> None:
        self.count += 1
        tup = normalize(sock.tuple)
        if sock.cookie:
            self.by_cookie[sock.cookie] = sock
        if sock.state in OWNER_STATES:
            self.owners[tup].append(sock)
            self.by_local[tup.local].append(sock)
        elif sock.state in HANDSHAKE_STATES:
            self.handshake[tup].append(sock)
        elif sock.state == TCP_TIME_WAIT:
            self.timewait[tup].append(sock)


@dataclass(frozen=True)
class AuditPolicy:
    """What the operator told us about the node.

    ``proxy_ips``: addresses that mark a key as an L7-proxy redirect entry
    when they appear as its sip (Cilium's host gateway IP, cilium_host).
    """

    proxy_ips: frozenset[IPAddress] = frozenset()


@dataclass
class Verdict:
    """What the rules say about one entry before any confirmation."""

    kind: Kind | None  # None: in handshake, no verdict yet
    reason: str
    socket: LiveSocket | None = None
    details: dict[str, object] = field(default_factory=dict)


def _describe(sock: LiveSocket) -> str:
    return f"{sock.tuple} in netns {sock.netns} ({TCP_STATE_NAMES.get(sock.state, sock.state)})"


def _judge_proxy(entry: MapEntry, index: SocketIndex) -> Verdict:
    client = entry.key.owner.local
    holders = index.by_local.get(client, [])
    if entry.cookie is not None:
        holders = [s for s in holders if s.cookie == entry.cookie] or []
    if holders:
        return Verdict(Kind.PROXY, f"L7 proxy redirect for client {client}", holders[0])
    return Verdict(Kind.STALE, f"L7 proxy redirect entry whose client socket {client} is gone",
                   None, {"proxy": True})


def judge(entry: MapEntry, index: SocketIndex, policy: AuditPolicy) -> Verdict:
    """Apply the classification rules to one decoded entry."""
    key = entry.key
    if _unmapped(key.sip) in policy.proxy_ips:
        return _judge_proxy(entry, index)
    tup = normalize(key.owner)
    owners = index.owners.get(tup, [])
    if not owners:
        if tup in index.handshake:
            return Verdict(None, f"{tup} is in its handshake")
        details: dict[str, object] = {}
        reason = f"no live socket in any namespace has {tup}"
        if tup in index.timewait:
            tw = index.timewait[tup][0]
            details["closed_in_netns"] = str(tw.netns)
            reason += f"; the connection closed (TIME_WAIT in netns {tw.netns})"
        if entry.target is not None and entry.target.state == TCP_CLOSE:
            # A reset socket keeps its entry until its fd is closed (sock_map_close);
            # it is out of the established hash, so sock_diag no longer lists it.
            details["entry_socket_state"] = "CLOSE"
            reason += "; the entry's socket was reset but its process still holds it open"
        return Verdict(Kind.STALE, reason, None, details)
    if entry.cookie is None:
        return Verdict(Kind.OK, f"owned by {_describe(owners[0])}", owners[0],
                       {"verified_by_cookie": False})
    for sock in owners:
        if sock.cookie == entry.cookie:
            return Verdict(Kind.OK, f"owned by {_describe(sock)}", sock,
                           {"verified_by_cookie": True})
    victim = owners[0]
    details = {"entry_cookie": entry.cookie, "owner_cookie": victim.cookie}
    target = index.by_cookie.get(entry.cookie)
    if target is not None:
        details["entry_socket"] = f"{target.tuple} in netns {target.netns}"
    elif entry.target is not None and entry.target.tuple is not None:
        details["entry_socket"] = str(entry.target.tuple)
    return Verdict(
        Kind.SHADOWING,
        f"entry points to socket {entry.cookie}, not to the live owner {_describe(victim)}: "
        "its peer's payload goes to the wrong socket",
        victim,
        details,
    )


@dataclass
class AuditResult:
    """One look at one map."""

    map: MapInfo
    entries: int
    findings: list[Finding]
    pending: int = 0  # entries whose tuple is mid-handshake
    undecodable: list[str] = field(default_factory=list)

    def count(self, kind: Kind) -> int:
        return sum(1 for f in self.findings if f.kind is kind)

    @property
    def bad(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in BAD_KINDS]


def audit_map(
    info: MapInfo,
    entries: Sequence[MapEntry],
    index: SocketIndex,
    policy: AuditPolicy,
    undecodable: Sequence[str] = (),
) -> AuditResult:
    """Classify every entry of one map against the live sockets."""
    findings: list[Finding] = []
    pending = 0
    for entry in entries:
        verdict = judge(entry, index, policy)
        if verdict.kind is None:
            pending += 1
            continue
        findings.append(
            Finding(verdict.kind, info, entry, verdict.reason, verdict.socket,
                    details=verdict.details)
        )
    return AuditResult(info, len(entries), findings, pending, list(undecodable))


def _identity(f: Finding) -> tuple[str, Kind, int | None]:
    return (f.entry.key_hex, f.kind, f.entry.cookie)


def confirm(first: Sequence[Finding], second: Sequence[Finding]) -> list[Finding]:
    """Findings of ``first`` that a later, independent look saw again.

    A stale or shadowing verdict from one look can be a race with a
    connection opening or closing while the map and the sockets were read
    one after the other.  It is confirmed only when the second look gives
    the same key the same kind and — when the entry's socket cookie is known —
    the entry still points to the same socket (it was not re-inserted for a
    new connection).  Other kinds pass through unconfirmed.
    """
    again = {_identity(f) for f in second}
    out: list[Finding] = []
    for f in first:
        if f.kind in BAD_KINDS:
            if _identity(f) in again:
                out.append(replace(f, confirmed=True))
        else:
            out.append(f)
    return out
