"""Guarded deletion of the entries the policy table (``policy.POLICY``) calls deletable.

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

``recvpath`` findings are deleted only when the operator opts in
(``clean --delete-unproven``, ``remediation.delete_unproven``), and only those
whose entry socket nothing identified (``policy.unproven``): such an entry
most likely points to another socket, as a shadowing one does, but that is not
proven, and deleting a valid entry costs only acceleration.  Right before
the delete the key must still be in the map and an exact sock_diag lookup must
still find the live owner, i.e. the hang is still there.  Without the opt-in
they are reported as refused, so ``clean`` exits 1 while they remain.  Where
the entry is known to point to its owner, deleting would only hide an
inconsistent kernel state: never deleted.

L7-proxy entries are never deleted: they are judged by their client side
alone, which an exact lookup cannot re-verify.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from sockguard.core.audit import AuditResult, normalize
from sockguard.core.errors import SockguardError
from sockguard.core.model import Finding, Kind, LiveSocket, MapInfo
from sockguard.core.policy import BAD_KINDS, UNPROVEN_DELETABLE_KINDS, deletable_kinds, unproven
from sockguard.core.rows import Interner, entry_cookie, target_socket
from sockguard.core.tcp_states import OWNER_STATES, TCP_STATE_NAMES
from sockguard.kernel.maps import MapHandle, open_map
from sockguard.kernel.sockets import OwnerProbe

log = logging.getLogger(__name__)

DEFAULT_MAX_DELETES = 1000


class Refusal(Enum):
    """Why a bad entry was not deleted, named where remediation decides it.

    The values are the ``reason`` labels of ``sockguard_deletions_refused_total``
    (dashboards and alert rules select on them), so they never change; the
    prose of ``Deletion.reason`` is for people and may.
    """

    LIVE_OWNER = "live_owner"  # a stale entry's tuple has a live owner again
    REINSERTED = "reinserted"  # the key now points to another socket than at the audit
    PROXY_ENTRY = "proxy_entry"  # L7-proxy entries are reported, never deleted
    OWNER_MATCHES = "owner_matches"  # the entry (may) point to its live owner
    UNPROVEN = "unproven"  # recvpath, without --delete-unproven
    NO_OWNER = "no_owner"  # recvpath whose owner is gone: the next audit judges it
    GONE = "gone"  # the key left the map before our delete
    CAP_REACHED = "cap_reached"  # --max-deletes / remediation.max_deletes spent
    ERROR = "error"  # the map failed (vanished, out of fds): nothing more deleted in it
    STOPPING = "stopping"  # SIGTERM: not one more delete
    INCOMPLETE = "incomplete"  # could not look everywhere: absence is no evidence
    ENTRY_SOCKET_LIVE = "entry_socket_live"  # the entry's own socket is a live owner
    OTHER = "other"  # a bad kind the policy table never deletes

    @property
    def outcome(self) -> str:
        """The ``Deletion.outcome`` this refusal is reported as (CLI text and JSON)."""
        return _OUTCOMES.get(self, "refused")


_OUTCOMES = {Refusal.GONE: "gone", Refusal.CAP_REACHED: "skipped-cap",
             Refusal.STOPPING: "skipped-stop", Refusal.ERROR: "error"}
#: Outcomes that spend the delete budget (``--max-deletes``): the ones without a refusal.
DONE_OUTCOMES = ("deleted", "would-delete")


@dataclass(frozen=True)
class Deletion:
    """What happened (or, in a dry run, would happen) to one finding."""

    finding: Finding
    #: "deleted", "would-delete", "refused", "gone", "skipped-cap", "skipped-stop", "error"
    outcome: str
    reason: str
    #: Why not deleted (None when deleted or, in a dry run, deletable).
    refusal: Refusal | None = None

    @classmethod
    def refused(cls, finding: Finding, refusal: Refusal, reason: str) -> Deletion:
        """A finding left in the map, its outcome following from ``refusal``."""
        return cls(finding, refusal.outcome, reason, refusal)


@dataclass(frozen=True)
class Verdict:
    """``recheck``'s answer: deletable (no refusal), or the refusal and why, decided together."""

    refusal: Refusal | None
    why: str

    @property
    def ok(self) -> bool:
        return self.refusal is None


def _yes(why: str) -> Verdict:
    return Verdict(None, why)


