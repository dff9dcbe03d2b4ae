"""What each finding kind means to the rest of sockguard, in one table.

Why one table: whether a kind is bad (exit status 1), deletable, exported as
``sockguard_findings{kind}``, shown in the daemon's STATUS line and alerted on
used to be decided in each consumer separately, and the lists drifted apart
(``recvpath`` failed the CLI but was invisible to metrics, STATUS and alerts).
Every consumer now derives its list from ``POLICY``; the tests check the
Prometheus rules in ``packaging/prometheus/sockguard.rules.yml`` against it.

Severity follows what the operator has to do about it: a kind whose
connection hangs *now* pages (``critical``); a kind that only endangers the
next connection reusing a tuple can wait (``warning``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sockguard.core.model import Finding, Kind


@dataclass(frozen=True)
class KindPolicy:
    """How sockguard treats one finding kind.

    ``deletable``: remediation deletes a confirmed, re-verified finding.
    ``deletable_if_unproven``: deleted only when the operator opted in
    (``--delete-unproven``, ``remediation.delete_unproven``) and only while the
    entry's socket is unknown — deleting a valid entry costs acceleration
    only, but sockguard does not do it unasked.  ``shown``: counted in the
    daemon's STATUS line and per-cycle summary log.
    """

    kind: Kind
    bad: bool
    deletable: bool
    deletable_if_unproven: bool
    exported: bool
    shown: bool
    alert: str | None
    severity: str | None
    meaning: str


WARNING = "warning"
CRITICAL = "critical"

POLICY: dict[Kind, KindPolicy] = {p.kind: p for p in (
    KindPolicy(Kind.OK, bad=False, deletable=False, deletable_if_unproven=False,
               exported=False, shown=False, alert=None, severity=None,
               meaning="a live socket owns the key's tuple (and the entry points to it)"),
    KindPolicy(Kind.STALE, bad=True, deletable=True, deletable_if_unproven=False,
               exported=True, shown=True, alert="SockguardStaleEntries", severity=WARNING,
               meaning="no live socket owns the tuple: the next connection reusing it hangs"),
    KindPolicy(Kind.SHADOWING, bad=True, deletable=True, deletable_if_unproven=False,
               exported=True, shown=True, alert="SockguardShadowingEntry", severity=CRITICAL,
               meaning="the entry points to another socket than the live owner: the owner's "
                       "connection hangs now"),
    KindPolicy(Kind.PROXY, bad=False, deletable=False, deletable_if_unproven=False,
               exported=True, shown=False, alert=None, severity=None,
               meaning="an L7-proxy redirect entry, judged by its client socket only"),
    KindPolicy(Kind.RECVPATH, bad=True, deletable=False, deletable_if_unproven=True,
               exported=True, shown=True, alert="SockguardRecvpathEntry", severity=CRITICAL,
               meaning="the live owner reads with tcp_recvmsg although its key is in the "
                       "map: its peer's payload never reaches it, the connection hangs now"),
)}

#: Findings that endanger a connection: confirmed by a second look, exit status 1.
BAD_KINDS = frozenset(k for k, p in POLICY.items() if p.bad)
#: Deleted by ``clean --apply`` and remediation once re-verified.
DELETABLE_KINDS = frozenset(k for k, p in POLICY.items() if p.deletable)
#: Deleted only with ``--delete-unproven`` / ``remediation.delete_unproven``.
UNPROVEN_DELETABLE_KINDS = frozenset(k for k, p in POLICY.items() if p.deletable_if_unproven)
#: Every kind that can ever be deleted: the ``kind`` labels of ``sockguard_deletions_total``.
DELETED_KINDS = tuple(k for k, p in POLICY.items() if p.deletable or p.deletable_if_unproven)
#: The ``kind`` labels of ``sockguard_findings``, in table order.
EXPORTED_KINDS = tuple(k for k, p in POLICY.items() if p.exported)
#: Counted in the STATUS line and summary log, in table order.
SHOWN_KINDS = tuple(k for k, p in POLICY.items() if p.shown)
#: kind -> (alert name, severity) of the Prometheus rule that fires on it.
ALERTED: dict[Kind, tuple[str, str]] = {
    k: (p.alert, p.severity) for k, p in POLICY.items()
    if p.alert is not None and p.severity is not None
}


def deletable_kinds(delete_unproven: bool) -> frozenset[Kind]:
    """The kinds remediation may delete, with or without the operator's opt-in."""
    return DELETABLE_KINDS | UNPROVEN_DELETABLE_KINDS if delete_unproven else DELETABLE_KINDS


def unproven(f: Finding) -> bool:
    """True when nothing identified the entry's own socket.

    Then the entry may well point to another socket (the usual cause of a
    ``recvpath`` finding) but sockguard cannot show it; where a cookie or an
    exact tuple lookup did identify it, the entry belongs to its owner and a
    delete would only hide an inconsistent kernel state.
    """
    return (f.details.get("verified_by_cookie") is False
            and f.details.get("verified_by_tuple") is not True)


__all__ = ["ALERTED", "BAD_KINDS", "CRITICAL", "DELETABLE_KINDS", "DELETED_KINDS",
           "EXPORTED_KINDS", "POLICY", "SHOWN_KINDS", "UNPROVEN_DELETABLE_KINDS", "WARNING",
           "KindPolicy", "deletable_kinds", "unproven"]
