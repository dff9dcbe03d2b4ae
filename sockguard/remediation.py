"""Guarded deletion of stale and shadowing entries.

Deleting a valid entry only costs acceleration (its traffic falls back to
the normal stack); keeping a stale entry that collides with a live tuple
hangs a connection.  Remediation still never deletes what it has not
re-verified: only *confirmed* findings are candidates, and each one is checked
again immediately before its delete:

1. the key is still in the map (else: nothing to do);
2. when the entry's socket cookie is known from an 8-byte value, it is
   unchanged (else the key was re-inserted for a new connection);
3. an exact sock_diag lookup of the key's tuple in every namespace finds no
   live socket that owns the entry: for ``stale``, no owner at all (or, for
   an entry whose socket its process has closed, only that dead socket
   itself, still finishing its FIN exchange); for ``shadowing``, the owner is
   still not the socket the entry points to.

``recvpath`` findings are never deleted by themselves: the entry that
causes one is the shadowing entry of that key, deleted as ``shadowing`` when
the sockmap iterator shows it points elsewhere.

L7-proxy entries are never deleted: they are judged by their client side
alone, which an exact lookup cannot re-verify.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .maps import MapHandle
from .model import Finding, Kind
from .sockets import OwnerProbe

log = logging.getLogger(__name__)

DEFAULT_MAX_DELETES = 1000


@dataclass(frozen=True)
class Deletion:
    """What happened (or, in a dry run, would happen) to one finding."""

    finding: Finding
    outcome: str  # "deleted", "would-delete", "refused", "gone", "skipped-cap"
    reason: str


def reverify(handle: MapHandle, finding: Finding, probe: OwnerProbe) -> tuple[bool, str]:
    """Check ``finding`` against the kernel right now; (deletable, why)."""
    raw = bytes.fromhex(finding.entry.key_hex)
    if not handle.contains(raw):
        return False, "gone: the key is no longer in the map"
    if finding.entry.cookie is not None and handle.info.value_size == 8:
        now = handle.lookup_cookie(raw)
        if now is not None and now != finding.entry.cookie:
            return False, (f"refused: the entry now points to socket {now}, "
                           "re-inserted since the audit")
    if finding.details.get("proxy"):
        return False, "refused: L7 proxy entries are reported, not deleted"
    owner = probe.owner(finding.entry.key.owner)
    dead = finding.details.get("entry_socket_dead")
    if (finding.kind is Kind.STALE and owner is not None and dead
            and finding.entry.cookie is not None and owner.cookie == finding.entry.cookie):
        # The tuple's only full socket is the entry's own, closed by its process
        # (cookies are never reused): deleting its entry lets the peer's payload
        # reach it through TCP, which answers an orphan with a reset, as without sockops.
        return True, "verified: the entry's socket is closed (SOCK_DEAD)"
    if finding.kind is Kind.STALE and owner is not None:
        return False, f"refused: a live socket owns {owner.tuple} now (netns {owner.netns})"
    if finding.kind is Kind.SHADOWING and owner is not None and finding.entry.cookie is not None \
            and owner.cookie == finding.entry.cookie:
        return False, "refused: the entry now belongs to its live owner"
    return True, "verified"


def _log_deletion(f: Finding, outcome: str, reason: str) -> None:
    log.warning(
        "%s %s entry %s (%s) of map %s id %d: %s",
        outcome, f.kind.value, f.entry.key, f.entry.key_hex, f.map.name, f.map.id, reason,
        extra={
            "SOCKGUARD_KIND": f.kind.value,
            "SOCKGUARD_MAP_ID": f.map.id,
            "SOCKGUARD_KEY": f.entry.key_hex,
            "SOCKGUARD_TUPLE": str(f.entry.key),
            "SOCKGUARD_OUTCOME": outcome,
        },
    )


def clean(
    handle: MapHandle,
    findings: Sequence[Finding],
    probe: OwnerProbe,
    apply: bool,
    max_deletes: int = DEFAULT_MAX_DELETES,
) -> list[Deletion]:
    """Delete (or, without ``apply``, list) the confirmed bad findings of one map."""
    out: list[Deletion] = []
    done = 0
    for f in findings:
        if f.kind not in (Kind.STALE, Kind.SHADOWING) or not f.confirmed:
            continue
        if done >= max_deletes:
            out.append(Deletion(f, "skipped-cap", f"--max-deletes {max_deletes} reached"))
            continue
        ok, why = reverify(handle, f, probe)
        if not ok:
            outcome = "gone" if why.startswith("gone") else "refused"
            out.append(Deletion(f, outcome, why))
            continue
        if not apply:
            out.append(Deletion(f, "would-delete", "dry run: re-verified, not deleted"))
            done += 1
            continue
        if handle.delete(bytes.fromhex(f.entry.key_hex)):
            _log_deletion(f, "deleted", f.reason)
            out.append(Deletion(f, "deleted", f.reason))
            done += 1
        else:
            out.append(Deletion(f, "gone", "gone: removed by the kernel before our delete"))
    return out
