"""Rendering: human tables and the stable JSON documents.

The JSON shape is documented in README.md ("JSON output") and versioned by
``SCHEMA_VERSION``; fields are only ever added.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sockguard.core.escape import printable
from sockguard.core.model import Finding, Kind, LiveSocket, MapInfo
from sockguard.core.tcp_states import TCP_STATE_NAMES
from sockguard.kernel.node_audit import NodeAudit
from sockguard.kernel.remediation import Deletion

SCHEMA_VERSION = 1


def _socket(sock: LiveSocket | None) -> dict[str, Any] | None:
    if sock is None:
        return None
    return {
        "local": str(sock.tuple.local),
        "remote": str(sock.tuple.remote),
        "state": TCP_STATE_NAMES.get(sock.state, str(sock.state)),
        "cookie": sock.cookie,
        "inode": sock.inode,
        "netns": {"inode": sock.netns.ino, "name": sock.netns.name},
        "recv_path": sock.recv_path,
    }


def finding_dict(f: Finding) -> dict[str, Any]:
    return {
        "kind": f.kind.value,
        "key_hex": f.entry.key_hex,
        "key": f.entry.key.as_dict(),
        "map": f.map.as_dict(),
        "confirmed": f.confirmed,
        "reason": f.reason,
        "entry_cookie": f.entry.cookie,
        "socket": _socket(f.socket),
        "owner": None if f.owner is None else {
            "pid": f.owner.pid, "comm": f.owner.comm, "container": f.owner.container,
            "pod_uid": f.owner.pod_uid, "pod": f.owner.pod,
        },
        "details": f.details,
    }


def map_dict(info: MapInfo) -> dict[str, Any]:
    return {
        "id": info.id, "name": info.name, "path": info.path, "type": info.map_type,
        "key_size": info.key_size, "value_size": info.value_size,
        "max_entries": info.max_entries,
        "programs": None if info.programs is None else list(info.programs),
    }


def audit_json(audit: NodeAudit, include_ok: bool = False) -> str:
    maps: list[dict[str, Any]] = []
    findings: list[dict[str, Any]] = []
    for r in audit.results:
        maps.append({
            **map_dict(r.map),
            "entries": r.entries,
            "source": audit.sources.get(r.map.id),
            "exactness": audit.exactness.get(r.map.id),
            "counts": {k.value: r.count(k) for k in Kind},
            "pending": r.pending,
            "unverified": r.unverified,
            "undecodable": r.undecodable,
        })
        findings.extend(finding_dict(f) for f in r.reported(include_ok))
    doc = {
        "version": SCHEMA_VERSION,
        "maps": maps,
        "findings": findings,
        "sockets": audit.sockets,
        "namespaces": [{"inode": n.ino, "name": n.name} for n in audit.namespaces],
        "vanished_namespaces": audit.vanished,
        "unreadable_namespaces": audit.unreadable,
        "unseen_namespaces": [{"inode": ino, "entries": n}
                              for ino, n in sorted(audit.unseen.items())],
        "complete": audit.complete,
        "skipped_maps": audit.skipped,
        "duration_seconds": round(audit.duration, 4),
        "socket_source": audit.socket_source,
        "entry_source": None if audit.entry_source is None else {
            "name": audit.entry_source.name, "exactness": audit.entry_source.exactness,
            "reason": audit.entry_source.reason},
    }
    return json.dumps(doc, indent=2, sort_keys=True)


#: What each exactness of the entry source means, for the text report.
EXACTNESS_TEXT = {
    "cookie": "identified by socket cookie",
    "tuple": "identified by tuple and state (no cookie on this kernel)",
    "none": "unknown: shadowing cannot be told from ok on this map",
}


def _table(rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return ""
    rows = [[printable(cell) for cell in row] for row in rows]  # comm, paths: see escape.py
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _finding_row(f: Finding) -> list[str]:
    endangered = "-"
    if f.socket is not None:
        endangered = f"{f.socket.tuple} netns={f.socket.netns}"
    owner = str(f.owner) if f.owner else "-"
    return [f.kind.value, f"{f.map.name}#{f.map.id}", f"IPv{f.entry.key.family}",
            str(f.entry.key), endangered, owner]


def audit_text(audit: NodeAudit, include_ok: bool = False) -> str:
    lines = []
    for r in audit.results:
        counts = ", ".join(f"{r.count(k)} {k.value}" for k in Kind)
        lines.append(printable(
            f"map {r.map.name} (id {r.map.id}{', ' + r.map.path if r.map.path else ''}): "
            f"{r.entries} entries: {counts}; {r.pending} in handshake"
            + (f"; {r.unverified} unverified" if r.unverified else "")
        ))
        lines.extend(f"  undecodable key {u}" for u in r.undecodable)
        exact = audit.exactness.get(r.map.id)
        if exact is not None:
            lines.append(f"  entries' sockets: {EXACTNESS_TEXT[exact]} "
                         f"(via {audit.sources.get(r.map.id)})")
    via = "iter/tcp" if audit.socket_source == "iterator" else audit.socket_source
    if audit.socket_source == "none":
        lines.append("no socket scan needed: every entry was judged healthy in the kernel by "
                     f"its own socket ({audit.duration:.2f} s)" if audit.results else
                     f"nothing to scan ({audit.duration:.2f} s)")
    else:
        lines.append(f"{audit.sockets} TCP sockets in {len(audit.namespaces)} network "
                     f"namespace(s) via {via} ({audit.duration:.2f} s)")
    lines.extend(printable(f"skipped map: {s}") for s in audit.skipped)
    lines.extend(f"namespace vanished during the scan: {v}" for v in audit.vanished)
    lines.extend(f"namespace could not be read: {u}" for u in audit.unreadable)
    lines.extend(f"{n} entries' sockets live in netns {ino}, which no scan read"
                 for ino, n in sorted(audit.unseen.items()))
    if not audit.complete:
        lines.append(f"INCOMPLETE: not every namespace could be seen; {audit.unverified} "
                     "entries without an owner in the namespaces read were not called stale "
                     "(their sockets are unknown), and nothing is deleted for an absence")
    shown = [f for r in audit.results for f in r.reported(include_ok)]
    if shown:
        header = ["KIND", "MAP", "FAMILY", "KEY sip:sport -> dip:dport", "LIVE SOCKET", "PROCESS"]
        lines.append("")
        lines.append(_table([header, *(_finding_row(f) for f in shown)]))
        for f in shown:
            if f.kind is not Kind.OK:
                lines.append(printable(f"  {f.kind.value} {f.entry.key}: {f.reason}"))
    elif not audit.results:
        lines.append("no sockhash maps on this node to audit "
                     "(none pinned under the bpffs, none loaded under the discovered names)")
    else:
        lines.append("no stale, shadowing or recvpath entries")
    return "\n".join(lines)


def _programs_text(programs: tuple[str, ...] | None) -> str:
    if programs is None:
        return "? (kernel cannot list)"
    return ",".join(programs) or "-"


def maps_text(maps: Sequence[MapInfo], counts: dict[int, int | None],
              bpffs: str = "/sys/fs/bpf", names: Sequence[str] = ("cilium_sock_ops",)) -> str:
    if not maps:
        return printable(f"no sockhash or sockmap maps found (pinned under {bpffs} or named "
                         f"{' or '.join(names) or '-'})")
    header = ["ID", "NAME", "TYPE", "KEY", "VALUE", "ENTRIES", "MAX", "PATH", "PROGRAMS"]
    rows = [[str(m.id), m.name, m.map_type, str(m.key_size), str(m.value_size),
             "?" if counts.get(m.id) is None else str(counts[m.id]), str(m.max_entries),
             m.path or "-", _programs_text(m.programs)] for m in maps]
    return _table([header, *rows])


def maps_json(maps: Sequence[MapInfo], counts: dict[int, int | None]) -> str:
    return json.dumps({"version": SCHEMA_VERSION,
                       "maps": [{**map_dict(m), "entries": counts.get(m.id)} for m in maps]},
                      indent=2, sort_keys=True)


def clean_json(deletions: Sequence[Deletion], applied: bool, audit: NodeAudit) -> str:
    return json.dumps({
        "version": SCHEMA_VERSION,
        "applied": applied,
        "deletions": [{**finding_dict(d.finding), "outcome": d.outcome, "outcome_reason": d.reason}
                      for d in deletions],
        "audit": json.loads(audit_json(audit)),
    }, indent=2, sort_keys=True)


def clean_text(deletions: Sequence[Deletion], applied: bool) -> str:
    if not deletions:
        return "nothing to delete"
    rows = [["OUTCOME", "KIND", "MAP", "KEY sip:sport -> dip:dport", "WHY"]]
    rows += [[d.outcome, d.finding.kind.value, f"{d.finding.map.name}#{d.finding.map.id}",
              str(d.finding.entry.key), d.reason] for d in deletions]
    tail = "" if applied else "\ndry run: nothing was deleted; add --apply to delete"
    return _table(rows) + tail
