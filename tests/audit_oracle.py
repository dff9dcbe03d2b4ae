"""The audit the plain way: one ``MapEntry`` at a time through the one classifier.

Production reads every map as records (``audit.audit_records``: the entry
sources' records, or ``rows.syscall_record`` for a map read with syscalls),
which recognises the common ``ok`` on compact keys before building anything.
This oracle builds every entry and finding and asks ``audit._classify`` for
each, so tests can state rules on readable values and check that the fast path
reaches the same verdicts (tests/test_rows.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sockguard.core.audit import (
    AuditPolicy,
    AuditResult,
    NoVerdict,
    SocketIndex,
    _classify,
    finding_of,
)
from sockguard.core.model import Finding, Kind, LiveSocket, MapEntry, MapInfo


@dataclass
class Verdict:
    """What the rules say about one entry before any confirmation."""

    kind: Kind | None  # None: in handshake (or unverified), no verdict yet
    reason: str
    socket: LiveSocket | None = None
    details: dict[str, object] = field(default_factory=dict)


def judge(entry: MapEntry, index: SocketIndex, policy: AuditPolicy) -> Verdict:
    """The classification rules applied to one decoded entry."""
    return Verdict(*_classify(entry, index, policy))


def audit_map(
    info: MapInfo,
    entries: Sequence[MapEntry],
    index: SocketIndex,
    policy: AuditPolicy,
    undecodable: Sequence[str] = (),
) -> AuditResult:
    """Every entry of one map classified, each finding built."""
    findings: list[Finding] = []
    pending = unverified = 0
    for entry in entries:
        found = finding_of(info, entry, index, policy)
        if isinstance(found, Finding):
            findings.append(found)
        elif found is NoVerdict.UNVERIFIED:
            unverified += 1
        else:
            pending += 1
    return AuditResult(info, len(entries) + len(undecodable), findings, pending,
                       list(undecodable), unverified=unverified)
