"""A new connection colliding with a stale key, seen when it is established.

When a stale sockhash key has the 5-tuple of a new connection, the server
side's own insert fails (EEXIST) and its peer's ``sk_msg`` redirects every
payload into the stale entry's socket: the server never reads it, and a
server blocked in ``epoll_wait``/``poll`` or a read without timeout never
returns from anything the receive-path tracer could see.  The connection's
key is in the map from the moment it is established, though.  So at the
lifecycle tracepoint's ESTABLISHED (``bpf/trace_lifecycle.bpf.c``; in the
daemon only for sockets whose key is in the ``watched`` set, i.e. was in
the map *before* the connection existed) the tracer asks which socket the
entry of that key points to, and a connection whose entry points to another
socket is a **collision**.

Timing: for a passive open ``tcp_set_state(TCP_ESTABLISHED)`` fires the
tracepoint before ``tcp_init_transfer`` runs the sockops callback that
inserts the socket; by the time userspace handles the record the insert
has happened, or failed on the stale key.  A first look that disagrees is
repeated once :data:`RECHECK_DELAY` later before it is reported, so an
insert that was still on its way is never a collision.

Which socket an entry points to comes from the tc lookup
(``sockguard.kernel.sockhash_lookup``, one ``BPF_PROG_TEST_RUN`` per key, ~2 µs,
the program loaded once per map) or, where that cannot load, from the
sockmap iterator (one walk of the map per batch of keys).  Where neither
runs nothing is compared and nothing is reported (``detections.plan``
says why).  The comparison with the event's socket:

- both cookies known and nonzero: the cookies;
- the entry's socket has cookie 0 while the event's socket had one: a
  different socket (a cookie, once generated, stays; the event's was
  generated before the look);
- otherwise (cookie 0 on both sides, or a tuple-only tc lookup): the
  socket's tuple (local/remote, IPv4-mapped addresses folded), a connected
  state and, where both are known, the network namespace.

An entry that points to another socket which itself owns the tuple (same
tuple, connected, not dead: a connection in another network namespace) is
not a collision: the audit calls that entry ``ok``.  A stale entry's socket
has another tuple (the dummy of a leak), or is closed (its local port
released) or dead.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from sockguard.core.errors import SockguardError
from sockguard.core.model import Endpoint, IPAddress, Tuple4
from sockguard.core.rows import Record
from sockguard.core.tcp_states import OWNER_STATES, state_name
from sockguard.kernel import sockhash_lookup, sockmap_iter
from sockguard.kernel.libbpf import BpfError, BpfObject
from sockguard.kernel.maps import MapHandle

log = logging.getLogger(__name__)

#: Seconds between a first look that disagrees and the look that reports it.
RECHECK_DELAY = 0.05
#: The ways of reading an entry's socket (``Detection.via`` of ``collision``).
VIA_LOOKUP = "tc lookup"
VIA_ITERATOR = "iter/sockmap"
#: TCP states of a socket that owns its tuple (an entry's socket in any other
#: state is not the new connection's).
CONNECTED_STATES = OWNER_STATES


@dataclass(frozen=True)
class Entry:
    """The socket one map's entry of a key points to."""

    map_id: int
    map_name: str
    cookie: int | None  # None: not known (tuple-only lookup); 0: never generated
    sock: Tuple4 | None  # its local -> remote
    state: str
    state_code: int
    netns: int | None  # None: not known
    dead: bool
    via: str

    @property
    def map_label(self) -> str:
        return f"{self.map_name}#{self.map_id}"

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"cookie": self.cookie, "state": self.state,
                                  "netns": self.netns, "via": self.via}
        if self.sock is not None:
            out["local"] = str(self.sock.local)
            out["remote"] = str(self.sock.remote)
        if self.dead:
            out["dead"] = True
        return out


def _ip(raw: bytes) -> IPAddress:
    if len(raw) == 4:
        return IPv4Address(raw)
    v6 = IPv6Address(raw)
    return v6.ipv4_mapped or v6


def record_tuple(rec: Record) -> Tuple4 | None:
    """The local -> remote tuple of a record's socket, IPv4-mapped addresses folded."""
    _key, _cookie, _netns, family, _state, saddr, daddr, sport, dport, _dead, _recv = rec
    if family == socket.AF_INET:
        return Tuple4(4, Endpoint(IPv4Address(saddr[:4]), sport),
                      Endpoint(IPv4Address(daddr[:4]), dport))
    if family != socket.AF_INET6:
        return None
    local, remote = _ip(saddr[:16]), _ip(daddr[:16])
    if isinstance(local, IPv4Address) and isinstance(remote, IPv4Address):
        return Tuple4(4, Endpoint(local, sport), Endpoint(remote, dport))
    # a mapped address on one side only: keep both as IPv6 (as the tracer's events do)
    return Tuple4(6, Endpoint(ip_address(saddr[:16]), sport),
                  Endpoint(ip_address(daddr[:16]), dport))