def _no(refusal: Refusal, why: str) -> Verdict:
    return Verdict(refusal, why)


_GONE = _no(Refusal.GONE, "gone: the key is no longer in the map")


def reverify(handle: MapHandle, finding: Finding, probe: OwnerProbe) -> tuple[bool, str]:
    """Check ``finding`` against the kernel right now; (deletable, why)."""
    verdict = recheck(handle, finding, probe)
    return verdict.ok, verdict.why


def recheck(handle: MapHandle, finding: Finding, probe: OwnerProbe) -> Verdict:
    """Check ``finding`` against the kernel right now, naming the refusal where it is made."""
    raw = bytes.fromhex(finding.entry.key_hex)
    if not handle.contains(raw):
        return _GONE
    if finding.entry.cookie is not None and handle.info.value_size == 8:
        now = handle.lookup_cookie(raw)
        if now is not None and now != finding.entry.cookie:
            return _no(Refusal.REINSERTED, f"refused: the entry now points to socket {now}, "
                                           "re-inserted since the audit")
    if finding.details.get("proxy"):
        return _no(Refusal.PROXY_ENTRY, "refused: L7 proxy entries are reported, not deleted")
    owner = probe.owner(finding.entry.key.owner)
    if finding.kind is Kind.RECVPATH:
        return _recvpath_verdict(finding, owner)
    dead = finding.details.get("entry_socket_dead")
    if (finding.kind is Kind.STALE and owner is not None and dead
            and finding.entry.cookie is not None and owner.cookie == finding.entry.cookie):
        # The tuple's only full socket is the entry's own, closed by its process
        # (cookies are never reused): deleting its entry lets the peer's payload
        # reach it through TCP, which answers an orphan with a reset, as without sockops.
        return _yes("verified: the entry's socket is closed (SOCK_DEAD)")
    if finding.kind is Kind.STALE and owner is not None:
        return _no(Refusal.LIVE_OWNER,
                   f"refused: a live socket owns {owner.tuple} now (netns {owner.netns})")
    if finding.kind is Kind.SHADOWING and owner is not None and finding.entry.cookie is not None \
            and owner.cookie == finding.entry.cookie:
        return _no(Refusal.OWNER_MATCHES, "refused: the entry now belongs to its live owner")
    if finding.kind is Kind.SHADOWING and owner is not None and handle.info.value_size != 8:
        return _entry_still_elsewhere(handle, raw, owner)
    if finding.kind is Kind.STALE:
        return _stale_still_proven(handle, raw, finding, probe)
    return _yes("verified")


def _recvpath_verdict(finding: Finding, owner: LiveSocket | None) -> Verdict:
    """Deletable only while the owner still hangs on a key whose entry socket nothing
    identified (see the module docstring)."""
    if not unproven(finding):
        return _no(Refusal.OWNER_MATCHES,
                   "refused: the entry belongs to its live owner, which reads with "
                   "tcp_recvmsg: deleting would hide an inconsistent kernel state")
    if owner is None:
        return _no(Refusal.NO_OWNER, f"refused: no live socket owns {finding.entry.key.owner} "
                                     "now; the next audit judges the entry again")
    return _yes(f"verified: {owner.tuple} (netns {owner.netns}) is still live and its "
                "entry socket unproven")


def _stale_still_proven(handle: MapHandle, raw: bytes, finding: Finding,
                        probe: OwnerProbe) -> Verdict:
    """No owner answered the exact lookup: is that positive evidence?

    Only if the entry's own socket, read again now, is not a live connection
    with the key's tuple (it is dead, closed, or another tuple: proof without
    any namespace), or — where the entry's socket cannot be read — if every
    namespace could be asked.  A namespace that could not be opened, or one no
    enumeration reaches, must never turn "could not look" into "absent".
    """
    try:
        now = handle.entry_socket(raw)
        known = True
    except SockguardError:
        now, known = None, False
    except OSError as exc:
        return _no(Refusal.INCOMPLETE, f"refused: could not read the entry's socket now ({exc})")
    if known:
        if now is None:
            return _GONE
        t = target_socket(now, Interner())
        key_owner = normalize(finding.entry.key.owner)
        if (not t.dead and t.tuple is not None and t.state in OWNER_STATES
                and normalize(t.tuple) == key_owner):
            where = f"netns {t.netns_ino}" if t.netns_ino else "a namespace no lookup reached"
            return _no(Refusal.ENTRY_SOCKET_LIVE, f"refused: the entry's own socket is a live "
                                                  f"connection with {key_owner} (in {where})")
        why = ("closed by its process" if t.dead else
               f"in state {TCP_STATE_NAMES.get(t.state, t.state)}" if t.state not in OWNER_STATES
               else "another tuple")
        return _yes(f"verified: the entry's own socket is {why}")
    if not probe.complete:
        return _no(Refusal.INCOMPLETE, "refused: not every namespace could be asked ("
                   + "; ".join(probe.unreadable) + ") and the entry's socket is unknown: "
                   "an absent owner is no evidence")
    return _yes("verified")


