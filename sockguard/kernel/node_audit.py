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
(:mod:`sockguard.kernel.sockhash_lookup`), or from nowhere (``entry_source``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from sockguard.core.audit import AuditPolicy, AuditResult, SocketIndex, audit_records
from sockguard.core.errors import (
    LayoutMismatchError,
    LibbpfMissingError,
    MapGoneError,
    SockguardError,
)
from sockguard.core.layout import KernelKeyForm, KeyDecodeError, KeyLayout, decode, kernel_form
from sockguard.core.model import Finding, MapInfo, Netns, Tuple4
from sockguard.core.rows import Interner, Record, gc_paused, syscall_record
from sockguard.core.tcp_states import OWNER_STATES
from sockguard.kernel import maps as maps_adapter
from sockguard.kernel.libbpf import BpfError
from sockguard.kernel.netns import enumerate_netns
from sockguard.kernel.owners import find_owners
from sockguard.kernel.sockets import Scan, lookup_tuples, scan_all
from sockguard.kernel.sockhash_lookup import TUPLE_PROGRAM, lookup_available, lookup_exactness
from sockguard.kernel.sockhash_lookup import read_judged as lookup_judged
from sockguard.kernel.sockhash_lookup import read_records as lookup_records
from sockguard.kernel.sockhash_lookup import retain as retain_readers
from sockguard.kernel.sockhash_lookup import session as lookup_session
from sockguard.kernel.sockmap_iter import (
    cookies_need_scan_first,
    iterator_available,
    read_judged,
    read_records,
    target_socket,
)
from sockguard.kernel.tcp_iter import read_tcp, tcp_iterator_available

log = logging.getLogger(__name__)

#: ``--socket-source`` choices: where a look reads the live sockets from.
SOCKET_SOURCES = ("auto", "iterator", "sock_diag")
#: ``--entry-source`` choices: where a look learns which socket each entry points to.
ENTRY_SOURCES = ("auto", "iterator", "tc_lookup", "syscall")


@dataclass
class MapRead:
    """The entries of one map read with syscalls alone, at one moment.

    ``records``: one ``rows.syscall_record`` per key, in map order (keys
    are decoded by ``audit_records``, which reports those it cannot decode).
    """

    info: MapInfo
    records: list[Record]


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
    #: namespaces that exist but could not be read, "path: reason"
    unreadable: list[str] = field(default_factory=list)
    #: netns inode -> entries whose socket lives in a namespace no scan read
    unseen: dict[int, int] = field(default_factory=dict)

    @property
    def bad(self) -> list[Finding]:
        return [f for r in self.results for f in r.bad]

    @property
    def complete(self) -> bool:
        """The audit saw every namespace it knows of, and every entry's socket's namespace.

        When not, nothing was called stale for the mere absence of an owner
        (``unverified`` entries), and ``sockguard audit`` exits 3 if nothing
        else is wrong: "nothing bad" cannot be said.
        """
        return not self.vanished and not self.unreadable and not self.unseen

    @property
    def unverified(self) -> int:
        return sum(r.unverified for r in self.results)

    @property
    def proven_healthy(self) -> bool:
        """Complete, no map skipped, and every entry of every map owned by a live socket."""
        return self.complete and not self.skipped and all(r.proven_healthy
                                                          for r in self.results)


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


def read_map(info: MapInfo, layout: KeyLayout) -> MapRead:
    """Every key of a map, with the socket cookie behind it where the syscalls tell it.

    An 8-byte value is the socket cookie (sock_map_lookup_sys); a Cilium map
    has 4-byte values, whose lookup fails with ENOSPC, so there only a BPF
    program (``read_entry_records``: the sockmap iterator, or the tc lookup)
    can tell which socket an entry points to.  This is the read for maps no
    such program reads (8-byte values, ``--entry-source syscall``).
    """
    layout.check_map(info.key_size, info.name)
    with maps_adapter.open_map(info) as handle, gc_paused():
        return MapRead(info, [syscall_record(raw, handle.lookup_cookie(raw))
                              for raw in handle.keys()])


#: Told the keys a look walked: (monotonic ns when the walk began, map id -> keys).
KeyWalks = Callable[[int, dict[int, list[bytes]]], None]


def read_entry_records(info: MapInfo, source: EntrySource, judge: KernelKeyForm | None = None,
                       only: Sequence[bytes] | None = None,
                       walked: list[bytes] | None = None,
                       ) -> tuple[dict[bytes, Record], dict[int, int]]:
    """Each key of a 4-byte-value map with the socket it points to, from ``source``.

    With ``judge`` the kernel counts the healthy entries instead of reporting
    them (bpf/entry_record.h): (records of the others, healthy entries per
    netns inode of their socket).  ``only``: the tc lookup asks for just these
    keys (it looks keys up one by one; the iterator always walks the map).
    ``walked``: where the tc lookup's full key walk is also left, for the
    tracer's watched set (``KeyWalks``).
    """
    with maps_adapter.open_map(info) as handle:
        if source.name == "iterator":
            if judge is not None:
                return read_judged(handle.fd, info.key_size, judge)
            return read_records(handle.fd, info.key_size), {}
        keys = list(handle.keys()) if only is None else list(only)
        if walked is not None and only is None:
            walked.extend(keys)
        if judge is not None:
            return lookup_judged(handle.fd, info.key_size, keys, judge)
        program = TUPLE_PROGRAM if source.exactness == "tuple" else None
        return lookup_records(handle.fd, info.key_size, keys, program), {}


def _judges(source: EntrySource, layout: KeyLayout, info: MapInfo,
            include_ok: bool) -> KernelKeyForm | None:
    """The form by which healthy entries of ``info`` are judged in the kernel on this
    look; None when they are not.

    Only a layout the programs can write (``kernel_form``), only a source that
    tells SOCK_DEAD and the receive path (iterator, tc lookup with BTF), and
    not for ``--all``, which wants every ``ok`` entry as a finding.
    """
    if (include_ok or info.key_size != layout.size or source.exactness != "cookie"
            or source.name not in ("iterator", "tc_lookup")):
        return None
    return kernel_form(layout)


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
    unreadable: list[str]
    unseen: dict[int, int]


def _unseen_namespaces(reads: Sequence[MapRead | tuple[MapInfo, dict[bytes, Record]]],
                       scanned: Sequence[Netns]) -> dict[int, int]:
    """Namespaces the entries' sockets live in that no scan read, with their entry counts.

    The map side knows each entry socket's namespace (iterator, tc lookup);
    a namespace no enumeration reaches (its names deleted while sockets in it
    live on) shows up here.
    """
    seen = {n.ino for n in scanned}
    unseen: dict[int, int] = {}
    for r in reads:
        if isinstance(r, MapRead):
            continue  # read with syscalls: nothing is known of its entries' sockets
        for rec in r[1].values():
            ino = rec[2]
            if ino and ino not in seen:
                unseen[ino] = unseen.get(ino, 0) + 1
    return unseen


def _look(
    maps: Sequence[MapInfo], layout: KeyLayout, policy: AuditPolicy, source: EntrySource,
    skipped: list[str] | None = None, socket_source: str = "auto", include_ok: bool = False,
    only: dict[int, list[bytes]] | None = None, on_walk: KeyWalks | None = None,
) -> _Look:
    """Read every map, then the sockets of every namespace, then classify.

    Where the kernel judges healthy entries (``_judges``) only the rest come up;
    when there is no rest, no socket is scanned at all: every entry was
    proven by its own socket.  ``only`` (map id -> keys): a confirming look
    of the tc lookup asks just for the keys the first look found bad.
    ``on_walk``: told every map's keys when the tc lookup walked them all.
    """
    reads: list[MapRead | tuple[MapInfo, dict[bytes, Record]]] = []
    healthy: dict[int, dict[int, int]] = {}  # map id -> netns inode -> healthy entries
    interner = Interner()
    sources: dict[int, str] = {}
    exactness: dict[int, str] = {}
    judging = any(_judges(source, layout, m, include_ok) is not None for m in maps)
    walk_start = time.monotonic_ns()
    walks: dict[int, list[bytes]] | None = (
        {} if on_walk is not None and only is None and source.name == "tc_lookup" else None)
    scan_first = source.scan_first and not judging
    with gc_paused():
        if scan_first:  # gives every live socket its cookie before the map is read
            scan, sock_source = scan_sockets("sock_diag")
        for info in maps:
            try:
                if info.value_size != 8 and source.name != "syscall":
                    # records stay compact until a finding needs them
                    layout.check_map(info.key_size, info.name)
                    walked = walks.setdefault(info.id, []) if walks is not None else None
                    records, healthy[info.id] = read_entry_records(
                        info, source, _judges(source, layout, info, include_ok),
                        None if only is None else only.get(info.id, []), walked)
                    reads.append((info, records))
                    sources[info.id], exactness[info.id] = source.name, source.exactness
                else:
                    reads.append(read_map(info, layout))
                    sources[info.id] = "syscall"
                    exactness[info.id] = "cookie" if info.value_size == 8 else "none"
            except (LayoutMismatchError, MapGoneError) as exc:
                if walks is not None:
                    walks.pop(info.id, None)
                if skipped is None:
                    raise
                skipped.append(str(exc))
        if walks is not None and on_walk is not None:
            on_walk(walk_start, walks)
        if not scan_first:
            suspicious = _suspicious_tuples(reads, layout) if judging else None
            if judging and not any(isinstance(r, MapRead) or r[1] for r in reads):
                scan, sock_source = Scan(), "none"  # nothing left to look up
            elif (suspicious is not None and suspicious.count <= TARGETED_MAX
                  and socket_source != "iterator"):  # iter/tcp asked for: its receive paths
                scan = lookup_tuples(suspicious.everywhere, placed=suspicious.placed)
                sock_source = "sock_diag lookups"
            else:
                scan, sock_source = scan_sockets(socket_source)
            if judging and source.scan_first and sock_source != "none":
                # The source reads the cookie field, which the scan has just
                # generated for every socket it listed or looked up: read the maps
                # with suspicious entries again, so that their cookies are known.
                reads = [_reread(r, source, layout, include_ok, healthy) for r in reads]
        index = SocketIndex.from_table(scan.table, interner, scan.complete)
        results: list[AuditResult] = []
        for r in reads:
            if isinstance(r, MapRead):
                results.append(audit_records(r.info, layout, r.records, index, policy))
            else:
                info, records = r
                results.append(audit_records(info, layout, records.values(), index, policy,
                                             sum(healthy.get(info.id, {}).values())))
        unseen = _unseen_namespaces(reads, scan.namespaces)
        for ino, n in _unreachable(healthy).items():
            unseen[ino] = unseen.get(ino, 0) + n
    return _Look(results, scan.namespaces, index.count, scan.vanished, sources, exactness,
                 sock_source, scan.unreadable, unseen)


#: Up to this many suspicious tuples, a look asks sock_diag for exactly them in each
#: namespace instead of dumping every socket of every namespace.
TARGETED_MAX = 256


@dataclass(frozen=True)
class Suspicious:
    """The tuples a targeted look asks for: in every namespace, or in one (by inode)."""

    everywhere: list[Tuple4]
    placed: dict[Tuple4, int]

    @property
    def count(self) -> int:
        return len(self.everywhere) + len(self.placed)


def _suspicious_tuples(reads: Sequence[MapRead | tuple[MapInfo, dict[bytes, Record]]],
                       layout: KeyLayout) -> Suspicious | None:
    """What a targeted scan must look up for the not-healthy entries; None: scan everything.

    The tuple each key describes (its owner, if any), in every namespace; and
    the entry socket's own tuple where it is connected: an L7-proxy entry is
    judged by that socket (its client), and a lookup generates the socket's
    cookie, which sources reading the cookie field then see on their second
    read.  That one is asked only in the socket's namespace where the record
    names it (the iterator does), unless it is some key's owner tuple too.
    """
    owners: dict[Tuple4, None] = {}
    targets: dict[Tuple4, int] = {}
    interner = Interner()
    for r in reads:
        if isinstance(r, MapRead):
            return None
        for raw, rec in r[1].items():
            try:
                owners[decode(layout, raw, interner).owner] = None
            except KeyDecodeError:
                continue
            target = target_socket(rec, interner)
            if target.tuple is not None and target.state in OWNER_STATES:
                targets[target.tuple] = target.netns_ino
    unplaced = [t for t, ino in targets.items() if not ino and t not in owners]
    placed = {t: ino for t, ino in targets.items() if ino and t not in owners}
    return Suspicious([*owners, *unplaced], placed)


def _reread(r: MapRead | tuple[MapInfo, dict[bytes, Record]], source: EntrySource,
            layout: KeyLayout, include_ok: bool,
            healthy: dict[int, dict[int, int]]) -> MapRead | tuple[MapInfo, dict[bytes, Record]]:
    if isinstance(r, MapRead) or not r[1]:
        return r
    info = r[0]
    try:
        records, now_healthy = read_entry_records(
            info, source, _judges(source, layout, info, include_ok),
            list(r[1]) if source.name == "tc_lookup" else None)
    except MapGoneError:
        return r  # gone since the first read: judged on what that read saw
    if source.name == "tc_lookup":  # only the suspicious keys were asked again
        for ino, n in now_healthy.items():
            healthy[info.id][ino] = healthy[info.id].get(ino, 0) + n
    else:
        healthy[info.id] = now_healthy
    return info, records


def _unreachable(healthy: dict[int, dict[int, int]]) -> dict[int, int]:
    """Healthy entries whose socket lives in a namespace no enumeration reaches.

    Judged in the kernel, they need no socket scan; but a namespace whose
    names were all deleted while sockets in it live on is worth reporting
    (inode 0: counted where the kernel's per-netns table was full).
    """
    inos: dict[int, int] = {}
    for per_map in healthy.values():
        for ino, n in per_map.items():
            inos[ino] = inos.get(ino, 0) + n
    if not inos:
        return {}
    known = {ref.netns.ino for ref in enumerate_netns()}
    return {ino: n for ino, n in inos.items() if ino not in known}


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
    include_ok: bool = False,
    on_walk: KeyWalks | None = None,
) -> NodeAudit:
    """Audit ``maps``; stale, shadowing and recvpath verdicts are confirmed by a second look.

    With ``tolerate_skips`` (discovered maps) a map that does not fit the
    layout or vanished is noted in ``skipped``; otherwise it is an error.
    ``socket_source`` is one of ``SOCKET_SOURCES``, ``entry_source_name`` one
    of ``ENTRY_SOURCES`` (``use_iterator=False`` means ``syscall``) or an
    :class:`EntrySource` itself (tests force the tuple-only tc lookup so).
    ``include_ok`` (``--all``): every ``ok`` entry becomes a finding, so the
    kernel does not judge healthy entries (the slow path).  ``on_walk``: told the
    keys of the first look's full walk (the daemon's tracer takes them instead of
    walking the maps itself).
    """
    start = time.monotonic()
    if not maps:  # nothing to audit: no program to load, no namespace to scan
        retain_readers(())  # nor any map to hold on to
        return NodeAudit([], [], 0, duration=time.monotonic() - start, socket_source="none")
    if isinstance(entry_source_name, EntrySource):
        source = entry_source_name
    else:
        source = entry_source(entry_source_name if use_iterator else "syscall")
    with lookup_session():  # the tc lookup programs stay loaded for both looks
        retain_readers({m.id for m in maps})  # an outer session (the daemon's) drops the rest
        return _run_audit(maps, layout, policy, source, start, confirm_delay, tolerate_skips,
                          socket_source, include_ok, on_walk)


