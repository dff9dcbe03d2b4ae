"""The kernel-side filter's ``watched`` set, kept equal to the audited maps' keys.

In the daemon the receive-path and lifecycle objects look the socket's filter
key (``layout.FILTER_KEY``: its tuple as its peer sees it) up in ``watched``
(behind ``watched_bits``, one bit per key hash) before they report anything;
an event of a socket whose key is not watched yet is parked in ``pending``.
:class:`MapWatch` answers "which audited maps hold this key", lists their
keys and turns them into filter keys whatever the maps' layout;
:class:`WatchedKeys` brings ``watched`` up to date from such a walk, or from
the keys an audit just walked, and releases the events parked under each
added key.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence

from sockguard.core.errors import SockguardError
from sockguard.core.layout import CILIUM, FILTER_KEY, KeyLayout, filter_key, key_for_socket
from sockguard.core.model import MapInfo, Tuple4
from sockguard.kernel import libbpf
from sockguard.kernel import maps as maps_adapter
from sockguard.kernel.bpf_object import CStruct
from sockguard.kernel.libbpf import BpfError
from sockguard.kernel.sockmap_iter import KeyReader, iterator_available
from sockguard.trace.events import EVENT

log = logging.getLogger(__name__)

#: Capacity of ``watched`` (SG_WATCHED_MAX): keys beyond it are not watched.
WATCHED_MAX = 262144
#: Objects with the ``watched`` and ``watched_bits`` maps (shared) and a ``pending`` map.
FILTERED_OBJECTS = ("trace_recvpath", "trace_lifecycle", "trace_reset")
#: struct sg_parked, one per slot of ``pending`` (2**PENDING_BITS slots).
PARKED = CStruct("sg_parked", "=44sBBBBQQQIIH2xIi16sI",
                 "key type state_old state_new source ts_ns cookie aux netns pid family check "
                 "ret comm epoch")
PARKED_SIZE = PARKED.size
PENDING_BITS = 13
#: ``watched_bits``: one bit per key hash, 2**WATCHED_BITS bits (SG_WATCHED_BITS).
WATCHED_BITS = 17
#: struct sg_tuple_key (``FILTER_KEY``'s layout) as the words ``sg_key_hash`` mixes.
_KEY_WORDS = CStruct("sg_tuple_key", "<4I4IB3xII", "sip dip family sport dport")


def key_hash(key: bytes) -> int:
    """The 32-bit hash of a filter key: ``sg_key_hash`` in bpf/sockguard_trace.h."""
    w: tuple[int, ...] = _KEY_WORDS.unpack(key)
    mask, gold = 0xFFFFFFFF, 0x9E3779B1
    h = w[0] ^ w[1] ^ w[2] ^ w[3]
    h = ((h * gold) & mask) ^ (w[4] ^ w[5] ^ w[6] ^ w[7])
    h = ((h * gold) & mask) ^ ((w[9] | (w[10] << 16) | w[8]) & mask)
    return (h * gold) & mask


def pending_slot(key: bytes) -> int:
    """The ``pending`` slot of a filter key (the slot ``sg_park`` writes)."""
    return key_hash(key) >> (32 - PENDING_BITS)


def watched_bit(key: bytes) -> int:
    """The bit of a filter key in ``watched_bits`` (``sg_watched``)."""
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

    def filter_keys(self, keys: dict[bytes, int]) -> dict[bytes, int]:
        """The audited maps' ``keys`` (key -> map id) as the kernel-side filter keys
        sockets (``FILTER_KEY``); keys this layout cannot decode are left out."""
        if self.layout == FILTER_KEY:
            return keys
        out: dict[bytes, int] = {}
        for key, map_id in keys.items():
            fk = filter_key(self.layout, key)
            if fk is not None:
                out.setdefault(fk, map_id)
        return out

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


#: Without an offer for this many of the usual gaps between them (an audit hangs or
#: fails), the tracer walks the maps itself again.
OFFER_GRACE = 1.5


def own_walk_period(interval: float, budget: float, walk_seconds: float | None,
                    offer_gap: float | None) -> float:
    """Seconds from a refresh of the watched set to the tracer's next own walk of the maps.

    Own walks fill the time between the audit's walks (offers), every ``interval``
    at most and within ``budget`` of the tracer thread's time (``walk_seconds`` is
    what the last one cost; the period is that cost's, so cheap offers do not
    shorten it).  Where that budget allows an own walk less than twice per offer
    gap, the own walk mostly repeats a walk the next audit makes anyway: at 65,535
    keys and a 10 s interval the two periods are equal, and whichever came first
    decided whether the tracer walked the maps every 10 s too (~1 % of a core)
    or never.  Then the tracer waits for the offers and walks itself only after
    ``OFFER_GRACE`` gaps without one.
    """
    period = interval
    if walk_seconds is not None:
        period = max(period, walk_seconds / max(budget, 1e-3))
    if offer_gap is not None and 2 * period > offer_gap:
        period = max(period, OFFER_GRACE * offer_gap)
    return period


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
                 pending_fds: Sequence[int], interval: float = 1.0,
                 budget: float = 0.01) -> None:
        self.watch = watch
        self.fd = watched_fd
        self.bits_fd = bits_fd
        self.bits = WatchedBits()
        self.pending_fds = list(pending_fds)
        self.interval = interval  # shortest period between refreshes
        self.budget = budget  # the share of the tracer thread's time a walk may take
        self.keys: dict[bytes, int] = {}
        self.due = 0.0
        self.refreshes = 0
        self.last_seconds = 0.0
        self.overflow = 0
        self.epoch = 0
        self._prev_start_ns: int | None = None
        self.walks = 0  # refreshes that walked the maps themselves
        self.walk_seconds = 0.0  # how long the last own walk took
        self.offer_gap: float | None = None  # seconds between the last two offered walks
        self._prev_offer_ns: int | None = None
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
        fresh = self.has_fresh_offer()
        offer, self._offer = self._offer, None
        if offer is None or not fresh:
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
                self.due = start + self.interval
                return []
        new = self.watch.filter_keys(new)
        old = self.keys
        gone = old.keys() - new.keys()
        for key in gone:
            try:
                libbpf.map_delete(self.fd, key)
            except BpfError as exc:
                log.debug("tracer: watched delete: %s", exc)
            del old[key]
            self.bits.discard(key)
        added: list[bytes] = []
        for key in new.keys() - old.keys():
            map_id = new[key]
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
        else:
            if self._prev_offer_ns is not None and start_ns > self._prev_offer_ns:
                self.offer_gap = (start_ns - self._prev_offer_ns) / 1e9
            self._prev_offer_ns = start_ns
        # the first walk loads the iterator and fills the whole set: no measure of the rest
        self.due = end + own_walk_period(self.interval, self.budget,
                                         self.walk_seconds if self.walks > 1 else None,
                                         self.offer_gap)
        return parked