def _entry_still_elsewhere(handle: MapHandle, raw: bytes, owner: LiveSocket) -> Verdict:
    """For a shadowing entry of a 4-byte-value map: does it still point away from ``owner``?

    The audit's cookie is not enough: the key may have been deleted and
    re-inserted for the owner since (a reconnect on the same tuple).  The
    entry's current socket is read again (``MapHandle.entry_socket``); only
    positive evidence that it is another socket allows the delete.
    """
    try:
        now = handle.entry_socket(raw)
    except (SockguardError, OSError) as exc:
        return _no(Refusal.INCOMPLETE, f"refused: could not read the entry's socket now ({exc})")
    if now is None:
        return _GONE
    cookie = entry_cookie(now)
    if cookie:  # known and generated: the socket's identity
        if cookie == owner.cookie:
            return _no(Refusal.OWNER_MATCHES, "refused: the entry now belongs to its live owner")
        return _yes(f"verified: the entry points to socket {cookie}, not to the owner")
    target = target_socket(now, Interner())
    if target.tuple is not None and target.state in OWNER_STATES \
            and normalize(target.tuple) == normalize(owner.tuple):
        return _no(Refusal.OWNER_MATCHES, "refused: the entry points to a socket with the "
                                          "owner's tuple (its cookie unknown): it may be the owner")
    return _yes("verified: the entry points to a socket that is not the owner's tuple")


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
    delete_unproven: bool = False,
    stop: Callable[[], bool] | None = None,
) -> list[Deletion]:
    """Delete (or, without ``apply``, list) the confirmed bad findings of one map.

    A bad finding of a kind that may not be deleted is listed as refused, so
    that the caller sees (and ``clean`` exits 1 on) every bad entry left.
    """
    return list(_clean(handle, findings, probe, apply, max_deletes,
                       delete_unproven=delete_unproven, stop=stop).deletions)


@dataclass(frozen=True)
class MapCleaning:
    """One map's remediation: each bad finding's fate, and the error that ended it, if any.

    ``error`` is set where the failure is caught (the map could not be
    opened, or a re-check or delete failed and nothing more was tried in it),
    so callers need not read it back out of the deletions.
    """

    map: MapInfo
    deletions: tuple[Deletion, ...]
    error: str | None = None

    @property
    def spent(self) -> int:
        """Deletes done (or, in a dry run, that would be): what this map took of the budget."""
        return sum(1 for d in self.deletions if d.outcome in DONE_OUTCOMES)


def _clean(
    handle: MapHandle,
    findings: Sequence[Finding],
    probe: OwnerProbe,
    apply: bool,
    max_deletes: int,
    *,
    delete_unproven: bool,
    stop: Callable[[], bool] | None,
) -> MapCleaning:
    """``clean``, also saying which error (if any) stopped the deletes in this map."""
    out: list[Deletion] = []
    done = 0
    allowed = deletable_kinds(delete_unproven)
    failed: str | None = None  # the error that ended this map's deletes
    for f in findings:
        if f.kind not in BAD_KINDS or not f.confirmed:
            continue
        if failed is not None:
            out.append(Deletion.refused(f, Refusal.ERROR, f"not deleted: {failed}"))
            continue
        if f.kind not in allowed:
            out.append(_not_allowed(f))
            continue
        if stop is not None and stop():
            # Asked to stop (SIGTERM): not one more delete, however long the list.
            out.append(Deletion.refused(f, Refusal.STOPPING, "stopping: not deleted"))
            continue
        if done >= max_deletes:
            out.append(Deletion.refused(f, Refusal.CAP_REACHED,
                                        f"--max-deletes {max_deletes} reached"))
            continue
        try:
            d = _delete_one(handle, f, probe, apply)
        except (SockguardError, OSError) as exc:
            # The map vanished, or we ran out of fds: nothing more is deleted in it,
            # and what was deleted before stays reported.
            failed = str(exc)
            log.error("remediation of map %s id %d stopped: %s", f.map.name, f.map.id, exc,
                      extra={"SOCKGUARD_MAP_ID": f.map.id})
            d = Deletion.refused(f, Refusal.ERROR, f"not deleted: {failed}")
        if d.outcome in DONE_OUTCOMES:
            done += 1
        out.append(d)
    return MapCleaning(handle.info, tuple(out), failed)


