"""Tracer events: the record the BPF objects write, decoded, and what it means.

Pure: ``decode_event`` makes no system call (symbols, the clock offset and the
"which audited maps hold this key" lookup are passed in), and
``TraceEvent.meaning`` is the one place that decides what an event tells about
the maps.  The objects and their consumer are ``sockguard.trace.tracer``.
"""

from __future__ import annotations

import enum
import errno
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from sockguard.core.layout import CILIUM, KeyDecodeError, KeyLayout, decode
from sockguard.core.model import Endpoint, IPAddress, SockKey, Tuple4
from sockguard.core.tcp_states import TCP_CLOSE, state_name
from sockguard.kernel import kallsyms
from sockguard.kernel.bpf_object import CStruct
from sockguard.trace.collision import Entry

# struct sg_event (bpf/sockguard_trace.h)
EVENT = CStruct("sg_event", "=QQQIIIi16sHHHBB16s16sQII16s64s8QII",
                "ts_ns cookie netns type pid tid ret comm family sport dport state_old state_new "
                "saddr daddr aux map_id key_size map_name key stack source _pad")
EV_UPDATE, EV_PSOCK_DROP, EV_RECV, EV_STATE, EV_DESTROY, EV_RESET = 1, 2, 3, 4, 5, 6
EVENT_KINDS = {EV_UPDATE: "update", EV_PSOCK_DROP: "psock_drop", EV_RECV: "recv",
               EV_STATE: "state", EV_DESTROY: "destroy", EV_RESET: "reset"}
SOURCES = {1: "kprobe", 2: "fentry", 3: "tp_btf", 4: "raw_tp"}


#: Bounded metric labels.
UPDATE_ERRNOS = ("EEXIST", "EBUSY", "EINVAL", "ENOMEM", "ENOSPC", "EOPNOTSUPP", "other")
DROP_CALLERS = ("close", "update_failed", "delete", "map_free", "other", "unknown")

#: Frames of the psock-drop stack that are the drop itself, not its caller.
_DROP_SELF = frozenset({"sk_psock_drop", "sk_psock_put", "sk_psock_put.part.0"})
#: Caller function -> caller class.
CALLER_CLASSES = {
    "sock_map_close": "close",
    "sock_hash_update_common": "update_failed",
    "sock_map_update_common": "update_failed",
    "sock_map_link": "update_failed",
    "bpf_sock_hash_update": "update_failed",
    "bpf_sock_map_update": "update_failed",
    "sock_map_update_elem_sys": "update_failed",
    "sock_map_update_elem": "update_failed",
    "sock_map_unref": "delete",
    "sock_map_remove_links": "delete",
    "sock_hash_delete_elem": "delete",
    "sock_map_delete_elem": "delete",
    "__sock_map_delete": "delete",
    "sock_hash_delete_from_link": "delete",
    "sock_map_delete_from_link": "delete",
    "sock_hash_free": "map_free",
    "sock_map_free": "map_free",
}
RECV_PATHS = {"tcp_recvmsg": "tcp", "tcp_bpf_recvmsg": "bpf", "tcp_bpf_recvmsg_parser": "bpf"}


class Meaning(enum.Enum):
    """What an event tells about the maps: the one place that decides it (``TraceEvent.meaning``).

    The value names the event in the journal (SOCKGUARD_EVENT) and, for the
    ones in ``EARLY_AUDIT``, the trigger of the audit it starts.
    """

    UPDATE_FAILURE = "update_failure"  # a sockhash insert failed (EEXIST: a stale key)
    PSOCK_DROP = "psock_drop"  # a socket left a map; its caller says why
    RECV_MISMATCH = "recv_mismatch"  # receives via tcp_recvmsg while its key is in a map
    COLLISION = "collision"  # established while its key's entry points to another socket
    KEY_LEFT_BEHIND = "key_left_behind"  # closed while the key of its tuple is in a map
    #: reset or timed out while its process holds it, the key of its tuple in a map: stale
    #: until the fd is closed, which a server usually does within milliseconds (no audit)
    RESET_HELD = "reset_held"


