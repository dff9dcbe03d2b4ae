"""The tracer: sockhash events as they happen, from three small CO-RE objects.

==========================  ===============================================
``trace_sockhash.bpf.o``    sockhash inserts and their result (EEXIST: the
                            incident's collision); ``sk_psock_drop`` with a short
                            kernel stack naming its caller.  kprobe+kretprobe
                            or fentry/fexit — neither attaches on every kernel.
``trace_recvpath.bpf.o``    ``sk->sk_prot->recvmsg`` of each TCP socket that
                            receives (tp_btf ``sock_recv_length``, or kprobes
                            on ``inet_recvmsg``/``inet6_recvmsg``).
``trace_lifecycle.bpf.o``   TCP sockets established / closing / destroyed
                            (tp_btf or raw_tp ``inet_sock_set_state``,
                            ``tcp_destroy_sock``).
==========================  ===============================================

At each ESTABLISHED whose key is in an audited map, userspace also checks
that the map's entry of that key points to this very socket
(``sockguard.trace.collision``): one that points elsewhere is a ``collision``
event, the new connection's payload redirected into a stale entry's socket,
reported about 50 ms after connect and before any payload is read.

Every object writes the same 256+8-byte record (``bpf/sockguard_trace.h``,
mirrored by :data:`EVENT`) to its own ring buffer; one libbpf consumer polls
all of them (``sockguard.trace.ringbuf``).  Which variant of each object is loaded
comes from the capability probe (``capabilities.plan``); a detection that
cannot run is reported with the probe's reason, never silently missing.

Userspace adds what the kernel side leaves out on purpose: names for the
addresses (``/proc/kallsyms``), the decoded key (layout), and — for a socket
that receives via ``tcp_recvmsg`` or a socket that just closed — whether the
key of its tuple is in one of the audited maps.  A socket receiving via
``tcp_recvmsg`` while its key is in a map is the incident's shadowed connection:
its peer redirects every payload into whatever socket that entry holds.

In the daemon (``filter_watched``) the kernel side asks first: the receive
and lifecycle objects compute the Cilium key of the socket at hand and look
it up in ``watched``, a BPF hash of the audited maps' keys that
:class:`WatchedKeys` keeps in step (added and deleted keys only, every
``watch_interval`` seconds or less often when the maps are large).  A socket
outside every map then costs one bit test (``watched_bits``, one bit per key
hash, kept by :class:`WatchedBits`; the hash is looked up only when the bit
is set) and no record, so plain traffic does not wake the consumer.  A
socket whose key is not (yet) watched has its would-be event parked
in its object's ``pending`` array, in the slot its key hashes to (8,192
slots; the next socket hashing there overwrites it); a refresh that adds the
key takes the parked event out and reports it ``late``.
The filter knows only the Cilium layout; with any other layout the objects
load unfiltered.  Failed updates and psock drops are never filtered.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from sockguard.core.errors import SockguardError
from sockguard.core.layout import CILIUM, KeyDecodeError, KeyLayout, decode, key_for_socket
from sockguard.core.model import Endpoint, IPAddress, MapInfo, SockKey, Tuple4
from sockguard.core.tcp_states import TCP_CLOSE, TCP_ESTABLISHED, state_name
from sockguard.kernel import bpf_object, libbpf
from sockguard.kernel import maps as maps_adapter
from sockguard.kernel import trace_symbols as kallsyms
from sockguard.kernel.bpf_object import BpfObjectMissingError, CStruct
from sockguard.kernel.capabilities import Capabilities, Detection, plan, probe
from sockguard.kernel.libbpf import BpfError, BpfObject, Link
from sockguard.kernel.sockmap_iter import KeyReader, iterator_available
from sockguard.trace.collision import Candidate, CollisionCheck, Entry, EntryReader
from sockguard.trace.ringbuf import RingBuffer

log = logging.getLogger(__name__)

BPF_DIR = bpf_object.BPF_DIR

# struct sg_event (bpf/sockguard_trace.h)
EVENT = CStruct("sg_event", "=QQQIIIi16sHHHBB16s16sQII16s64s8QII",
                "ts_ns cookie netns type pid tid ret comm family sport dport state_old state_new "
                "saddr daddr aux map_id key_size map_name key stack source _pad")
EV_UPDATE, EV_PSOCK_DROP, EV_RECV, EV_STATE, EV_DESTROY = 1, 2, 3, 4, 5
EVENT_KINDS = {EV_UPDATE: "update", EV_PSOCK_DROP: "psock_drop", EV_RECV: "recv",
               EV_STATE: "state", EV_DESTROY: "destroy"}
SOURCES = {1: "kprobe", 2: "fentry", 3: "tp_btf", 4: "raw_tp"}

#: Key layouts the kernel-side filter knows (SG_LAYOUT_* in bpf/sockguard_trace.h).
FILTER_LAYOUTS = {CILIUM.name: 1}
#: Capacity of ``watched`` (SG_WATCHED_MAX): keys beyond it are not watched.
WATCHED_MAX = 262144
#: Objects with the ``watched`` and ``watched_bits`` maps (shared) and a ``pending`` map.
FILTERED_OBJECTS = ("trace_recvpath", "trace_lifecycle")
#: struct sg_parked, one per slot of ``pending`` (2**PENDING_BITS slots).
PARKED = CStruct("sg_parked", "=44sBBBBQQQIIH2xIi16sI",
                 "key type state_old state_new source ts_ns cookie aux netns pid family check "
                 "ret comm epoch")
PARKED_SIZE = PARKED.size
PENDING_BITS = 13
#: ``watched_bits``: one bit per key hash, 2**WATCHED_BITS bits (SG_WATCHED_BITS).
WATCHED_BITS = 17
#: struct sg_cilium_key as the words ``sg_key_hash`` mixes.
_KEY_WORDS = CStruct("sg_cilium_key", "<4I4IB3xII", "sip dip family sport dport")


def key_hash(key: bytes) -> int:
    """The 32-bit hash of a Cilium key: ``sg_key_hash`` in bpf/sockguard_trace.h."""
    w: tuple[int, ...] = _KEY_WORDS.unpack(key)
    mask, gold = 0xFFFFFFFF, 0x9E3779B1
    h = w[0] ^ w[1] ^ w[2] ^ w[3]
    h = ((h * gold) & mask) ^ (w[4] ^ w[5] ^ w[6] ^ w[7])
    h = ((h * gold) & mask) ^ ((w[9] | (w[10] << 16) | w[8]) & mask)
    return (h * gold) & mask


def pending_slot(key: bytes) -> int:
    """The ``pending`` slot of a Cilium key (the slot ``sg_park`` writes)."""
    return key_hash(key) >> (32 - PENDING_BITS)


def watched_bit(key: bytes) -> int:
    """The bit of a Cilium key in ``watched_bits`` (``sg_watched``)."""
    return key_hash(key) >> (32 - WATCHED_BITS)


def parked_event(raw: bytes) -> bytes | None:
    """A parked record as a ``struct sg_event``, its tuple taken from its key.

    None when the record fails its check (two CPUs wrote the slot at once).
    """
    (key, etype, old, new, source, ts, cookie, aux, netns, pid, family, check, ret,
     comm, _epoch) = PARKED.unpack(raw)
    if (cookie & 0xFFFFFFFF) ^ key_hash(key) != check:
        return None
    remote, local = key[0:16], key[16:32]
    if key[32] == 1:  # IPv4, from an AF_INET socket or a v4-mapped AF_INET6 one
        if family == socket.AF_INET6:
            remote, local = (b"\0" * 10 + b"\xff\xff" + a[:4] for a in (remote, local))
        else:
            remote, local = (a[:4] + b"\0" * 12 for a in (remote, local))
    sport, dport = int.from_bytes(key[40:42], "big"), int.from_bytes(key[36:38], "big")
    return EVENT.pack(ts, cookie, netns, etype, pid, 0, ret, comm, family, sport, dport, old,
                      new, local, remote, aux, 0, 0, b"", b"", *([0] * 8), source, 0)


class WatchedBits:
    """The kernel's ``watched_bits`` as userspace keeps it: a count per bit.

    A bit is set while at least one watched key hashes to it, so deleting
    one of two keys sharing a bit keeps the other watched.
    """

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.bitmap = bytearray(1 << WATCHED_BITS >> 3)

    def add(self, key: bytes) -> None:
        bit = watched_bit(key)
        n = self.counts.get(bit, 0)
        self.counts[bit] = n + 1
        if n == 0:
            self.bitmap[bit >> 3] |= 1 << (bit & 7)

    def discard(self, key: bytes) -> None:
        bit = watched_bit(key)
        n = self.counts.get(bit, 0)
        if n > 1:
            self.counts[bit] = n - 1
        elif n == 1:
            del self.counts[bit]
            self.bitmap[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes):
            return False
        bit = watched_bit(key)
        return bool(self.bitmap[bit >> 3] & (1 << (bit & 7)))




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

#: Programs of each object per variant.
PROGRAMS: dict[str, dict[str, tuple[str, ...]]] = {
    "trace_sockhash": {
        "update_failures:kprobe": ("update_kprobe", "update_kretprobe"),
        "update_failures:fentry": ("update_fexit",),
        "psock_drops:kprobe": ("drop_kprobe",),
        "psock_drops:fentry": ("drop_fentry",),
    },
    "trace_recvpath": {
        "recv_path:tp_btf": ("recv_tp_btf",),
        "recv_path:kprobe": ("recv_kprobe_inet", "recv_kprobe_inet6"),
    },
    "trace_lifecycle": {
        "lifecycle:tp_btf": ("state_tp_btf", "destroy_tp_btf"),
        "lifecycle:raw_tp": ("state_raw_tp", "destroy_raw_tp"),
    },
}


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


#: The meanings that start an audit ahead of the interval.
EARLY_AUDIT = (Meaning.UPDATE_FAILURE, Meaning.RECV_MISMATCH, Meaning.COLLISION,
               Meaning.KEY_LEFT_BEHIND)


class TracerUnavailableError(SockguardError):
    """No detection of the tracer can run on this kernel (the message says why)."""


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
        if self.kind in ("state", "destroy") and self.key_in_maps:
            return Meaning.KEY_LEFT_BEHIND
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
        if self.kind in ("state", "destroy") and self.key_in_maps is not None:
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
                 holding: Callable[[Tuple4], tuple[str, ...]] | None = None) -> TraceEvent:
    """Decode one ``struct sg_event`` and add names and the decoded key.

    No syscalls here: ``syms`` names addresses, ``clock_ns`` turns boot time into
    Unix time, and ``holding`` (the maps that hold a tuple's key; None: not asked)
    is called only for the events whose meaning depends on it — a receive via
    tcp_recvmsg, a close, a destroy.
    """
    (ts, cookie, netns, etype, pid, tid, ret, comm, family, sport, dport, old, new,
     saddr, daddr, aux, map_id, key_size, map_name, key, *rest) = EVENT.unpack(data)
    stack, source = rest[:8], rest[8]
    tup = _tuple(family, saddr, sport, daddr, dport)
    in_maps = holding if tup is not None else None
    kw: dict[str, object] = {}  # one constructor call: replace() per field is slow
    if etype == EV_UPDATE:
        raw_key = key[:key_size]
        decoded: SockKey | None = None
        if key_size == CILIUM.size:
            try:
                decoded = decode(CILIUM, raw_key)
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
        if path == "tcp" and in_maps is not None and tup is not None:
            kw["key_in_maps"] = in_maps(tup)
    elif etype == EV_STATE:
        kw = {"old_state": state_name(old)}
        if new == TCP_CLOSE and in_maps is not None and tup is not None:
            kw["key_in_maps"] = in_maps(tup)
    elif etype == EV_DESTROY:
        kw = {"key_in_maps": in_maps(tup) if in_maps is not None and tup is not None else None}
    return TraceEvent(
        kind=EVENT_KINDS.get(etype, f"type{etype}"), time=(ts + clock_ns) / 1e9,
        pid=pid, tid=tid, comm=comm.split(b"\0", 1)[0].decode(errors="replace"),
        netns=netns, cookie=cookie, sock=tup,
        state=state_name(new),
        source=SOURCES.get(source, "?"), late=late, **kw)  # type: ignore[arg-type]


class MapWatch:
    """Answers "is the key of this tuple in one of the audited maps?" for the tracer.

    The maps are resolved by ``provider`` (the daemon's map selection, or
    discovery for ``sockguard trace``) and re-resolved every ``refresh``
    seconds, since Cilium may recreate its map; their fds stay open in
    between, so one question costs two ``get_next_key`` calls per map.
    """

    def __init__(self, provider: Callable[[], list[MapInfo]], layout: KeyLayout = CILIUM,
                 refresh: float = 10.0) -> None:
        self.provider = provider
        self.layout = layout
        self.refresh = refresh
        self._handles: list[maps_adapter.MapHandle] = []
        self._at = float("-inf")
        self._reader: KeyReader | None = None  # the sockmap iterator, for keys()
        self._reader_ok = True

    def _resolve(self) -> list[maps_adapter.MapHandle]:
        now = time.monotonic()
        if now - self._at < self.refresh:
            return self._handles
        self._at = now
        self.close()
        try:
            infos = [m for m in self.provider()
                     if m.key_size == self.layout.size and m.map_type == "sockhash"]
        except (SockguardError, OSError) as exc:
            log.debug("tracer: cannot resolve maps: %s", exc)
            return self._handles
        for info in infos:
            try:
                self._handles.append(maps_adapter.open_map(info))
            except (SockguardError, OSError) as exc:
                log.debug("tracer: map %s id %d: %s", info.name, info.id, exc)
        return self._handles

    def handles(self) -> list[maps_adapter.MapHandle]:
        """The audited maps' open handles (re-resolved every ``refresh`` seconds)."""
        return list(self._resolve())

    def holding(self, tup: Tuple4) -> tuple[str, ...]:
        """Names (``name#id``) of the maps that hold the key of the socket ``tup``."""
        key = key_for_socket(self.layout, tup)
        found: list[str] = []
        for handle in self._resolve():
            try:
                if handle.contains(key):
                    found.append(f"{handle.info.name}#{handle.info.id}")
            except (SockguardError, OSError) as exc:
                log.debug("tracer: map %s id %d: %s", handle.info.name, handle.info.id, exc)
                self._at = float("-inf")  # re-resolve next time
        return tuple(found)

    def map_ids(self) -> frozenset[int]:
        """The ids of the audited maps, as resolved now."""
        return frozenset(h.info.id for h in self._resolve())

    def keys(self) -> dict[bytes, int]:
        """Every key of the audited maps now, with the id of the (first) map holding it.

        Read with the sockmap iterator when it works here (one kernel walk per
        map, the iterator object loaded once), else with get_next_key.
        """
        out: dict[bytes, int] = {}
        for handle in self._resolve():
            try:
                for key in self._keys_of(handle):
                    out.setdefault(key, handle.info.id)
            except (SockguardError, OSError) as exc:
                log.debug("tracer: map %s id %d: %s", handle.info.name, handle.info.id, exc)
                self._at = float("-inf")
        return out

    def _keys_of(self, handle: maps_adapter.MapHandle) -> Iterable[bytes]:
        if self._reader is None and self._reader_ok:
            self._reader_ok = iterator_available()[0]
            if self._reader_ok:
                try:
                    self._reader = KeyReader(self.layout.size)
                except (SockguardError, OSError) as exc:
                    log.debug("tracer: no sockmap iterator for the watched set: %s", exc)
                    self._reader_ok = False
        if self._reader is not None:
            return self._reader.keys(handle.fd)
        return handle.keys()

    def close(self) -> None:
        """Close the open map fds."""
        for handle in self._handles:
            handle.close()
        self._handles = []

    def close_all(self) -> None:
        """Close the map fds and the key reader (the tracer's close)."""
        self.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None


@dataclass
class TracerOptions:
    """What the tracer reports; the daemon and ``sockguard trace`` differ."""

    failures_only: bool = False   # updates: only failed ones (daemon)
    #: lifecycle: only sockets' deaths (tcp_destroy_sock), inet_sock_set_state not
    #: attached (no collision check then)
    deaths_only: bool = False
    all_states: bool = False      # lifecycle: every TCP state transition
    #: lifecycle: inet_sock_set_state reports only the transition into ESTABLISHED
    #: (daemon: the collision check; deaths come from tcp_destroy_sock)
    established_only: bool = False
    #: at ESTABLISHED, check that the entry of the socket's key points to that socket
    check_collisions: bool = True
    only_tcp_recvmsg: bool = False  # recv: only sockets receiving via tcp_recvmsg (daemon)
    every_recv: bool = False      # recv: every recvmsg, not once per socket and function
    check_maps: bool = True       # annotate recv/close events with key_in_maps
    # recv/lifecycle: only sockets whose key is in the audited maps (daemon; Cilium layout)
    filter_watched: bool = False
    watch_interval: float = 1.0   # shortest period between refreshes of the watched set
    #: a refresh may take at most this share of the tracer thread's time (longer period)
    watch_budget: float = 0.01


def daemon_options() -> TracerOptions:
    """What ``sockguard run`` traces (also the overhead benchmark's configuration)."""
    return TracerOptions(failures_only=True, established_only=True, only_tcp_recvmsg=True,
                         filter_watched=True)


class WatchedKeys:
    """The ``watched`` BPF hash kept equal to the audited maps' keys, and its parked events.

    :meth:`refresh` reads the keys (``MapWatch.keys``), deletes the gone and
    adds the new ones, then takes out of the ``pending`` maps the events
    parked under each added key.  Work per refresh beyond the key walk is
    proportional to the change.  A parked event older than the previous
    refresh's start is dropped: its key was not in the maps then (or the walk
    would have watched it), so it belongs to an earlier socket of that tuple.
    Each refresh starts a new ``epoch`` (in ``watched_bits``): a socket's
    repeated event refreshes its parked time once per epoch (sg_park).
    """

    SLACK_NS = 100_000_000  # events and key walk are not atomic with each other

    def __init__(self, watch: MapWatch, watched_fd: int, bits_fd: int,
                 pending_fds: Sequence[int], options: TracerOptions) -> None:
        self.watch = watch
        self.fd = watched_fd
        self.bits_fd = bits_fd
        self.bits = WatchedBits()
        self.pending_fds = list(pending_fds)
        self.options = options
        self.keys: dict[bytes, int] = {}
        self.due = 0.0
        self.refreshes = 0
        self.last_seconds = 0.0
        self.overflow = 0
        self.epoch = 0
        self._prev_start_ns: int | None = None
        self.walks = 0  # refreshes that walked the maps themselves
        self.walk_seconds = 0.0  # how long the last own walk took
        #: keys another walk read (the daemon's audit): (its start, keys, map ids)
        self._offer: tuple[int, dict[bytes, int], frozenset[int]] | None = None

    def offer(self, start_ns: int, keys: dict[bytes, int], map_ids: frozenset[int]) -> None:
        """Keys of the audited maps that a walk begun at ``start_ns`` read (monotonic ns).

        Called from the audit thread: the next refresh takes them instead of
        walking the maps again, if they cover the same maps and are newer than
        its last start.  One assignment, so no lock is needed under the GIL.
        """
        self._offer = (start_ns, keys, map_ids)

    def has_fresh_offer(self) -> bool:
        offer = self._offer
        return offer is not None and (self._prev_start_ns is None
                                      or offer[0] > self._prev_start_ns)

    def _take_offer(self) -> tuple[int, dict[bytes, int]] | None:
        offer, self._offer = self._offer, None
        if offer is None or (self._prev_start_ns is not None and offer[0] <= self._prev_start_ns):
            return None
        if offer[2] != self.watch.map_ids():
            return None  # the audit read other maps (one failed, or the selection changed)
        return offer[0], offer[1]

    def bits_value(self) -> bytes:
        """The ``watched_bits`` map's value: struct sg_watched_bits."""
        return self.epoch.to_bytes(4, "little") + bytes(4) + bytes(self.bits.bitmap)

    def refresh(self) -> list[tuple[bytes, bytes]]:
        """Bring ``watched`` up to date; (key, raw event) parked under each added key."""
        start, start_ns = time.monotonic(), time.monotonic_ns()
        offered = self._take_offer()
        if offered is None and start < self.due:
            return []  # an offer that did not fit, and no walk of our own due yet
        self.epoch = (self.epoch + 1) & 0xFFFFFFFF
        libbpf.map_update(self.bits_fd, bytes(4), self.bits_value())
        if offered is not None:
            # the audit's walk: this refresh starts when that walk started, so a
            # parked event is dropped only if older than a walk that would have seen its key
            start_ns, new = offered
        else:
            try:
                new = self.watch.keys()
            except (SockguardError, OSError) as exc:
                log.debug("tracer: watched set not refreshed: %s", exc)
                self.due = start + self.options.watch_interval
                return []
        old = self.keys
        gone = [k for k in old if k not in new]
        for key in gone:
            try:
                libbpf.map_delete(self.fd, key)
            except BpfError as exc:
                log.debug("tracer: watched delete: %s", exc)
            del old[key]
            self.bits.discard(key)
        added: list[bytes] = []
        for key, map_id in new.items():
            if key in old:
                continue
            if len(old) >= WATCHED_MAX:
                self.overflow += 1
                continue
            try:
                libbpf.map_update(self.fd, key, map_id.to_bytes(4, "little"))
            except BpfError as exc:
                self.overflow += 1
                log.debug("tracer: watched update: %s", exc)
                continue
            old[key] = map_id
            self.bits.add(key)
            added.append(key)
        if gone or added:
            # after the hash: a set bit before its key is in the hash only costs a
            # lookup; events parked meanwhile are collected below
            libbpf.map_update(self.bits_fd, bytes(4), self.bits_value())
        if self.overflow and self.refreshes == 0:
            log.warning("tracer: more than %d keys: %d are not watched (their sockets are "
                        "found by the audit only)", WATCHED_MAX, self.overflow)
        parked: list[tuple[bytes, bytes]] = []
        oldest = None if self._prev_start_ns is None else self._prev_start_ns - self.SLACK_NS
        empty = bytes(PARKED_SIZE)
        for key in added:
            slot = pending_slot(key).to_bytes(4, "little")
            for fd in self.pending_fds:
                raw = libbpf.map_lookup(fd, slot, PARKED_SIZE)
                if raw is None or raw[: len(key)] != key:
                    continue
                libbpf.map_update(fd, slot, empty)
                ev = parked_event(raw)
                if ev is not None and (oldest is None
                                       or int.from_bytes(ev[:8], "little") >= oldest):
                    parked.append((key, ev))
        self._prev_start_ns = start_ns
        self.refreshes += 1
        end = time.monotonic()
        self.last_seconds = end - start
        if offered is None:
            self.walks += 1
            self.walk_seconds = self.last_seconds
        # the first walk loads the iterator and fills the whole set: no measure of the rest;
        # the period is the own walk's cost, so offers (cheap to take) do not shorten it
        period = max(self.options.watch_interval,
                     self.walk_seconds / max(self.options.watch_budget, 1e-3)
                     if self.walks > 1 else 0.0)
        self.due = end + period
        return parked


@dataclass
class _Loaded:
    obj: BpfObject
    links: list[Link] = field(default_factory=list)


class Tracer:
    """Loads, attaches and polls the tracer objects this kernel supports.

    ``handler`` gets each :class:`TraceEvent` in the thread calling
    :meth:`poll`.  :meth:`close` destroys every link (detaching the programs)
    and closes the objects; links also go away if the process dies.
    """

    def __init__(self, handler: Callable[[TraceEvent], None],
                 options: TracerOptions | None = None, watch: MapWatch | None = None,
                 caps: Capabilities | None = None, bpf_dir: Path = BPF_DIR) -> None:
        self.handler = handler
        self.options = options or TracerOptions()
        self.watch = watch
        self.caps = caps
        self.bpf_dir = bpf_dir
        self.detections: dict[str, Detection] = {}
        self._loaded: list[_Loaded] = []
        self._rb: RingBuffer | None = None
        self._syms = kallsyms.load()
        self._clock = time.time_ns() - time.monotonic_ns()
        self._batch: list[tuple[int, bytes, bool]] = []
        self.events = 0
        self.lost_handler_errors = 0
        self.watched: WatchedKeys | None = None
        self._watched_fd: int | None = None  # our dups of the shared maps' fds
        self._bits_fd: int | None = None
        self._pending_fds: list[int] = []
        self.collisions: CollisionCheck | None = None

    @property
    def filtering(self) -> bool:
        """Whether the kernel side filters by the watched set (decided by :meth:`start`)."""
        o = self.options
        return (o.filter_watched and self.watch is not None
                and self.watch.layout.name in FILTER_LAYOUTS)

    # -- setup ------------------------------------------------------------------------

    def start(self) -> dict[str, Detection]:
        """Load and attach what the kernel allows; the resulting detections (tracer ones).

        Raises TracerUnavailableError when no tracer detection could be started.
        """
        caps = self.caps or probe()
        wanted = {k: d for k, d in plan(caps).items() if k != "shadowing"}
        self.detections = dict(wanted)
        rb = RingBuffer(self._on_record)
        self._rb = rb
        try:
            for obj_name, variants in PROGRAMS.items():
                self._start_object(obj_name, variants, wanted, rb)
        except BaseException:
            self.close()
            raise
        if not any(d.active for d in self.detections.values()):
            reasons = "; ".join(f"{k}: {d.reason}" for k, d in self.detections.items())
            self.close()
            raise TracerUnavailableError(f"no tracer detection can run here ({reasons})")
        if self.options.filter_watched and not self.filtering:
            layout = self.watch.layout.name if self.watch is not None else "none"
            log.info("tracer: no kernel-side filter for key layout %s: every socket's events "
                     "reach userspace", layout)
        self._start_collisions()
        if (self.filtering and self._watched_fd is not None and self._bits_fd is not None
                and self.watch is not None):
            self.watched = WatchedKeys(self.watch, self._watched_fd, self._bits_fd,
                                       self._pending_fds, self.options)
            self._poll_late()  # fill the set before the first events are waited for
        return self.detections

    def _start_collisions(self) -> None:
        """Set up the collision check, or say in its detection why it does not run."""
        det = self.detections.get("collision")
        if det is None or not det.active:
            return
        life = self.detections.get("lifecycle")
        why = None
        if not self.options.check_collisions:
            why = "not asked for"
        elif self.watch is None or not self.options.check_maps:
            why = "no maps to look the keys up in (map checks are off)"
        elif life is None or not life.active:
            why = f"lifecycle tracepoints not attached: {life.reason if life else '?'}"
        elif self.options.deaths_only:
            why = "inet_sock_set_state not attached (deaths only)"
        if why is not None:
            self.detections["collision"] = replace(det, active=False, via=None, reason=why)
            return
        assert det.via is not None and self.watch is not None
        reader = EntryReader(self.watch.handles, det.via)
        reader.prepare()
        self.collisions = CollisionCheck(reader)

    def _settings(self, obj_name: str) -> dict[str, int]:
        """The ``cfg`` fields of ``obj_name`` (bpf/trace_*.bpf.c) for these options."""
        o = self.options
        layout = FILTER_LAYOUTS.get(self.watch.layout.name, 0) if self.watch else 0
        filtering = int(self.filtering)
        if obj_name == "trace_sockhash":
            return {"cfg.failures_only": o.failures_only}
        if obj_name == "trace_recvpath":
            only = self._syms.address("tcp_recvmsg") if o.only_tcp_recvmsg else None
            return {"cfg.only_fn": only or 0, "cfg.dedup": not o.every_recv,
                    "cfg.filter_watched": filtering, "cfg.key_layout": layout}
        return {"cfg.states_all": o.all_states, "cfg.filter_watched": filtering,
                "cfg.key_layout": layout,
                "cfg.established_only": o.established_only and not o.all_states}

    def _start_object(self, obj_name: str, variants: dict[str, tuple[str, ...]],
                      wanted: dict[str, Detection], rb: RingBuffer) -> None:
        chosen: dict[str, tuple[str, ...]] = {}
        for variant, progs in variants.items():
            det_name, via = variant.split(":")
            det = wanted.get(det_name)
            if det is not None and det.active and det.via == via:
                chosen[det_name] = tuple(p for p in progs if self._wants_program(p))
        if not chosen:
            return
        shared = self.filtering and obj_name in FILTERED_OBJECTS
        reuse = {}
        if shared and self._watched_fd is not None and self._bits_fd is not None:
            reuse = {"watched": self._watched_fd, "watched_bits": self._bits_fd}  # one set
        try:
            obj = bpf_object.load(bpf_object.object_path(obj_name, self.bpf_dir),
                                  programs={p for progs in chosen.values() for p in progs},
                                  settings=self._settings(obj_name), reuse=reuse)
        except BpfObjectMissingError as exc:
            self._disable(chosen, str(exc))
            return
        except BpfError as exc:
            self._disable(chosen, f"{obj_name} does not load: {str(exc).splitlines()[0]}")
            return
        loaded = _Loaded(obj)
        self._loaded.append(loaded)
        if shared:
            if self._watched_fd is None:
                self._watched_fd = os.dup(obj.map("watched").fd)
                self._bits_fd = os.dup(obj.map("watched_bits").fd)
            self._pending_fds.append(obj.map("pending").fd)
        for det_name, progs in chosen.items():
            try:
                for prog in progs:
                    loaded.links.append(obj.program(prog).attach())
            except BpfError as exc:
                self._disable({det_name: progs}, f"attaching {prog} failed: "
                                                 f"{errno.errorcode.get(exc.errno or 0, '?')}")
        rb.add(obj.map("events").fd)

    def _wants_program(self, prog: str) -> bool:
        return not (self.options.deaths_only and prog.startswith("state_"))

    def _disable(self, chosen: dict[str, tuple[str, ...]], reason: str) -> None:
        for det_name in chosen:
            self.detections[det_name] = replace(self.detections[det_name], active=False,
                                                via=None, reason=reason)

    # -- events -----------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` and handle the events that arrived; how many.

        Each object has its own ring buffer, so one poll's records are sorted
        by their kernel timestamp before they are decoded and handed on.  With
        the kernel-side filter, the watched set is refreshed first when due,
        and the events parked under its new keys are handled with the rest.
        """
        if self._rb is None:
            return 0
        n = self._poll_late()
        if self.collisions is not None:  # wake up for a due second look
            due = self.collisions.next_due()
            if due is not None:
                timeout_ms = max(0, min(timeout_ms, int((due - time.monotonic()) * 1000) + 1))
        self._batch = []
        try:
            n += self._rb.poll(timeout_ms)
        finally:
            batch, self._batch = self._batch, []
        self._handle(batch)
        return n + self._check_collisions()

    def offer_keys(self, start_ns: int, walks: dict[int, list[bytes]]) -> None:
        """Keys the audit walked (map id -> keys, from ``start_ns``): the watched set takes
        them at the next poll instead of walking the maps again (any thread may call)."""
        w = self.watched
        if w is None:
            return
        keys: dict[bytes, int] = {}
        for map_id, map_keys in walks.items():
            for key in map_keys:
                keys.setdefault(key, map_id)
        w.offer(start_ns, keys, frozenset(walks))

    def _poll_late(self) -> int:
        """Refresh the watched set when due; handle the parked events it released."""
        w = self.watched
        if w is None or (time.monotonic() < w.due and not w.has_fresh_offer()):
            return 0
        records = w.refresh()
        self._handle([(int.from_bytes(r[:8], "little"), r, True) for _k, r in records],
                     {r: k for k, r in records})
        return len(records)

    def _handle(self, batch: list[tuple[int, bytes, bool]],
                keys: dict[bytes, bytes] | None = None) -> None:
        batch.sort()
        for _ts, data, late in batch:
            try:
                event = self.decode(data, late=late)
            except Exception:
                self.lost_handler_errors += 1
                log.exception("tracer: cannot decode an event")
                continue
            if keys is not None and self.watch is not None and (
                    event.sock is None
                    or key_for_socket(self.watch.layout, event.sock) != keys.get(data)):
                continue  # a slot written by two CPUs at once: not one socket's event
            self.events += 1
            self.handler(event)
            if (self.collisions is not None and event.kind == "state" and not event.late
                    and event.state == state_name(TCP_ESTABLISHED) and event.sock is not None
                    and self.watch is not None):
                self.collisions.offer(Candidate(
                    key_for_socket(self.watch.layout, event.sock), event.cookie, event.sock,
                    event.netns, time.monotonic(), event))

    def _check_collisions(self) -> int:
        """Look at the due candidates; hand on a ``collision`` event for each confirmed one."""
        check = self.collisions
        if check is None or check.next_due() is None:
            return 0
        found = check.run()
        for col in found:
            ev = col.candidate.payload
            assert isinstance(ev, TraceEvent)
            key = col.candidate.key
            decoded: SockKey | None = None
            if self.watch is not None:
                try:
                    decoded = decode(self.watch.layout, key)
                except KeyDecodeError:
                    decoded = None
            e = col.entry
            self.events += 1
            self.handler(replace(ev, kind="collision", key_hex=key.hex(), key=decoded,
                                 map_id=e.map_id, map_name=e.map_name,
                                 key_in_maps=(e.map_label,), entry=e,
                                 compared_by=col.compared_by,
                                 detected_after=max(0.0, time.time() - ev.time)))
        return len(found)

    def _on_record(self, data: bytes) -> None:
        if len(data) >= EVENT.size:
            self._batch.append((int.from_bytes(data[:8], "little"), data[: EVENT.size], False))

    def decode(self, data: bytes, late: bool = False) -> TraceEvent:
        """One ``struct sg_event``, with the maps holding its socket's key where that matters."""
        watching = self.watch is not None and self.options.check_maps
        return decode_event(data, self._syms, self._clock, late=late,
                            holding=self.watch.holding if watching and self.watch else None)

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Detach every program and free everything; idempotent."""
        if self.collisions is not None:
            self.collisions.reader.close()
            self.collisions = None
        if self.watch is not None:
            self.watch.close_all()
        self.watched = None
        self._pending_fds = []
        for fd in (self._watched_fd, self._bits_fd):
            if fd is not None:
                os.close(fd)
        self._watched_fd = self._bits_fd = None
        if self._rb is not None:
            self._rb.close()
            self._rb = None
        for loaded in self._loaded:
            for link in loaded.links:
                link.destroy()
            loaded.obj.close()
        self._loaded.clear()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attached_detections(detections: dict[str, Detection]) -> str:
    """One log line: which tracer detections run, and why the others do not."""
    on = [f"{k} ({d.via})" for k, d in detections.items() if d.active]
    off = [f"{k}: {d.reason}" for k, d in detections.items() if not d.active]
    text = "tracer active: " + (", ".join(on) if on else "nothing")
    if off:
        text += "; inactive: " + "; ".join(off)
    return text


__all__ = ["EVENT", "MapWatch", "TraceEvent", "Tracer", "TracerOptions", "TracerUnavailableError",
           "WatchedKeys", "attached_detections", "classify_caller", "daemon_options", "recv_path"]
