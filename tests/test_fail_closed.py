"""Never delete a live entry when the node cannot be fully seen (real kernel, lab).

Each test reproduces a way an auditor that fails open deletes the entry of a
live, ESTABLISHED connection: namespaces that cannot be opened (out of fds),
namespaces no enumeration reaches (their names deleted while sockets in them
live on), deletes after SIGTERM.  "Could not look" is never evidence: the
audit reports itself incomplete (JSON, exit status 3) and only the entry's
own socket can prove an entry stale.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sockguard.core.audit import AuditPolicy
from sockguard.core.layout import CILIUM
from sockguard.core.model import Kind
from sockguard.kernel import libbpf
from sockguard.kernel.maps import open_map, select_maps
from sockguard.kernel.node_audit import run_audit
from sockguard.kernel.remediation import clean
from sockguard.kernel.sockets import OwnerProbe
from tests.lab import Lab, cilium_key, key_for, recv_exact
from tests.lab.topology import ip

pytestmark = pytest.mark.kernel

SERVER_PORT = 8080
TcpPair = Callable[..., tuple[socket.socket, socket.socket]]
SOCKGUARD = Path(sys.executable).with_name("sockguard")


def sockguard(*args: str, nofile: int | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.run([sys.executable, "-m", "sockguard", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, preexec_fn=limit)


def _still_flows(cli: socket.socket, srv: socket.socket) -> None:
    cli.sendall(b"alive")
    assert recv_exact(srv, 5) == b"alive"


@pytest.mark.parametrize("nofile", [8, 10, 16, 32])
def test_a_tiny_fd_limit_deletes_no_live_entry(lab: Lab, entry_source: str, nofile: int) -> None:
    """Out of fds, namespaces cannot be opened: that is not "no sockets there"."""
    a, b = lab.pods
    cli, srv = lab.pair(b, a, SERVER_PORT)
    keys = {key_for(cli), key_for(srv)}
    assert keys <= set(lab.keys())

    proc = sockguard("clean", "--map", str(lab.pin_path), "--apply", "--json",
                     "--entry-source", entry_source, nofile=nofile)

    assert "Traceback" not in proc.stderr, proc.stderr
    # 2: failed before it could look; 3: looked, incomplete; 0: the limit sufficed.
    assert proc.returncode in (0, 2, 3), (proc.returncode, proc.stdout, proc.stderr)
    if proc.returncode in (0, 3):
        doc = json.loads(proc.stdout)
        assert doc["audit"]["complete"] is (proc.returncode == 0)
        assert doc["deletions"] == []
    assert keys <= set(lab.keys()), "a live connection's entry was deleted"
    _still_flows(cli, srv)


@pytest.fixture
def hidden_pods(lab: Lab) -> Iterator[list[int]]:
    """The pods' netns names deleted (``ip netns del``) while the lab's sockets keep
    the namespaces alive: no enumeration (/run/netns, /proc/*/ns/net) reaches them.
    Yields their inodes; fds held here keep them until teardown."""
    fds = [os.open(p.path, os.O_RDONLY | os.O_CLOEXEC) for p in lab.pods]
    inodes = [os.fstat(fd).st_ino for fd in fds]
    try:
        yield inodes
    finally:
        for fd in fds:
            os.close(fd)


def test_namespaces_no_enumeration_reaches_keep_their_entries(
        lab: Lab, entry_source: str, hidden_pods: list[int]) -> None:
    a, b = lab.pods
    cli, srv = lab.pair(b, a, SERVER_PORT)
    keys = {key_for(cli), key_for(srv)}
    for pod in (a, b):
        ip("netns", "del", pod.name)
    assert not any(os.path.exists(p.path) for p in (a, b))
    _still_flows(cli, srv)  # the connection lives on

    audit = sockguard("audit", "--map", str(lab.pin_path), "--json",
                      "--entry-source", entry_source)
    assert audit.returncode == 3, (audit.stdout, audit.stderr)
    doc: dict[str, Any] = json.loads(audit.stdout)
    assert doc["complete"] is False
    unseen = {u["inode"]: u["entries"] for u in doc["unseen_namespaces"]}
    assert unseen == {ino: 1 for ino in hidden_pods}
    assert doc["findings"] == []  # nothing bad: each entry's own socket owns its tuple
    assert doc["maps"][0]["counts"]["ok"] == 2
    every = json.loads(sockguard("audit", "--map", str(lab.pin_path), "--json", "--all",
                                 "--entry-source", entry_source).stdout)
    assert {f["kind"] for f in every["findings"]} == {"ok"}
    assert all(f["details"]["owner_from_entry_socket"] for f in every["findings"])

    done = sockguard("clean", "--map", str(lab.pin_path), "--apply", "--json",
                     "--entry-source", entry_source)
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["deletions"] == []
    assert keys <= set(lab.keys())
    _still_flows(cli, srv)


def test_cookie_less_audit_of_unreachable_namespaces_deletes_nothing(
        lab: Lab, hidden_pods: list[int]) -> None:
    """Without an entry source the audit cannot see where the sockets live; the
    re-check before a delete still reads the entry's own socket where it can."""
    from sockguard.kernel import sockhash_lookup, sockmap_iter

    if not (sockhash_lookup.lookup_available()[0] or sockmap_iter.iterator_available()[0]):
        pytest.skip("no entry source here: the re-check cannot read an entry's socket")
    a, b = lab.pods
    cli, srv = lab.pair(b, a, SERVER_PORT)
    keys = {key_for(cli), key_for(srv)}
    for pod in (a, b):
        ip("netns", "del", pod.name)
    done = sockguard("clean", "--map", str(lab.pin_path), "--apply", "--json",
                     "--entry-source", "syscall")
    assert done.returncode == 1, done.stderr  # reported stale, refused: entries remain
    outcomes = {d["key_hex"]: (d["outcome"], d["outcome_reason"])
                for d in json.loads(done.stdout)["deletions"]}
    assert {k.hex() for k in keys} == set(outcomes)
    for outcome, reason in outcomes.values():
        assert outcome == "refused" and "live connection" in reason, reason
    assert keys <= set(lab.keys())
    _still_flows(cli, srv)


def test_stale_needs_proof_when_a_namespace_cannot_be_read(lab: Lab) -> None:
    """In-process: an index that is not complete calls nothing stale by absence."""
    a, b = lab.pods
    cli, srv = lab.pair(b, a, SERVER_PORT)
    dummy, _ = lab.dummy_pair()
    leaked = cilium_key(a.addr(), SERVER_PORT, b.addr(), 50000)
    lab.inject(leaked, dummy)
    maps, _ = select_maps([str(lab.pin_path)])
    from sockguard.kernel import node_audit
    from sockguard.kernel.sockets import Scan

    real = node_audit.scan_sockets

    def blind(source: str = "auto") -> tuple[Scan, str]:
        scan, used = real(source)
        scan.unreadable.append("/proc/4242/ns/net: Too many open files")
        return scan, used

    node_audit.scan_sockets = blind  # type: ignore[assignment]
    try:
        for source in ("auto", "syscall"):
            audit = run_audit(maps, CILIUM, AuditPolicy(), confirm_delay=0.05,
                              entry_source_name=source, include_ok=True)
            assert not audit.complete
            kinds = {bytes.fromhex(f.entry.key_hex): f.kind
                     for r in audit.results for f in r.findings}
            if audit.exactness[maps[0].id] == "none":
                # the dummy's entry cannot be told from a live one: no verdict at all
                assert leaked not in kinds and audit.unverified == 1
            else:  # the entry's socket is another tuple: stale on its own evidence
                assert kinds[leaked] is Kind.STALE
            assert kinds[key_for(cli)] is Kind.OK and kinds[key_for(srv)] is Kind.OK
    finally:
        node_audit.scan_sockets = real  # type: ignore[assignment]


def test_clean_stops_deleting_when_asked(bpffs_dir: Path, tcp_pair: TcpPair) -> None:
    """The stop check is made before every delete, not between maps."""
    fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_SOCKHASH, "sg_stop", 44, 4, 512)
    pin = bpffs_dir / "stop_map"
    libbpf.obj_pin(fd, str(pin))
    dummy, _peer = tcp_pair()  # closed by the fixture: closing unlinks it from every map
    try:
        keys = [cilium_key("10.99.0.1", 80, "10.99.0.2", 20000 + i) for i in range(200)]
        for k in keys:  # no sk_msg on this map: one socket may sit under many keys
            libbpf.map_update(fd, k, struct.pack("i", dummy.fileno()))
        maps, _ = select_maps([str(pin)])
        audit = run_audit(maps, CILIUM, AuditPolicy(), confirm_delay=0.01)
        [result] = audit.results
        assert result.count(Kind.STALE) == 200
        deleted: list[int] = []
        with open_map(maps[0]) as handle, OwnerProbe() as probe:
            real_delete = handle.delete

            def counting(raw: bytes) -> bool:
                deleted.append(1)
                return real_delete(raw)

            handle.delete = counting  # type: ignore[method-assign]
            out = clean(handle, result.findings, probe, apply=True, max_deletes=1000,
                        stop=lambda: len(deleted) >= 17)
        assert [d.outcome for d in out].count("deleted") == 17
        assert [d.outcome for d in out].count("skipped-stop") == 183
        remaining = 0
        key = None
        while (key := libbpf.map_get_next_key(fd, key, 44)) is not None:
            remaining += 1
        assert remaining == 183
    finally:
        os.close(fd)


def test_sigterm_mid_remediation_stops_the_deletes(bpffs_dir: Path, tmp_path: Path,
                                                  tcp_pair: TcpPair) -> None:
    """`sockguard run` with remediation on: SIGTERM while it deletes thousands of
    stale entries ends the deleting within milliseconds, not after the map is done."""
    n = 4000
    fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_SOCKHASH, "sg_term", 44, 4, 8192)
    pin = bpffs_dir / "term_map"
    libbpf.obj_pin(fd, str(pin))
    dummy, _peer = tcp_pair()  # closed by the fixture: closing unlinks it from every map
    for i in range(n):
        k = cilium_key("10.98.0.1", 80, f"10.98.{i // 250}.{i % 250 + 2}", 30000 + i)
        libbpf.map_update(fd, k, struct.pack("i", dummy.fileno()))
    config = tmp_path / "sockguard.toml"
    config.write_text(
        f'[audit]\ninterval = 3600\nmaps = ["{pin}"]\nconfirm_delay = 0.01\n'
        f"[remediation]\nenabled = true\nmax_deletes = {n}\n"
        f'[metrics]\nenabled = false\n[tracer]\nenabled = false\n'
        f'[log]\ntarget = "stderr"\nlevel = "info"\n')
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(SOCKGUARD), "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "deleted stale entry" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "remediation never started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        at_term = log_path.read_text().count("deleted stale entry")
        assert proc.wait(timeout=30) == 0
        # counted before the dummy closes: sock_map_close unlinks it from every map
        remaining = 0
        key = None
        while (key := libbpf.map_get_next_key(fd, key, 44)) is not None:
            remaining += 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(fd)
    after = log_path.read_text().count("deleted stale entry")
    # Python runs the handler in the main thread at its next turn with the GIL (the
    # switch interval is 5 ms), and the audit thread checks the flag before every
    # delete: a few milliseconds' worth of deletes may follow the signal, not thousands.
    assert after - at_term <= 100, (at_term, after)
    assert remaining == n - after
    assert remaining > n // 2


def test_daemon_reports_unseen_namespaces_and_deletes_nothing(
        lab: Lab, hidden_pods: list[int], tmp_path: Path) -> None:
    """`sockguard run` with remediation on, the pods' names deleted: metrics and the
    journal say the audit is incomplete; the live connection keeps its entries."""
    from tests.test_daemon import RunningDaemon

    a, b = lab.pods
    cli, srv = lab.pair(b, a, SERVER_PORT)
    keys = {key_for(cli), key_for(srv)}
    for pod in (a, b):
        ip("netns", "del", pod.name)
    d = RunningDaemon(tmp_path, lab.pin_path, interval=0.3, remediate=True)
    try:
        d.wait_value("sockguard_audit_complete", lambda v: v == 0, timeout=30)
        assert d.value("sockguard_entries_in_unseen_namespaces") == 2
        d.wait_value("sockguard_audits_total", lambda v: v >= 3, timeout=30)
        assert (d.value("sockguard_deletions_total") or 0) == 0
        assert d.value("sockguard_findings", kind="stale") == 0
        assert "INCOMPLETE" in d.log() and "no scan read" in d.log()
    finally:
        d.stop()
    assert keys <= set(lab.keys())
    _still_flows(cli, srv)


def test_a_map_gone_mid_remediation_fails_alone(bpffs_dir: Path, tcp_pair: TcpPair) -> None:
    """One loop for `clean` and the daemon: a map unloaded between the audit and its
    deletes gets outcome `error`; the other maps are still cleaned."""
    from sockguard.kernel.remediation import clean_each_map, deletions

    dummy, _peer = tcp_pair()  # closed by the fixture: closing unlinks it from every map
    fds, pins = [], []
    try:
        for i in range(2):
            fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_SOCKHASH, f"sg_gone{i}", 44, 4, 64)
            pin = bpffs_dir / f"gone{i}"
            libbpf.obj_pin(fd, str(pin))
            for j in range(3):
                key = cilium_key("10.97.0.1", 80, f"10.97.{i}.{j + 2}", 31000 + j)
                libbpf.map_update(fd, key, struct.pack("i", dummy.fileno()))
            fds.append(fd)
            pins.append(pin)
        maps, _ = select_maps([str(p) for p in pins])
        audit = run_audit(maps, CILIUM, AuditPolicy(), confirm_delay=0.01)
        assert [r.count(Kind.STALE) for r in audit.results] == [3, 3]
        gone = audit.results[0].map.id
        pins[0].unlink()
        os.close(fds.pop(0))  # the last reference: the map is freed, its id no longer opens
        # ... once the kernel has dropped the references the audit's programs and links
        # held (released asynchronously on some kernels, 5.10 among them).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.close(libbpf.map_fd_by_id(gone))
            except OSError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"map id {gone} still opens 10 s after its last fd was closed")
        cleaned = clean_each_map(audit.results, apply=True)
        assert [(c.map.id == gone, c.error is not None) for c in cleaned] \
            == [(True, True), (False, False)]
        out = deletions(cleaned)
        outcomes = sorted((d.finding.map.id == gone, d.outcome) for d in out)
        assert outcomes == [(False, "deleted")] * 3 + [(True, "error")] * 3
        assert all("not deleted" in d.reason for d in out if d.outcome == "error")
    finally:
        for fd in fds:
            os.close(fd)