#: Event kinds after which a socket's key should be gone from every map: a close (CLOSE)
#: or a death (destroy).  A reset is not one: its entry rightly stays until the fd is
#: closed (Meaning.RESET_HELD).
LEFT_BEHIND_KINDS = ("state", "destroy")

#: The meanings that start an audit ahead of the interval.
EARLY_AUDIT = (Meaning.UPDATE_FAILURE, Meaning.RECV_MISMATCH, Meaning.COLLISION,
               Meaning.KEY_LEFT_BEHIND)
#: The meanings after which a map may hold a key a new connection collides with: the
#: collision check listens again (sockguard/trace/collision.py, CollisionGate).
ENTRY_GONE_BAD = (*EARLY_AUDIT, Meaning.RESET_HELD)


@dataclass(frozen=True)
class TraceEvent:
    """One decoded tracer event; fields that do not apply to its kind are None."""

    kind: str
    time: float  # Unix time
    pid: int
    tid: int
    comm: str
    netns: int
    cookie: int
    sock: Tuple4 | None  # the socket's local -> remote
    state: str
    source: str
    old_state: str | None = None
    # update
    errno: int | None = None  # 0 = success
    flags: int | None = None
    map_id: int | None = None
    map_name: str | None = None
    key_hex: str | None = None
    key: SockKey | None = None
    # psock_drop
    caller: str | None = None
    caller_class: str | None = None
    stack: tuple[str, ...] = ()
    # recv
    length: int | None = None
    recv_fn: str | None = None
    recv_path: str | None = None
    # recv on tcp_recvmsg, close, destroy: maps holding the key of this socket's tuple
    key_in_maps: tuple[str, ...] | None = None
    # parked in the kernel while its key was not watched yet, reported at a refresh
    late: bool = False
    # collision: the socket the map's entry of this socket's key points to, how that was
    # told ("cookie" or "tuple"), and seconds from ESTABLISHED to the report
    entry: Entry | None = None
    compared_by: str | None = None
    detected_after: float | None = None

    @property
    def errno_name(self) -> str | None:
        if self.errno is None:
            return None
        return "OK" if self.errno == 0 else errno.errorcode.get(self.errno, str(self.errno))

    @property
    def meaning(self) -> Meaning | None:
        """What this event tells about the maps; None for a plain trace line."""
        if self.kind == "update":
            return Meaning.UPDATE_FAILURE if self.errno else None
        if self.kind == "psock_drop":
            return Meaning.PSOCK_DROP
        if self.kind == "recv":
            return (Meaning.RECV_MISMATCH if self.recv_path == "tcp" and self.key_in_maps
                    else None)
        if self.kind == "collision":
            return Meaning.COLLISION
        if self.kind in LEFT_BEHIND_KINDS and self.key_in_maps:
            return Meaning.KEY_LEFT_BEHIND
        if self.kind == "reset" and self.key_in_maps:
            return Meaning.RESET_HELD
        return None

    @property
    def mismatch(self) -> bool:
        """Receives via tcp_recvmsg although its key is in a map: a shadowed connection."""
        return self.meaning is Meaning.RECV_MISMATCH

    @property
    def collision(self) -> bool:
        """Established while the entry of its key points to another socket."""
        return self.meaning is Meaning.COLLISION

    @property
    def left_behind(self) -> bool:
        """Closed or destroyed while the key of its tuple is still in a map."""
        return self.meaning is Meaning.KEY_LEFT_BEHIND

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict (``sockguard trace --json``); fields that do not apply left out."""
        out: dict[str, object] = {
            "time": round(self.time, 6), "event": self.kind, "pid": self.pid, "tid": self.tid,
            "comm": self.comm, "netns": self.netns, "cookie": self.cookie,
            "state": self.state, "source": self.source,
        }
        if self.sock is not None:
            out["family"] = self.sock.family
            out["local"] = str(self.sock.local)
            out["remote"] = str(self.sock.remote)
        optional: dict[str, object | None] = {
            "old_state": self.old_state, "errno": self.errno, "errno_name": self.errno_name,
            "flags": self.flags, "map_id": self.map_id, "map_name": self.map_name,
            "key_hex": self.key_hex, "key": self.key.as_dict() if self.key else None,
            "caller": self.caller, "caller_class": self.caller_class,
            "stack": list(self.stack) if self.stack else None, "length": self.length,
            "recv_fn": self.recv_fn, "recv_path": self.recv_path,
            "key_in_maps": list(self.key_in_maps) if self.key_in_maps is not None else None,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.late:
            out["late"] = True
        if self.kind == "recv":
            out["mismatch"] = self.mismatch
        if self.kind in LEFT_BEHIND_KINDS and self.key_in_maps is not None:
            out["left_behind"] = self.left_behind
        if self.entry is not None:
            out["entry"] = self.entry.as_dict()
            out["compared_by"] = self.compared_by
        if self.detected_after is not None:
            out["detected_after"] = round(self.detected_after, 6)
        return out

    def line(self) -> str:
        """One human-readable line (``sockguard trace``)."""
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time)) + \
            f".{int(self.time % 1 * 1e6):06d}"
        who = f"{self.pid}/{self.comm}" if self.pid else f"-/{self.comm or 'softirq'}"
        tup = str(self.sock) if self.sock else "-"
        parts = [stamp, f"{self.kind:<10}", f"{who:<22}", f"netns {self.netns}", tup,
                 f"cookie {self.cookie}", self.state]
        if self.kind == "update":
            parts.append(f"map {self.map_name}#{self.map_id} key {self.key or self.key_hex} "
                         f"-> {self.errno_name}")
        elif self.kind == "psock_drop":
            parts.append(f"caller {self.caller} ({self.caller_class})")
        elif self.kind == "recv":
            parts.append(f"via {self.recv_fn} ({self.recv_path}) ret {self.length}")
            if self.mismatch:
                parts.append(f"MISMATCH: key in {', '.join(self.key_in_maps or ())}")
        elif self.kind == "state":
            parts.append(f"{self.old_state} -> {self.state}")
        elif self.kind == "reset":
            parts.append(f"by {self.errno_name}, its process still holds it")
            if self.key_in_maps:
                parts.append(f"KEY IN {', '.join(self.key_in_maps)} until it is closed")
        elif self.kind == "collision" and self.entry is not None:
            e = self.entry
            cookie = "?" if e.cookie is None else str(e.cookie)
            parts.append(f"COLLISION: key {self.key or self.key_hex} in {e.map_label} points "
                         f"to socket {e.sock or '-'} (cookie {cookie}, {e.state}), not to this "
                         f"one (by {self.compared_by})")
        if self.left_behind:
            parts.append(f"KEY LEFT BEHIND in {', '.join(self.key_in_maps or ())}")
        if self.late:
            parts.append("(late: parked until its key was watched)")
        return "  ".join(parts)


def _ip(family: int, raw: bytes) -> IPAddress:
    if family == socket.AF_INET6:
        v6 = IPv6Address(raw)
        return v6.ipv4_mapped or v6
    return IPv4Address(raw[:4])


def _tuple(family: int, saddr: bytes, sport: int, daddr: bytes, dport: int) -> Tuple4 | None:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    local, remote = _ip(family, saddr), _ip(family, daddr)
    fam = 4 if isinstance(local, IPv4Address) and isinstance(remote, IPv4Address) else 6
    if fam == 6:  # a mapped address on one side only: keep both as IPv6
        local, remote = ip_address(saddr), ip_address(daddr)
    return Tuple4(fam, Endpoint(local, sport), Endpoint(remote, dport))


def classify_caller(frames: Sequence[int],
                    syms: kallsyms.Kallsyms) -> tuple[str, str, tuple[str, ...]]:
    """(caller function, caller class, named stack) of an ``sk_psock_drop`` stack.

    The caller is the first frame that is neither the drop itself
    (sk_psock_drop, the inlined sk_psock_put) nor BPF (the program or its
    trampoline, with fentry).
    """
    names: list[str] = []
    caller = None
    for addr in frames:
        if not addr:
            break
        name = syms.name_at(addr) or f"0x{addr:x}"
        names.append(name)
        if caller is None and name not in _DROP_SELF and not name.startswith(("bpf_prog_",
                                                                             "bpf_trampoline")):
            caller = name
    if caller is None:
        return "?", "unknown", tuple(names)
    return caller, CALLER_CLASSES.get(caller, "other"), tuple(names)


def recv_path(fn: str | None) -> str:
    """"tcp", "bpf", or "other" (kTLS, MPTCP, ...) for a recvmsg function name."""
    if fn is None:
        return "unknown"
    return RECV_PATHS.get(fn, "other")


def recv_length(ret: int, source: int) -> int | None:
    """recvmsg's result of a recv event; None from the kprobe variant, which fires on entry."""
    return None if SOURCES.get(source) == "kprobe" else ret


