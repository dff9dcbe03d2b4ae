"""Every refusal remediation makes names its ``Refusal`` where it decides, without root.

Why: the ``reason`` label of ``sockguard_deletions_refused_total`` used to be
recovered by matching words of the human-readable reason, so rewording a
message silently moved a count to ``other``.  Each case below drives the real
decision (``remediation.clean`` with stand-ins for the map and sock_diag) and
checks the outcome, the label and the words an operator reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any, cast

import pytest

from sockguard.core.errors import MapGoneError, SockguardError
from sockguard.core.layout import CILIUM, decode, key_for_socket
from sockguard.core.model import (
    Endpoint,
    Finding,
    Kind,
    LiveSocket,
    MapEntry,
    MapInfo,
    Netns,
    Tuple4,
)
from sockguard.core.rows import COOKIE_UNKNOWN, Record
from sockguard.core.tcp_states import TCP_ESTABLISHED
from sockguard.kernel import remediation
from sockguard.kernel.remediation import Deletion, Refusal
from sockguard.service import metrics

MAP_4 = MapInfo(7, "cilium_sock_ops", "sockhash", 44, 4, 65535)
MAP_8 = MapInfo(7, "cilium_sock_ops", "sockhash", 44, 8, 65535)
POD = Netns(4026532000, "pod-a")

#: The labels dashboards and alert rules select on: they never change.
LABELS = ("live_owner", "reinserted", "proxy_entry", "owner_matches", "unproven", "no_owner",
          "gone", "cap_reached", "error", "stopping", "incomplete", "entry_socket_live", "other")


def _tup(local: str, lport: int, remote: str, rport: int) -> Tuple4:
    lip, rip = ip_address(local), ip_address(remote)
    return Tuple4(lip.version, Endpoint(lip, lport), Endpoint(rip, rport))


SERVER = _tup("10.0.1.2", 8080, "10.0.2.2", 40000)


def _record(t: Tuple4, cookie: int = 7) -> Record:
    """An entry-socket record (iterator/tc lookup shape): a live socket with tuple ``t``."""
    return (b"k", cookie, 0, 2, TCP_ESTABLISHED, t.local.ip.packed, t.remote.ip.packed,
            t.local.port, t.remote.port, False, 0)


def _finding(kind: Kind, info: MapInfo = MAP_4, cookie: int | None = 1,
             details: dict[str, object] | None = None) -> Finding:
    raw = key_for_socket(CILIUM, SERVER)
    return Finding(kind, info, MapEntry(raw.hex(), decode(CILIUM, raw), cookie), "why",
                   confirmed=True, details=details or {})


def _live(cookie: int = 99) -> LiveSocket:
    return LiveSocket(SERVER, TCP_ESTABLISHED, cookie, 1234, POD)


@dataclass
class Handle:
    """A map as remediation sees it; each field is one thing the kernel could answer."""

    info: MapInfo = MAP_4
    present: bool = True
    cookie_now: int | None = None
    record: Record | Exception | None = field(
        default_factory=lambda: SockguardError("no entry source here"))
    delete_result: bool | Exception = True

    def contains(self, raw: bytes) -> bool:
        return self.present

    def lookup_cookie(self, raw: bytes) -> int | None:
        return self.cookie_now

    def entry_socket(self, raw: bytes) -> Record | None:
        if isinstance(self.record, Exception):
            raise self.record
        return self.record

    def delete(self, raw: bytes) -> bool:
        if isinstance(self.delete_result, Exception):
            raise self.delete_result
        return self.delete_result


@dataclass
class Probe:
    found: LiveSocket | None = None
    unreadable: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unreadable

    def owner(self, t: Tuple4) -> LiveSocket | None:
        return self.found


UNPROVEN = {"verified_by_cookie": False}
CASES: dict[str, tuple[Finding, Handle, Probe, dict[str, Any], Refusal, str, str]] = {
    "gone": (_finding(Kind.STALE), Handle(present=False), Probe(), {},
             Refusal.GONE, "gone", "no longer in the map"),
    "gone-at-delete": (_finding(Kind.STALE), Handle(delete_result=False), Probe(), {},
                       Refusal.GONE, "gone", "removed by the kernel"),
    "reinserted": (_finding(Kind.STALE, MAP_8), Handle(MAP_8, cookie_now=5), Probe(), {},
                   Refusal.REINSERTED, "refused", "re-inserted since the audit"),
    "proxy": (_finding(Kind.STALE, details={"proxy": True}), Handle(), Probe(), {},
              Refusal.PROXY_ENTRY, "refused", "L7 proxy"),
    "live-owner": (_finding(Kind.STALE), Handle(), Probe(_live()), {},
                   Refusal.LIVE_OWNER, "refused", "a live socket owns"),
    "shadowing-owner": (_finding(Kind.SHADOWING, cookie=99), Handle(), Probe(_live(99)), {},
                        Refusal.OWNER_MATCHES, "refused", "belongs to its live owner"),
    "shadowing-owner-tuple": (_finding(Kind.SHADOWING, cookie=None),
                              Handle(record=_record(SERVER, COOKIE_UNKNOWN)), Probe(_live(99)),
                              {}, Refusal.OWNER_MATCHES, "refused", "it may be the owner"),
    "recvpath-owner": (_finding(Kind.RECVPATH, details={"verified_by_cookie": True}),
                       Handle(), Probe(_live()), {"delete_unproven": True},
                       Refusal.OWNER_MATCHES, "refused", "belongs to its live owner"),
    "unproven": (_finding(Kind.RECVPATH, details=UNPROVEN), Handle(), Probe(_live()), {},
                 Refusal.UNPROVEN, "refused", "--delete-unproven"),
    "no-owner": (_finding(Kind.RECVPATH, details=UNPROVEN), Handle(), Probe(),
                 {"delete_unproven": True}, Refusal.NO_OWNER, "refused", "no live socket owns"),
    "incomplete": (_finding(Kind.STALE), Handle(), Probe(unreadable=["/proc/1/ns/net: EMFILE"]),
                   {}, Refusal.INCOMPLETE, "refused", "not every namespace could be asked"),
    "unreadable-entry": (_finding(Kind.STALE), Handle(record=OSError(24, "Too many open files")),
                         Probe(), {}, Refusal.INCOMPLETE, "refused", "could not read"),
    "entry-socket-live": (_finding(Kind.STALE), Handle(record=_record(SERVER)), Probe(), {},
                          Refusal.ENTRY_SOCKET_LIVE, "refused", "own socket is a live connection"),
    "cap": (_finding(Kind.STALE), Handle(), Probe(), {"max_deletes": 0},
            Refusal.CAP_REACHED, "skipped-cap", "--max-deletes 0 reached"),
    "stopping": (_finding(Kind.STALE), Handle(), Probe(), {"stop": lambda: True},
                 Refusal.STOPPING, "skipped-stop", "stopping"),
    "error": (_finding(Kind.STALE), Handle(delete_result=MapGoneError("map x is gone")), Probe(),
              {}, Refusal.ERROR, "error", "not deleted: map x is gone"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_refusal_is_named_where_it_is_decided(name: str) -> None:
    finding, handle, probe, kwargs, refusal, outcome, words = CASES[name]
    [d] = remediation.clean(cast(Any, handle), [finding], cast(Any, probe), apply=True,
                            **kwargs)
    assert (d.refusal, d.outcome) == (refusal, outcome)
    assert words in d.reason
    assert metrics.refusal_reason(d) == refusal.value


def test_every_label_but_other_has_a_decision_above() -> None:
    decided = {case[4] for case in CASES.values()}
    assert decided == set(Refusal) - {Refusal.OTHER}


def test_the_labels_are_the_ones_alert_rules_select_on() -> None:
    assert metrics.REFUSAL_REASONS == LABELS
    assert tuple(r.value for r in Refusal) == LABELS


def test_a_deleted_entry_has_no_refusal_and_counts_as_a_deletion() -> None:
    f = _finding(Kind.STALE)
    [d] = remediation.clean(cast(Any, Handle()), [f], cast(Any, Probe()), apply=True)
    assert (d.outcome, d.refusal) == ("deleted", None)
    m = metrics.Metrics()
    m.count_deletions([d, Deletion.refused(f, Refusal.GONE, "gone: whatever it says")])
    assert m.registry.get_sample_value("sockguard_deletions_total", {"kind": "stale"}) == 1
    assert m.registry.get_sample_value("sockguard_deletions_refused_total",
                                       {"reason": "gone"}) == 1


def test_the_label_does_not_depend_on_the_words() -> None:
    """Rewording a message keeps its count; a deletion without a refusal is ``other``."""
    f = _finding(Kind.STALE)
    assert metrics.refusal_reason(Deletion.refused(f, Refusal.NO_OWNER, "reworded")) == "no_owner"
    assert metrics.refusal_reason(Deletion(f, "refused", "refused: no live socket owns x")) \
        == "other"
