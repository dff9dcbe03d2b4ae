"""Runs the audit on this node: reads maps and sockets, hands them to the core.

This is the glue between the kernel adapters (maps, sockmap iterator,
sockets) and the pure audit core.  One *look* reads every map first and the
sockets second, so a connection that opens during the look has its socket
seen; a look's stale and shadowing verdicts are then confirmed by a second,
independent look (``audit.confirm``) before anyone calls them findings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from . import maps as maps_adapter
from .audit import AuditPolicy, AuditResult, SocketIndex, audit_map, confirm
from .errors import LayoutMismatchError, MapGoneError, SockguardError
from .layout import KeyDecodeError, KeyLayout, decode
from .model import Finding, MapEntry, MapInfo, Netns
from .owners import find_owners
from .sockets import scan_all
from .sockmap_iter import iterator_available, read_sockmap

log = logging.getLogger(__name__)


@dataclass
class MapRead:
    """The decoded entries of one map, read at one moment."""

    info: MapInfo
    entries: list[MapEntry]
    undecodable: list[str]
    source: str  # "iterator" or "syscall"


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

    @property
    def bad(self) -> list[Finding]:
        return [f for r in self.results for f in r.bad]


def read_map(info: MapInfo, layout: KeyLayout, use_iterator: bool = True) -> MapRead:
    """Every key of a map, decoded, with the socket cookie behind it where knowable.

    An 8-byte value is the socket cookie (sock_map_lookup_sys); a Cilium map
    has 4-byte values, whose lookup fails with ENOSPC, so there only the
    sockmap iterator can tell which socket an entry points to.
    """
    layout.check_map(info.key_size, info.name)
    entries: list[MapEntry] = []
    undecodable: list[str] = []
    with maps_adapter.open_map(info) as handle:
        if info.value_size != 8 and use_iterator and iterator_available()[0]:
            targets = read_sockmap(handle.fd, info.key_size)
            keys = list(targets)
            source = "iterator"
        else:
            targets = {}
            keys = list(handle.keys())
            source = "syscall"
        for raw in keys:
            try:
                key = decode(layout, raw)
            except KeyDecodeError as exc:
                undecodable.append(f"{raw.hex()}: {exc}")
                continue
            target = targets.get(raw)
            cookie = target.cookie if target is not None else handle.lookup_cookie(raw)
            entries.append(MapEntry(raw.hex(), key, cookie, target))
    return MapRead(info, entries, undecodable, source)


def _look(
    maps: Sequence[MapInfo], layout: KeyLayout, policy: AuditPolicy, use_iterator: bool,
    skipped: list[str] | None = None,
) -> tuple[list[AuditResult], list[Netns], int, list[str], dict[int, str]]:
    reads: list[MapRead] = []
    for info in maps:
        try:
            reads.append(read_map(info, layout, use_iterator))
        except (LayoutMismatchError, MapGoneError) as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
    scan = scan_all()
    index = SocketIndex.build(scan.sockets)
    results = [audit_map(r.info, r.entries, index, policy, r.undecodable) for r in reads]
    return results, scan.namespaces, index.count, scan.vanished, {
        r.info.id: r.source for r in reads
    }


def _with_owners(findings: list[Finding]) -> list[Finding]:
    inodes = {f.socket.inode for f in findings if f.socket is not None}
    owners = find_owners(inodes)
    return [
        replace(f, owner=owners.get(f.socket.inode)) if f.socket is not None else f
        for f in findings
    ]


def run_audit(
    maps: Sequence[MapInfo],
    layout: KeyLayout,
    policy: AuditPolicy,
    confirm_delay: float = 0.2,
    use_iterator: bool = True,
    tolerate_skips: bool = False,
) -> NodeAudit:
    """Audit ``maps``; stale and shadowing verdicts are confirmed by a second look.

    With ``tolerate_skips`` (discovered maps) a map that does not fit the
    layout or vanished is noted in ``skipped``; otherwise it is an error.
    """
    start = time.monotonic()
    skipped: list[str] = []
    results, namespaces, nsock, vanished, sources = _look(
        maps, layout, policy, use_iterator, skipped if tolerate_skips else None
    )
    if any(r.bad for r in results):
        time.sleep(confirm_delay)
        checked = [r.map for r in results]
        try:
            second, *_ = _look(checked, layout, policy, use_iterator, [])
        except SockguardError as exc:
            log.warning("second look failed, nothing confirmed: %s", exc)
            second = []
        by_id = {r.map.id: r for r in second}
        for r in results:
            again = by_id.get(r.map.id)
            r.findings = confirm(r.findings, again.findings if again else [])
    for r in results:
        bad = [f for f in r.findings if f.kind.value in ("stale", "shadowing")]
        if bad:
            enriched = {id(f): g for f, g in zip(bad, _with_owners(bad), strict=True)}
            r.findings = [enriched.get(id(f), f) for f in r.findings]
    return NodeAudit(results, namespaces, nsock, vanished, skipped, sources,
                     time.monotonic() - start)