def decode_event(data: bytes, syms: kallsyms.Kallsyms, clock_ns: int, *, late: bool = False,
                 holding: Callable[[Tuple4], tuple[str, ...]] | None = None,
                 layout: KeyLayout = CILIUM) -> TraceEvent:
    """Decode one ``struct sg_event`` and add names and the decoded key.

    No syscalls here: ``syms`` names addresses, ``clock_ns`` turns boot time into
    Unix time, and ``holding`` (the maps that hold a tuple's key; None: not asked)
    is called only for the events whose meaning depends on it — a receive via
    tcp_recvmsg, a close, a destroy.  ``layout``: that of the maps' keys, by
    which an update's key is decoded.
    """
    (ts, cookie, netns, etype, pid, tid, ret, comm, family, sport, dport, old, new,
     saddr, daddr, aux, map_id, key_size, map_name, key, *rest) = EVENT.unpack(data)
    stack, source = rest[:8], rest[8]
    tup = _tuple(family, saddr, sport, daddr, dport)

    def in_maps() -> tuple[str, ...] | None:  # asked only where the meaning depends on it
        return holding(tup) if holding is not None and tup is not None else None

    kw: dict[str, object] = {}  # one constructor call: replace() per field is slow
    if etype == EV_UPDATE:
        raw_key = key[:key_size]
        decoded: SockKey | None = None
        if key_size == layout.size:
            try:
                decoded = decode(layout, raw_key)
            except KeyDecodeError:
                decoded = None
        kw = {"errno": -ret if ret < 0 else 0, "flags": aux, "map_id": map_id,
              "map_name": map_name.split(b"\0", 1)[0].decode(errors="replace"),
              "key_hex": raw_key.hex(), "key": decoded}
    elif etype == EV_PSOCK_DROP:
        caller, klass, names = classify_caller(stack, syms)
        kw = {"caller": caller, "caller_class": klass, "stack": names}
    elif etype == EV_RECV:
        fn = syms.exact(aux)
        path = recv_path(fn)
        kw = {"length": recv_length(ret, source), "recv_fn": fn or f"0x{aux:x}",
              "recv_path": path}
        if path == "tcp":
            kw["key_in_maps"] = in_maps()
    elif etype == EV_STATE:
        kw = {"old_state": state_name(old)}
        if new == TCP_CLOSE:
            kw["key_in_maps"] = in_maps()
    elif etype == EV_DESTROY:
        kw = {"key_in_maps": in_maps()}
    elif etype == EV_RESET:  # ret: -sk_err (ECONNRESET, ETIMEDOUT, ...)
        kw = {"errno": -ret if ret < 0 else 0, "key_in_maps": in_maps()}
    return TraceEvent(
        kind=EVENT_KINDS.get(etype, f"type{etype}"), time=(ts + clock_ns) / 1e9,
        pid=pid, tid=tid, comm=comm.split(b"\0", 1)[0].decode(errors="replace"),
        netns=netns, cookie=cookie, sock=tup,
        state=state_name(new),
        source=SOURCES.get(source, "?"), late=late, **kw)  # type: ignore[arg-type]