def entry_of(rec: Record, map_id: int, map_name: str, via: str) -> Entry:
    """An :class:`Entry` from an iterator or tc-lookup record."""
    _key, cookie, netns, _family, state, _s, _d, _sp, _dp, dead, _recv = rec
    known = cookie >= 0  # a tuple-only tc lookup record carries -1: not known
    name = state_name(state)
    return Entry(map_id, map_name, cookie if known else None, record_tuple(rec), name, state,
                 netns if known and netns else None, dead, via)


def same_socket(cookie: int, sock: Tuple4 | None, netns: int,
                entry: Entry) -> tuple[bool, str]:
    """Whether ``entry`` points to the socket (``cookie``, ``sock``, ``netns``) of an event.

    Also how it was told: ``"cookie"`` or ``"tuple"``.
    """
    if entry.cookie is not None and cookie:
        if entry.cookie:
            return entry.cookie == cookie, "cookie"
        return False, "cookie"  # ours had a cookie before the look; the entry's has none
    if sock is None or entry.sock is None:
        return False, "tuple"
    if entry.netns is not None and netns and entry.netns != netns:
        return False, "tuple"
    return entry.sock == sock and entry.state_code in CONNECTED_STATES, "tuple"


def owns_tuple(entry: Entry, sock: Tuple4 | None) -> bool:
    """Whether the entry's socket is itself a live owner of ``sock``'s tuple."""
    return (sock is not None and entry.sock == sock and not entry.dead
            and entry.state_code in CONNECTED_STATES)


class EntryReader:
    """Which socket a key points to in each audited map, by tc lookup or iterator.

    ``handles`` gives the audited maps' open handles (``MapWatch.handles``).
    The tc lookup program is loaded once per map and kept while the map is
    audited; a map where it cannot load falls back to the sockmap iterator.
    """

    def __init__(self, handles: Callable[[], Sequence[MapHandle]], via: str) -> None:
        self.handles = handles
        self.via = via
        self._readers: dict[int, tuple[BpfObject, sockhash_lookup.Reader]] = {}
        self._no_lookup: set[int] = set()  # map ids where the tc lookup does not load
        self._warned: set[int] = set()

    def prepare(self) -> None:
        """Load the tc lookup for the maps audited now, so the first look does not wait."""
        if self.via != VIA_LOOKUP:
            return
        try:
            handles = list(self.handles())
        except (SockguardError, OSError) as exc:
            log.debug("tracer: collision check: maps not resolved yet: %s", exc)
            return
        for handle in handles:
            if handle.info.id not in self._no_lookup:
                self._reader(handle)

    def read(self, keys: Collection[bytes]) -> dict[bytes, list[Entry]]:
        """The entries of ``keys`` in every audited map that holds them."""
        out: dict[bytes, list[Entry]] = {}
        if not keys:
            return out
        handles = list(self.handles())
        live = {h.info.id for h in handles}
        for map_id in [i for i in self._readers if i not in live]:
            self._readers.pop(map_id)[0].close()
        for handle in handles:
            info = handle.info
            try:
                records = self._records(handle, keys)
            except (SockguardError, OSError) as exc:
                if info.id not in self._warned:
                    self._warned.add(info.id)
                    log.warning("tracer: cannot tell which socket the entries of map %s#%d "
                                "point to, no collision check there: %s", info.name, info.id,
                                exc)
                continue
            for key, (rec, via) in records.items():
                out.setdefault(key, []).append(entry_of(rec, info.id, info.name, via))
        return out

    def _records(self, handle: MapHandle,
                 keys: Collection[bytes]) -> dict[bytes, tuple[Record, str]]:
        info = handle.info
        if self.via == VIA_LOOKUP and info.id not in self._no_lookup:
            reader = self._reader(handle)
            if reader is not None:
                found: dict[bytes, tuple[Record, str]] = {}
                for key in keys:
                    if len(key) != info.key_size:
                        continue
                    rec = reader.lookup(key)
                    if rec is not None:
                        found[key] = (rec, VIA_LOOKUP)
                return found
        if not sockmap_iter.iterator_available()[0]:
            raise BpfError(errno.EOPNOTSUPP, "neither the tc lookup nor the sockmap iterator "
                                             "runs here")
        wanted = set(keys)
        return {k: (r, VIA_ITERATOR)
                for k, r in sockmap_iter.read_records(handle.fd, info.key_size).items()
                if k in wanted}

    def _reader(self, handle: MapHandle) -> sockhash_lookup.Reader | None:
        info = handle.info
        have = self._readers.get(info.id)
        if have is not None:
            return have[1]
        program = sockhash_lookup._probe()[0]
        try:
            if program is None:
                raise BpfError(errno.EOPNOTSUPP, sockhash_lookup._probe()[1])
            obj = sockhash_lookup._load(handle.fd, info.key_size, program)
        except (SockguardError, OSError) as exc:
            log.info("tracer: tc lookup unavailable for map %s#%d (%s): the sockmap iterator "
                     "tells the collision check which socket an entry points to", info.name,
                     info.id, exc)
            self._no_lookup.add(info.id)
            return None
        reader = sockhash_lookup.Reader(obj, program, info.key_size)
        self._readers[info.id] = (obj, reader)
        return reader

    def close(self) -> None:
        for obj, _reader in self._readers.values():
            obj.close()
        self._readers.clear()


