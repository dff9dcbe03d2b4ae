"""The finding-kind policy table (sockguard/core/policy.py) and everything that derives from it.

Why these tests exist: which kinds are bad, deleted, exported, shown and
alerted on used to be decided in five places that disagreed.  The table is
checked for consistency, the Prometheus rules (YAML, not Python) are checked
against it so that they cannot drift, and each consumer — metrics,
remediation, the CLI and the daemon — is checked to follow it, on real
kernel objects where it touches the kernel.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sockguard.core import audit, policy
from sockguard.core.errors import SockguardError
from sockguard.core.layout import CILIUM, decode
from sockguard.core.model import Finding, Kind, LiveSocket, MapEntry, MapInfo, Netns, Tuple4
from sockguard.core.policy import ALERTED, BAD_KINDS, EXPORTED_KINDS, POLICY, SHOWN_KINDS
from sockguard.kernel import remediation
from sockguard.kernel.node_audit import NodeAudit
from sockguard.service import metrics
from tests.lab import Lab, cilium_key, recv_exact
from tests.lab.keys import raw_key

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "packaging" / "prometheus" / "sockguard.rules.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "sockguard.rules.test.yml"
INFO = MapInfo(7, "cilium_sock_ops", "sockhash", 44, 4, 65535)
INFO_8 = MapInfo(7, "cilium_sock_ops", "sockhash", 44, 8, 65535)

# -- the table itself ---------------------------------------------------------------------


def test_every_kind_has_exactly_one_row() -> None:
    assert set(POLICY) == set(Kind)
    assert all(row.kind is kind for kind, row in POLICY.items())
    for row in POLICY.values():
        assert row.meaning and "\n" not in row.meaning, row.kind


def test_derived_sets_are_consistent() -> None:
    assert policy.DELETABLE_KINDS <= BAD_KINDS
    assert policy.UNPROVEN_DELETABLE_KINDS <= BAD_KINDS
    assert not policy.DELETABLE_KINDS & policy.UNPROVEN_DELETABLE_KINDS
    assert set(policy.DELETED_KINDS) == policy.DELETABLE_KINDS | policy.UNPROVEN_DELETABLE_KINDS
    # What makes the exit status 1 is what the operator sees and is paged for.
    assert set(SHOWN_KINDS) == BAD_KINDS
    assert set(EXPORTED_KINDS) >= BAD_KINDS
    assert set(ALERTED) >= BAD_KINDS
    assert set(ALERTED) <= set(EXPORTED_KINDS), "an alert on a series that is never exported"
    assert len({name for name, _ in ALERTED.values()}) == len(ALERTED)
    assert {sev for _, sev in ALERTED.values()} <= {policy.WARNING, policy.CRITICAL}
    assert policy.deletable_kinds(False) == policy.DELETABLE_KINDS
    assert policy.deletable_kinds(True) == set(policy.DELETED_KINDS)


def test_the_table_says_what_the_operator_was_promised() -> None:
    assert {Kind.STALE, Kind.SHADOWING, Kind.RECVPATH} == BAD_KINDS
    assert {Kind.STALE, Kind.SHADOWING} == policy.DELETABLE_KINDS
    assert {Kind.RECVPATH} == policy.UNPROVEN_DELETABLE_KINDS
    # A connection that hangs now pages; one that will hang later warns.
    assert ALERTED[Kind.SHADOWING][1] == ALERTED[Kind.RECVPATH][1] == policy.CRITICAL
    assert ALERTED[Kind.STALE][1] == policy.WARNING
    assert Kind.OK not in ALERTED and Kind.PROXY not in ALERTED
    assert Kind.RECVPATH in EXPORTED_KINDS and Kind.OK not in EXPORTED_KINDS


def test_consumers_take_their_lists_from_the_table() -> None:
    assert audit.BAD_KINDS is policy.BAD_KINDS
    assert metrics.FINDING_KINDS == EXPORTED_KINDS
    assert metrics.DELETED_KINDS == policy.DELETED_KINDS


@pytest.mark.parametrize(("details", "unproven"), [
    ({"verified_by_cookie": False}, True),
    ({"verified_by_cookie": False, "owner_recv_path": "tcp_recvmsg"}, True),
    ({"verified_by_cookie": False, "verified_by_tuple": False}, True),
    ({"verified_by_cookie": False, "verified_by_tuple": True}, False),
    ({"verified_by_cookie": True}, False),
    ({}, False),
])
def test_unproven_means_no_exact_entry_source(details: dict[str, object],
                                              unproven: bool) -> None:
    assert policy.unproven(_finding(Kind.RECVPATH, 1, details=details)) is unproven


# -- the Prometheus rules against the table -------------------------------------------------


def _alerts() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


_FINDINGS_KIND = re.compile(r'sockguard_findings\{[^}]*kind\s*=\s*"(\w+)"')


def test_every_alerted_kind_has_its_alert_with_the_tables_severity() -> None:
    alerts = _alerts()
    for kind, (name, severity) in ALERTED.items():
        assert name in alerts, f"{kind}: no alert {name} in {RULES.name}"
        rule = alerts[name]
        assert rule["labels"]["severity"] == severity, name
        assert _FINDINGS_KIND.findall(rule["expr"]) == [kind.value], rule["expr"]
        if severity == policy.CRITICAL:
            assert "for" not in rule, f"{name}: a hanging connection pages at once"


def test_rules_use_only_exported_kinds_and_alert_no_kind_the_table_does_not() -> None:
    by_name = {name: kind for kind, (name, _) in ALERTED.items()}
    exported = {k.value for k in EXPORTED_KINDS}
    for name, rule in _alerts().items():
        kinds = _FINDINGS_KIND.findall(rule["expr"])
        assert set(kinds) <= exported, f"{name} selects a kind never exported: {kinds}"
        if kinds:
            assert name in by_name, f"{name} alerts on {kinds}, which the table does not alert"
            assert kinds == [by_name[name].value]


def test_every_alerted_kind_has_a_firing_promtool_case_with_its_severity() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fired: dict[str, set[str]] = {}
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            if check["exp_alerts"]:
                for a in check["exp_alerts"]:
                    fired.setdefault(check["alertname"], set()).add(a["exp_labels"]["severity"])
            else:
                silent.add(check["alertname"])
    for name, severity in ALERTED.values():
        assert fired.get(name) == {severity}, name
        assert name in silent, name


# -- metrics --------------------------------------------------------------------------------


def _key(n: int) -> bytes:
    return raw_key("10.0.1.2", 40000 + n, "10.0.2.3", 8080)


def _finding(kind: Kind, n: int, confirmed: bool = True,
             details: dict[str, object] | None = None) -> Finding:
    raw = _key(n)
    if details is None:
        details = {"verified_by_cookie": False} if kind is Kind.RECVPATH else {}
    return Finding(kind, INFO, MapEntry(raw.hex(), decode(CILIUM, raw)), f"{kind} {n}",
                   confirmed=confirmed, details=details)


def test_findings_gauge_exports_every_exported_kind_recvpath_included() -> None:
    counts = {Kind.OK: 4, Kind.STALE: 1, Kind.SHADOWING: 2, Kind.PROXY: 1, Kind.RECVPATH: 3}
    findings = [_finding(k, i * 10 + j) for i, (k, n) in enumerate(counts.items())
                for j in range(n)]
    node = NodeAudit([audit.AuditResult(INFO, len(findings), findings)], [], 0)
    m = metrics.Metrics()
    m.audit_succeeded(node, [], 0.1, time.time())
    labels = {"map_id": "7", "map_name": "cilium_sock_ops"}
    for kind in Kind:
        got = m.registry.get_sample_value("sockguard_findings", {**labels, "kind": kind.value})
        assert got == (counts[kind] if kind in EXPORTED_KINDS else None), kind
    for kind in policy.DELETED_KINDS:  # zero from the start, so increase() works
        assert m.registry.get_sample_value("sockguard_deletions_total",
                                           {"kind": kind.value}) == 0


def test_new_refusals_have_bounded_reasons() -> None:
    f = _finding(Kind.RECVPATH, 1)
    [refused] = remediation.clean(FakeHandle(), [f], FakeProbe(), apply=False)
    assert metrics.refusal_reason(refused) == "unproven"
    [gone] = remediation.clean(FakeHandle(), [f], FakeProbe(), apply=False,
                               delete_unproven=True)
    assert "no live socket owns" in gone.reason
    assert metrics.refusal_reason(gone) == "no_owner"
    assert {"unproven", "no_owner"} <= set(metrics.REFUSAL_REASONS)


# -- remediation, with stand-ins for the map and sock_diag ---------------------------------


def _live(f: Finding, cookie: int = 99) -> LiveSocket:
    return LiveSocket(f.entry.key.owner, 1, cookie, 1234, Netns(1, "pod-a"))


@dataclass
class FakeHandle:
    """A map as ``reverify`` and ``clean`` see it (no kernel: the kernel path is below).

    Its value is 8 bytes, a socket cookie, which ``lookup_cookie`` reports as
    unknown: every re-check then rests on ``contains`` and the owner probe.
    """

    info: MapInfo = INFO_8
    present: set[bytes] | None = None  # None: every key is present
    deleted: list[bytes] = field(default_factory=list)

    def contains(self, raw: bytes) -> bool:
        return self.present is None or raw in self.present

    def lookup_cookie(self, raw: bytes) -> int | None:
        return None

    def delete(self, raw: bytes) -> bool:
        self.deleted.append(raw)
        return True

    def entry_socket(self, raw: bytes) -> None:
        raise SockguardError("no entry source in this fake: the probe decides")


@dataclass
class FakeProbe:
    owners: dict[Tuple4, LiveSocket] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    complete: bool = True

    def owner(self, tup: Tuple4) -> LiveSocket | None:
        return self.owners.get(tup)


@pytest.mark.parametrize("delete_unproven", [False, True])
def test_clean_takes_the_deletable_kinds_from_the_table(delete_unproven: bool) -> None:
    findings = [_finding(k, i) for i, k in enumerate(Kind)]
    findings.append(_finding(Kind.STALE, 50, confirmed=False))  # unconfirmed: never touched
    probe = FakeProbe({f.entry.key.owner: _live(f) for f in findings
                       if f.kind in (Kind.SHADOWING, Kind.RECVPATH)})
    out = remediation.clean(FakeHandle(), findings, probe, apply=False,
                            delete_unproven=delete_unproven)
    outcome = {d.finding.kind: d.outcome for d in out}
    assert len(out) == len(outcome) == len(BAD_KINDS)
    allowed = policy.deletable_kinds(delete_unproven)
    for kind in Kind:
        if kind not in BAD_KINDS:
            assert kind not in outcome
        elif kind in allowed:
            assert outcome[kind] == "would-delete", kind
        else:
            assert outcome[kind] == "refused", kind
    if not delete_unproven:
        [d] = [d for d in out if d.finding.kind is Kind.RECVPATH]
        assert "--delete-unproven" in d.reason


def test_unproven_recvpath_is_deleted_only_while_its_owner_hangs() -> None:
    f = _finding(Kind.RECVPATH, 1)
    raw = _key(1)
    handle = FakeHandle()
    # Owner still live, key still there: deleted.
    [d] = remediation.clean(handle, [f], FakeProbe({f.entry.key.owner: _live(f)}),
                            apply=True, delete_unproven=True)
    assert (d.outcome, handle.deleted) == ("deleted", [raw])
    # Owner gone: the hang is over, the next audit judges the key (stale, with proof).
    handle = FakeHandle()
    [d] = remediation.clean(handle, [f], FakeProbe(), apply=True, delete_unproven=True)
    assert d.outcome == "refused" and "no live socket owns" in d.reason
    assert handle.deleted == []
    # Key gone already.
    handle = FakeHandle(present=set())
    [d] = remediation.clean(handle, [f], FakeProbe({f.entry.key.owner: _live(f)}),
                            apply=True, delete_unproven=True)
    assert d.outcome == "gone" and handle.deleted == []


@pytest.mark.parametrize("details", [
    {"verified_by_cookie": True, "owner_recv_path": "tcp_recvmsg"},
    {"verified_by_cookie": False, "verified_by_tuple": True, "owner_recv_path": "tcp_recvmsg"},
])
def test_recvpath_whose_entry_points_to_its_owner_is_never_deleted(
        details: dict[str, object]) -> None:
    f = _finding(Kind.RECVPATH, 1, details=details)
    handle = FakeHandle()
    [d] = remediation.clean(handle, [f], FakeProbe({f.entry.key.owner: _live(f)}),
                            apply=True, delete_unproven=True)
    assert d.outcome == "refused" and "belongs to its live owner" in d.reason
    assert metrics.refusal_reason(d) == "owner_matches"
    assert handle.deleted == []


# -- the real kernel: `sockguard clean --delete-unproven` and `sockguard run` ---------------

SERVER_PORT = 8080
CLIENT_PORT = 40000


def _hanging_connection(lab: Lab) -> tuple[bytes, bytes, socket.socket, socket.socket]:
    """A dummy socket under the server key of a connection made afterwards.

    The server's own insert fails, so it reads with tcp_recvmsg while its
    client redirects into the dummy.  (server key, client key, client, server)
    """
    server_pod, client_pod = lab.pods
    s_ip, c_ip = server_pod.addr(), client_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)
    server_key = cilium_key(s_ip, SERVER_PORT, c_ip, CLIENT_PORT)
    dummy, _peer = lab.dummy_pair()
    lab.inject(server_key, dummy)
    cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    srv = lab.accept(listener)
    listener.close()
    return server_key, cilium_key(c_ip, CLIENT_PORT, s_ip, SERVER_PORT), cli, srv


#: Without the sockmap iterator the entry's socket is unknown: the hang is a recvpath finding.
UNPROVEN = ("--no-iterator", "--socket-source", "iterator", "--json")


@pytest.mark.kernel
def test_clean_deletes_an_unproven_recvpath_key_only_when_asked(lab: Lab) -> None:
    from tests.test_cli_lab import sockguard  # the CLI as its own process, as operators run it

    server_key, client_key, cli, srv = _hanging_connection(lab)
    where = ("--map", str(lab.pin_path))

    proc = sockguard("audit", *where, *UNPROVEN)
    assert proc.returncode == 1, proc.stderr
    [f] = [f for f in json.loads(proc.stdout)["findings"] if f["key_hex"] == server_key.hex()]
    assert f["kind"] == "recvpath" and f["details"]["verified_by_cookie"] is False

    # Default: delete only what is proven; the recvpath entry is refused and remains.
    proc = sockguard("clean", *where, *UNPROVEN, "--apply")
    assert proc.returncode == 1, proc.stderr
    [d] = json.loads(proc.stdout)["deletions"]
    assert (d["key_hex"], d["outcome"]) == (server_key.hex(), "refused")
    assert "--delete-unproven" in d["outcome_reason"]
    assert server_key in lab.keys()

    proc = sockguard("clean", *where, *UNPROVEN, "--delete-unproven")  # dry run
    assert proc.returncode == 1, proc.stderr
    assert [d["outcome"] for d in json.loads(proc.stdout)["deletions"]] == ["would-delete"]
    assert server_key in lab.keys()

    proc = sockguard("clean", *where, *UNPROVEN, "--delete-unproven", "--apply")
    assert proc.returncode == 0, proc.stderr
    deletions = json.loads(proc.stdout)["deletions"]
    assert [(d["outcome"], d["key_hex"]) for d in deletions] == [("deleted", server_key.hex())]
    assert "deleted recvpath entry" in proc.stderr
    keys = lab.keys()
    assert server_key not in keys and client_key in keys
    # The hang is over: the client's payload now takes the normal stack to the server.
    cli.sendall(b"ping")
    assert recv_exact(srv, 4) == b"ping"
    assert sockguard("audit", *where, *UNPROVEN).returncode == 0


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="sockguard run needs root (bpf, setns)")
def test_daemon_counts_and_remediates_recvpath_as_the_table_says(
        lab: Lab, tmp_path: Path) -> None:
    """STATUS, the summary log and the gauge count recvpath; remediation follows the opt-in."""
    from tests import test_daemon as td  # its RunningDaemon, NotifySocket and waits

    if not td.SOCKGUARD.exists():
        pytest.skip(f"{td.SOCKGUARD} not installed (make venv)")

    class Daemon(td.RunningDaemon):
        delete_unproven = False

        def write_config(self, interval: float, remediate: bool, extra: str = "") -> None:
            super().write_config(interval, remediate, extra)
            text = self.config.read_text()
            text = text.replace("[audit]\n", "[audit]\nuse_iterator = false\n", 1)
            text = text.replace("[remediation]\n", "[remediation]\ndelete_unproven = "
                                f"{'true' if self.delete_unproven else 'false'}\n", 1)
            self.config.write_text(text)

    notify = td.NotifySocket(tmp_path / "notify.sock")
    d = Daemon(tmp_path, lab.pin_path, interval=0.3, env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        td._ready(d)
        assert d.value("sockguard_findings", kind="recvpath") == 0
        assert d.value("sockguard_deletions_total", kind="recvpath") == 0

        server_key, client_key, cli, srv = td._within_one_interval(
            d, lambda: _hanging_connection(lab), "sockguard_findings", kind="recvpath")
        notify.wait(lambda m: "0 stale, 0 shadowing, 1 recvpath" in m, timeout=td.SLOW)
        log = d.log()
        assert "entries: 0 stale, 0 shadowing, 1 recvpath;" in log  # the summary log
        assert "SOCKGUARD_KIND=recvpath" in log and f"SOCKGUARD_KEY={server_key.hex()}" in log

        # Remediation on, opt-in off: refused (counted), the key stays.
        d.write_config(interval=0.3, remediate=True)
        d.signal(signal.SIGHUP)
        d.wait_value("sockguard_deletions_refused_total", lambda v: v >= 1, timeout=td.SLOW,
                     reason="unproven")
        assert server_key in lab.keys()
        assert d.value("sockguard_deletions_total", kind="recvpath") == 0

        # Opt-in: deleted, and the connection no longer hangs.
        d.delete_unproven = True
        d.write_config(interval=0.3, remediate=True)
        d.signal(signal.SIGHUP)
        d.wait_value("sockguard_deletions_total", lambda v: v == 1, timeout=td.SLOW,
                     kind="recvpath")
        keys = lab.keys()
        assert server_key not in keys and client_key in keys
        d.wait_value("sockguard_findings", lambda v: v == 0, timeout=td.SLOW, kind="recvpath")
        cli.sendall(b"ping")
        assert recv_exact(srv, 4) == b"ping"
        assert "deleted recvpath entry" in d.log()
        assert d.alive()
    finally:
        d.stop()
        notify.close()
