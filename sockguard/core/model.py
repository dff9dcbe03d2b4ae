"""Plain data shared by the audit core and the kernel adapters.

Nothing here touches the kernel: adapters produce these values, the audit core
consumes them, the output layer renders them.  Keeping them frozen dataclasses
lets the core be tested with hand-built (and hypothesis-built) inputs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address


class Kind(enum.StrEnum):
    """What the audit concluded about one map entry."""

    OK = "ok"
    STALE = "stale"
    SHADOWING = "shadowing"
    PROXY = "proxy"
    #: A live socket owns the key's tuple but reads with plain ``tcp_recvmsg``:
    #: its peer's payload is redirected by this key, and it will never see it.
    RECVPATH = "recvpath"


#: Receive paths an iterator can report (``sk->sk_prot->recvmsg``); None: unknown.
RECV_TCP = "tcp_recvmsg"
RECV_BPF = "tcp_bpf_recvmsg"  # also tcp_bpf_recvmsg_parser (a psock with an sk_skb verdict)
RECV_OTHER = "other"


@dataclass(frozen=True, order=True)
class Endpoint:
    """One side of a TCP connection."""

    ip: IPAddress
    port: int

    def __str__(self) -> str:
        if isinstance(self.ip, IPv6Address):
            # A dual-stack socket's IPv4 peer (::ffff:a.b.c.d) is an IPv4 connection:
            # shown as the IPv4 address, as the key that describes it is IPv4.
            if self.ip.ipv4_mapped is not None:
                return f"{self.ip.ipv4_mapped}:{self.port}"
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, order=True)
class Tuple4:
    """A connection as seen from one socket: its local and remote endpoint."""

    family: int  # 4 or 6
    local: Endpoint
    remote: Endpoint

    def reversed(self) -> Tuple4:
        """The same connection seen from the peer socket."""
        return Tuple4(self.family, self.remote, self.local)

    def __str__(self) -> str:
        return f"{self.local} -> {self.remote}"


@dataclass(frozen=True)
class SockKey:
    """A decoded sockhash key, with fields named as Cilium names them.

    ``owner`` is the tuple of the socket the key was written for (its local
    and remote side), which the layout derives from sip/dip/sport/dport.
    """

    family: int
    sip: IPAddress
    sport: int
    dip: IPAddress
    dport: int
    owner: Tuple4

    def as_dict(self) -> dict[str, object]:
        return {
            "family": self.family,
            "sip": str(self.sip),
            "sport": self.sport,
            "dip": str(self.dip),
            "dport": self.dport,
        }

    def __str__(self) -> str:
        return f"{Endpoint(self.sip, self.sport)} -> {Endpoint(self.dip, self.dport)}"


@dataclass(frozen=True)
class MapInfo:
    """A sockhash or sockmap as the kernel describes it."""

    id: int
    name: str
    map_type: str  # "sockhash" or "sockmap"
    key_size: int
    value_size: int
    max_entries: int
    path: str | None = None  # a bpffs pin path, when the map was found by one
    # attached sk_msg/sk_skb programs, "type:name:id"; None: the kernel cannot list them
    programs: tuple[str, ...] | None = ()

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "path": self.path}


@dataclass(frozen=True)
class TargetSocket:
    """The socket a map entry points to, as a BPF iterator reports it.

    ``dead``: its process has closed it (SOCK_DEAD), so its entries should
    have gone with it (sock_map_close).  ``recv_path``: ``RECV_*`` or None.
    """

    cookie: int
    family: int = 0
    state: int = 0
    netns_ino: int = 0
    tuple: Tuple4 | None = None
    dead: bool = False
    recv_path: str | None = None


@dataclass(frozen=True)
class MapEntry:
    """One key of a map, decoded, with what is known of the socket behind it.

    ``cookie`` is known when the map's value is 8 bytes (userspace lookup
    returns the socket cookie) or when a sockmap iterator ran; else None.
    """

    key_hex: str
    key: SockKey
    cookie: int | None = None
    target: TargetSocket | None = None


@dataclass(frozen=True)
class Netns:
    """A network namespace, identified by its nsfs inode."""

    ino: int
    name: str  # "host", a /run/netns name, or "pid:N"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class LiveSocket:
    """A TCP socket as sock_diag (or the iter/tcp iterator) reports it in one namespace.

    ``recv_path`` (``RECV_*``) is known only from the iterator.
    """

    tuple: Tuple4
    state: int  # TCP state number, as in include/net/tcp_states.h
    cookie: int
    inode: int
    netns: Netns
    uid: int = 0
    recv_path: str | None = None


@dataclass(frozen=True)
class Owner:
    """Who holds a socket: a process and, when it runs in them, its container and pod.

    ``pod_uid`` is the Kubernetes pod's UID as kubelet names its cgroup; ``pod``
    its ``namespace/name`` as kubelet names the pod's log directory, where the
    node has one.
    """

    pid: int
    comm: str
    container: str | None = None
    pod_uid: str | None = None
    pod: str | None = None

    def __str__(self) -> str:
        base = f"{self.comm}[{self.pid}]"
        where = [f"pod {self.pod or self.pod_uid}"] if self.pod_uid else []
        where += [self.container[:12]] if self.container else []
        return f"{base} ({', '.join(where)})" if where else base


@dataclass(frozen=True)
class Finding:
    """The verdict on one map entry.

    ``socket`` is the live socket owning the key's tuple (for ``ok`` and for
    ``shadowing``, where it is the endangered connection).  ``reason`` says in
    words why the kind was chosen, for humans and for the journal.
    """

    kind: Kind
    map: MapInfo
    entry: MapEntry
    reason: str
    socket: LiveSocket | None = None
    owner: Owner | None = None
    confirmed: bool = False
    details: dict[str, object] = field(default_factory=dict)