def _run_audit(maps: Sequence[MapInfo], layout: KeyLayout, policy: AuditPolicy,
               source: EntrySource, start: float, confirm_delay: float, tolerate_skips: bool,
               socket_source: str, include_ok: bool,
               on_walk: KeyWalks | None = None) -> NodeAudit:
    skipped: list[str] = []
    first = _look(maps, layout, policy, source, skipped if tolerate_skips else None,
                  socket_source, include_ok, on_walk=on_walk)
    results = first.results
    if any(r.bad for r in results):
        time.sleep(confirm_delay)
        checked = [r.map for r in results]
        try:
            only = ({r.map.id: [bytes.fromhex(f.entry.key_hex) for f in r.bad]
                     for r in results} if source.name == "tc_lookup" else None)
            second = _look(checked, layout, policy, source, [], socket_source,
                           include_ok, only).results
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
    audit = NodeAudit(results, first.namespaces, first.sockets, first.vanished, skipped,
                      first.sources, time.monotonic() - start, first.socket_source,
                      first.exactness, source, first.unreadable, first.unseen)
    if not audit.complete:
        log.warning("incomplete audit: %d namespace(s) vanished, %d unreadable, %d entries' "
                    "sockets in %d namespace(s) no scan read; %d entries left unverified "
                    "(nothing is called stale for the absence of an owner)",
                    len(audit.vanished), len(audit.unreadable), sum(audit.unseen.values()),
                    len(audit.unseen), audit.unverified)
    return audit