def _not_allowed(f: Finding) -> Deletion:
    """A bad finding of a kind the policy table does not let this run delete."""
    if f.kind in UNPROVEN_DELETABLE_KINDS:
        return Deletion.refused(f, Refusal.UNPROVEN, f"refused: {f.kind.value} entries are "
                                "deleted only with --delete-unproven (remediation.delete_unproven)")
    return Deletion.refused(f, Refusal.OTHER,
                            f"refused: {f.kind.value} entries are reported, not deleted")


def _delete_one(handle: MapHandle, f: Finding, probe: OwnerProbe, apply: bool) -> Deletion:
    """Re-verify one finding and, with ``apply``, delete its key; map errors propagate."""
    verdict = recheck(handle, f, probe)
    if verdict.refusal is not None:
        return Deletion.refused(f, verdict.refusal, verdict.why)
    if not apply:
        return Deletion(f, "would-delete", "dry run: re-verified, not deleted")
    if not handle.delete(bytes.fromhex(f.entry.key_hex)):
        return Deletion.refused(f, Refusal.GONE, "gone: removed by the kernel before our delete")
    _log_deletion(f, "deleted", f.reason)
    return Deletion(f, "deleted", f.reason)


def clean_each_map(
    results: Sequence[AuditResult],
    apply: bool,
    max_deletes: int = DEFAULT_MAX_DELETES,
    *,
    delete_unproven: bool = False,
    stop: Callable[[], bool] | None = None,
    progress: Callable[[], None] | None = None,
) -> list[MapCleaning]:
    """``clean`` over every map of an audit with bad findings: one budget, one owner probe.

    The one loop that both ``sockguard clean`` and the daemon's remediation
    drive, so that they cannot differ in what they delete or how they fail.
    A map that cannot be opened any more (unloaded, out of fds) gets outcome
    ``error`` for its bad findings and its ``error`` set; the other maps go
    on.  ``stop`` (SIGTERM) ends the deletes in every map; ``progress`` is
    called after each map (the daemon's heartbeat).
    """
    out: list[MapCleaning] = []
    budget = max_deletes
    todo = [r for r in results if r.bad]
    if not todo:
        return out
    with OwnerProbe() as probe:
        for result in todo:
            cleaned = _clean_map(result, probe, apply, budget,
                                 delete_unproven=delete_unproven, stop=stop)
            budget -= cleaned.spent
            out.append(cleaned)
            if progress is not None:
                progress()
    return out


def _clean_map(result: AuditResult, probe: OwnerProbe, apply: bool, budget: int, *,
               delete_unproven: bool, stop: Callable[[], bool] | None) -> MapCleaning:
    """One map of ``clean_each_map``: open it by id (checking it is still that map), clean it."""
    try:
        with open_map(result.map) as handle:
            return _clean(handle, result.findings, probe, apply, budget,
                          delete_unproven=delete_unproven, stop=stop)
    except (SockguardError, OSError) as exc:
        log.error("remediation of map %s id %d failed: %s", result.map.name,
                  result.map.id, exc, extra={"SOCKGUARD_MAP_ID": result.map.id})
        return MapCleaning(result.map, tuple(Deletion.refused(f, Refusal.ERROR,
                                                              f"not deleted: {exc}")
                                             for f in result.bad), str(exc))


def deletions(cleaned: Sequence[MapCleaning]) -> list[Deletion]:
    """Every deletion of ``clean_each_map``'s maps, in map order."""
    return [d for c in cleaned for d in c.deletions]

