"""Runs the audit on this node: reads maps and sockets, hands them to the core.

This is the glue between the kernel adapters (maps, sockmap iterator,
sockets) and the pure audit core.  One *look* reads every map first and the
sockets second, so a connection that opens during the look has its socket
seen; a look's stale and shadowing verdicts are then confirmed by a second,
independent look (``audit.confirm``) before anyone calls them findings.

The sockets come from the ``iter/tcp`` iterator where it loads (it also
reports each socket's receive path) and from sock_diag otherwise
(``socket_source``); remediation re-verifies with sock_diag either way.
Which socket each entry of a 4-byte-value map points to comes from the
sockmap iterator, or where that cannot load from the tc lookup
(:mod:`sockguard.sockhash_lookup`), or from nowhere (``entry_source``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from . import maps as maps_adapter
from .audit import AuditPolicy, AuditResult, SocketIndex, audit_map, audit_records
from .compact import Interner, Record, entry_cookie, gc_paused, maker
from .errors import LayoutMismatchError, LibbpfMissingError, MapGoneError, SockguardError
from .layout import KeyDecodeError, KeyLayout, decode
from .libbpf import BpfError
from .model import Finding, MapEntry, MapInfo, Netns
from .owners import find_owners
from .sockets import Scan, scan_all
from .sockhash_lookup import TUPLE_PROGRAM, lookup_available, lookup_exactness
from .sockhash_lookup import read_records as lookup_records
from .sockmap_iter import cookies_need_scan_first, iterator_available, read_records, target_socket
from .tcp_iter import read_tcp, tcp_iterator_available

log = logging.getLogger(__name__)

_new_entry = maker(MapEntry)

#: ``--socket-source`` choices: where a look reads the live sockets from.
SOCKET_SOURCES = ("auto", "iterator", "sock_diag")
#: ``--entry-source`` choices: where a look learns which socket each entry points to.
ENTRY_SOURCES = ("auto", "iterator", "tc_lookup", "syscall")


@dataclass
class MapRead:
    """The decoded entries of one map, read at one moment."""

    info: MapInfo
    entries: list[MapEntry]
    undecodable: list[str]
    source: str  # "iterator" or "syscall" (see EntrySource)


@dataclass
class NodeAudit:
    """A confirmed audit of several maps against all namespaces."""

    results: list[AuditResult]
    namespaces: list[Netns]
    sockets: int
    vanished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sources: dict[int, str] = field(default_factory=dict)
    duration: float = 0.0
    socket_source: str = "sock_diag"  # "iterator" (iter/tcp) or "sock_diag"
    exactness: dict[int, str] = field(default_factory=dict)  # per map, see EntrySource
    entry_source: EntrySource | None = None

    @property
    def bad(self) -> list[Finding]:
        return [f for r in self.results for f in r.bad]


@dataclass(frozen=True)
class EntrySource:
    """Where a look learns which socket each entry of a 4-byte-value map points to.

    ``exactness``: ``cookie`` (the entry's socket is identified by its cookie),
    ``tuple`` (by its tuple and state only) or ``none`` (not at all: shadowing
    cannot be told from ok).  ``scan_first``: the source reads the socket's
    cookie field, which is 0 until generated, so the sockets are scanned
    (sock_diag generates every listed socket's cookie) before the map is read.
    """

    name: str  # "iterator", "tc_lookup" or "syscall"
    exactness: str
    scan_first: bool
    reason: str


def entry_source(requested: str = "auto") -> EntrySource:
    """The entry source a look uses: the one ``requested``, or with ``auto`` the best here.

    ``auto`` prefers the sockmap iterator, then the tc lookup, then the
    syscalls alone (which say nothing about the entry's socket, and the
    audit says so).  Asking for a source this kernel refuses is an error
    with the probe's reason, never a silent downgrade.
    """
    if requested not in ENTRY_SOURCES:
        raise SockguardError(f"unknown entry source {requested!r}; one of "
                             f"{', '.join(ENTRY_SOURCES)}")
    why_not: list[str] = []
    if requested in ("auto", "iterator"):
        ok, why = iterator_available()
        if ok:
            return EntrySource("iterator", "cookie", cookies_need_scan_first(), why)
        if requested == "iterator":
            raise SockguardError(f"--entry-source iterator: {why}")
        why_not.append(f"iter/sockmap: {why}")
    if requested in ("auto", "tc_lookup"):
        ok, why = lookup_available()
        if ok:
            exact = lookup_exactness() or "tuple"
            return EntrySource("tc_lookup", exact, exact == "cookie", why)
        if requested == "tc_lookup":
            raise SockguardError(f"--entry-source tc_lookup: {why}")
        why_not.append(f"tc lookup: {why}")
    reason = "syscalls only (--entry-source syscall)" if requested == "syscall" else (
        "no entry source can run here (" + "; ".join(why_not) + ")")
    return EntrySource("syscall", "none", False, reason)


def read_map(info: MapInfo, layout: KeyLayout, use_iterator: bool = True,
             interner: Interner | None = None) -> MapRead:
    """Every key of a map, decoded, with the socket cookie behind it where knowable.

    An 8-byte value is the socket cookie (sock_map_lookup_sys); a Cilium map
    has 4-byte values, whose lookup fails with ENOSPC, so there only a BPF
    program (the sockmap iterator, or the tc lookup) can tell which socket an
    entry points to.  ``interner`` shares address and tuple objects with the
    rest of a look.
    """
    layout.check_map(info.key_size, info.name)
    entries: list[MapEntry] = []
    undecodable: list[str] = []
    interner = interner if interner is not None else Interner()
    append = entries.append
    with maps_adapter.open_map(info) as handle, gc_paused():
        if info.value_size != 8 and use_iterator and iterator_available()[0]:
            records = read_records(handle.fd, info.key_size)
            keys: list[bytes] = list(records)
            source = "iterator"
        else:
            records = {}
            keys = list(handle.keys())
            source = "syscall"
        for raw in keys:
            try:
                key = decode(layout, raw, interner)
            except KeyDecodeError as exc:
                undecodable.append(f"{raw.hex()}: {exc}")
                continue
            rec = records.get(raw)
            if rec is not None:
                target = target_socket(rec, interner)
                append(_new_entry(raw.hex(), key, entry_cookie(rec), target))
            else:
                append(_new_entry(raw.hex(), key, handle.lookup_cookie(raw), None))
    return MapRead(info, entries, undecodable, source)


def read_entry_records(info: MapInfo, source: EntrySource) -> dict[bytes, Record]:
    """Each key of a 4-byte-value map with the socket it points to, from ``source``."""
    with maps_adapter.open_map(info) as handle:
        if source.name == "iterator":
            return read_records(handle.fd, info.key_size)
        keys = list(handle.keys())
        program = TUPLE_PROGRAM if source.exactness == "tuple" else None
        return lookup_records(handle.fd, info.key_size, keys, program)


def scan_sockets(socket_source: str = "auto") -> tuple[Scan, str]:
    """The live sockets of every namespace, and which source gave them.

    ``auto`` takes iter/tcp where it loads and falls back to sock_diag (with a
    warning when the iterator fails after loading); ``iterator`` insists.
    """
    if socket_source not in SOCKET_SOURCES:
        raise SockguardError(f"unknown socket source {socket_source!r}")
    if socket_source != "sock_diag":
        ok, why = tcp_iterator_available()
        if ok:
            try:
                return read_tcp(), "iterator"
            except (BpfError, LibbpfMissingError) as exc:
                if socket_source == "iterator":
                    raise SockguardError(f"the tcp iterator failed: {exc}") from exc
                log.warning("tcp iterator failed, reading sockets with sock_diag: %s", exc)
        elif socket_source == "iterator":
            raise SockguardError(f"--socket-source iterator: {why}")
    return scan_all(compact=True), "sock_diag"


@dataclass
class _Look:
    """One look's classified maps and what it saw."""

    results: list[AuditResult]
    namespaces: list[Netns]
    sockets: int
    vanished: list[str]
    sources: dict[int, str]
    exactness: dict[int, str]
    socket_source: str


def _look(
    maps: Sequence[MapInfo], layout: KeyLayout, policy: AuditPolicy, source: EntrySource,
    skipped: list[str] | None = None, socket_source: str = "auto",
) -> _Look:
    """Read every map, then the sockets of every namespace, then classify."""
    reads: list[MapRead | tuple[MapInfo, dict[bytes, Record]]] = []
    interner = Interner()
    sources: dict[int, str] = {}
    exactness: dict[int, str] = {}
    with gc_paused():
        if source.scan_first:  # gives every live socket its cookie before the map is read
            scan, sock_source = scan_sockets("sock_diag")
        for info in maps:
            try:
                if info.value_size != 8 and source.name != "syscall":
                    # records stay compact until a finding needs them
                    layout.check_map(info.key_size, info.name)
                    reads.append((info, read_entry_records(info, source)))
                    sources[info.id], exactness[info.id] = source.name, source.exactness
                else:
                    reads.append(read_map(info, layout, False, interner))
                    sources[info.id] = "syscall"
                    exactness[info.id] = "cookie" if info.value_size == 8 else "none"
            except (LayoutMismatchError, MapGoneError) as exc:
                if skipped is None:
                    raise
                skipped.append(str(exc))
        if not source.scan_first:
            scan, sock_source = scan_sockets(socket_source)
        index = SocketIndex.from_table(scan.table, interner)
        results: list[AuditResult] = []
        for r in reads:
            if isinstance(r, MapRead):
                results.append(audit_map(r.info, r.entries, index, policy, r.undecodable))
            else:
                info, records = r
                results.append(audit_records(info, layout, records.values(), index, policy))
    return _Look(results, scan.namespaces, index.count, scan.vanished, sources, exactness,
                 sock_source)


def _with_owners(findings: list[Finding]) -> list[Finding]:
    inodes = {f.socket.inode for f in findings if f.socket is not None}
    owners = find_owners(inodes)
    return [
        replace(f, owner=owners.get(f.socket.inode)) if f.socket is not None else f
        for f in findings
    ]


def with_owners(audit: NodeAudit) -> None:
    """Name the process of every finding's socket, ``ok`` ones included (``--all``).

    ``run_audit`` does it for bad findings only: building every ``ok``
    finding and reading every process's fds costs seconds on a large node.
    """
    for r in audit.results:
        r.findings = _with_owners(r.findings)


def run_audit(
    maps: Sequence[MapInfo],
    layout: KeyLayout,
    policy: AuditPolicy,
    confirm_delay: float = 0.2,
    use_iterator: bool = True,
    tolerate_skips: bool = False,
    socket_source: str = "auto",
    entry_source_name: str | EntrySource = "auto",
) -> NodeAudit:
    """Audit ``maps``; stale, shadowing and recvpath verdicts are confirmed by a second look.

    With ``tolerate_skips`` (discovered maps) a map that does not fit the
    layout or vanished is noted in ``skipped``; otherwise it is an error.
    ``socket_source`` is one of ``SOCKET_SOURCES``, ``entry_source_name`` one
    of ``ENTRY_SOURCES`` (``use_iterator=False`` means ``syscall``) or an
    :class:`EntrySource` itself (tests force the tuple-only tc lookup so).
    """
    start = time.monotonic()
    skipped: list[str] = []
    if isinstance(entry_source_name, EntrySource):
        source = entry_source_name
    else:
        source = entry_source(entry_source_name if use_iterator else "syscall")
    first = _look(maps, layout, policy, source, skipped if tolerate_skips else None,
                  socket_source)
    results = first.results
    if any(r.bad for r in results):
        time.sleep(confirm_delay)
        checked = [r.map for r in results]
        try:
            second = _look(checked, layout, policy, source, [], socket_source).results
        except SockguardError as exc:
            log.warning("second look failed, nothing confirmed: %s", exc)
            second = []
        by_id = {r.map.id: r for r in second}
        for r in results:
            again = by_id.get(r.map.id)
            r.confirm_bad(again.bad if again else [])
    for r in results:
        bad = r.bad
        if bad:
            r.substitute({id(f): g for f, g in zip(bad, _with_owners(bad), strict=True)})
    return NodeAudit(results, first.namespaces, first.sockets, first.vanished, skipped,
                     first.sources, time.monotonic() - start, first.socket_source,
                     first.exactness, source)