@dataclass
class Candidate:
    """A socket that became established while its key was (or may be) in a map."""

    key: bytes
    cookie: int
    sock: Tuple4
    netns: int
    due: float  # time.monotonic()
    payload: object  # the caller's event, handed back with the verdict
    first_look: float | None = None  # when a look first found another socket


@dataclass(frozen=True)
class Collision:
    """A candidate whose entry points to another socket at two looks."""

    candidate: Candidate
    entry: Entry
    compared_by: str
    first_look: float  # time.monotonic() of the first look that disagreed


class CollisionCheck:
    """Candidates in, collisions out: a first look, and one more before reporting."""

    MAX_PENDING = 4096  # a flood of connections cannot grow the queue without bound

    def __init__(self, reader: EntryReader, delay: float = RECHECK_DELAY) -> None:
        self.reader = reader
        self.delay = delay
        self.pending: list[Candidate] = []
        self.checked = 0
        self.dropped = 0

    def offer(self, cand: Candidate) -> None:
        if len(self.pending) >= self.MAX_PENDING:
            self.dropped += 1
            return
        self.pending.append(cand)

    def next_due(self) -> float | None:
        return min((c.due for c in self.pending), default=None)

    def run(self, now: float | None = None) -> list[Collision]:
        """Look at every due candidate; the collisions confirmed by a second look."""
        now = time.monotonic() if now is None else now
        due = [c for c in self.pending if c.due <= now]
        if not due:
            return []
        self.pending = [c for c in self.pending if c.due > now]
        entries = self.reader.read({c.key for c in due})
        out: list[Collision] = []
        for cand in due:
            self.checked += 1
            other: tuple[Entry, str] | None = None
            for entry in entries.get(cand.key, ()):
                same, how = same_socket(cand.cookie, cand.sock, cand.netns, entry)
                if not same and not owns_tuple(entry, cand.sock):
                    other = (entry, how)
                    break
            if other is None:  # absent, or the entry is this socket: no collision
                continue
            if cand.first_look is None:  # its insert may still be on its way: look again
                cand.first_look = now
                cand.due = now + self.delay
                self.pending.append(cand)
                continue
            out.append(Collision(cand, other[0], other[1], cand.first_look))
        return out


#: ``tracer.collision_check``: listen only while a map may hold a key to collide with
#: (``auto``), or whenever the tracer runs (``always``).
GATE_MODES = ("auto", "always")


class CollisionGate:
    """Whether the collision check needs its tracepoint attached right now.

    A new connection can only collide with a key that is already in a map,
    and a key some live socket owns is not one: its tuple is taken in that
    namespace, and the same tuple in another namespace is not a collision
    (:func:`owns_tuple`).  So after an audit that proved every entry of every
    audited map owned (``NodeAudit.proven_healthy``) there is nothing to
    collide with until a map changes, and ``inet_sock_set_state`` — some ten
    runs per connection, each a retpoline call on a mitigated kernel, for two
    that matter — can be detached.

    It listens (fail closed) until such an audit; after an audit that did not
    prove it or failed; after the tracer saw an entry go bad (``ENTRY_GONE_BAD``
    in :mod:`sockguard.trace.events`: a key left behind, a reset socket held
    open, a failed insert, a receive-path mismatch) unless an audit that
    started later proved the maps healthy again; and while a map is audited
    that the proof did not cover.  The audit thread reports, the tracer thread
    asks: a lock keeps the three fields consistent.
    """

    def __init__(self, mode: str = "auto") -> None:
        if mode not in GATE_MODES:
            raise ValueError(f"collision gate mode {mode!r} is not one of {GATE_MODES}")
        self.mode = mode
        self._lock = threading.Lock()
        self._proven_at: float | None = None  # start of the last audit that proved it
        self._proven_maps: frozenset[int] = frozenset()
        self._suspected_at: float | None = None

    def audited(self, started: float, proven_maps: Collection[int] | None) -> None:
        """An audit that started at ``started`` (monotonic) ended: the ids of the maps it
        proved healthy, all of them, or None when it proved nothing (or failed)."""
        with self._lock:
            if proven_maps is None:
                self._proven_at, self._proven_maps = None, frozenset()
            else:
                self._proven_at, self._proven_maps = started, frozenset(proven_maps)

    def suspect(self, when: float) -> None:
        """The tracer saw an entry go bad at ``when`` (monotonic)."""
        with self._lock:
            if self._suspected_at is None or when > self._suspected_at:
                self._suspected_at = when

    def listening(self, maps: Collection[int]) -> bool:
        """Whether the check must listen while ``maps`` (ids) are the audited maps."""
        if self.mode == "always":
            return True
        with self._lock:
            if self._proven_at is None:
                return True
            if self._suspected_at is not None and self._suspected_at >= self._proven_at:
                return True
            return not set(maps) <= self._proven_maps
