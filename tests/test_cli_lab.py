"""`sockguard audit` and `sockguard clean` against the real-kernel lab.

The CLI runs as a separate process, exactly as an operator runs it; the lab
provides a Cilium-compatible sockops + sk_msg pair on a child cgroup, pods as
network namespaces and real TCP between them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

import pytest

from sockguard.kernel.netns import entered
from tests.lab import (
    Lab,
    cilium_key,
    close_rst,
    key_for,
    proc_tcp_state,
    raw_key,
    recv_exact,
    sockmap_prog_query_supported,
)

pytestmark = pytest.mark.kernel

SERVER_PORT = 8080
CLIENT_PORT = 40000
SO_COOKIE = 57


def sockguard(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sockguard", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def audit_json(lab: Lab, *extra: str) -> tuple[int, dict[str, Any]]:
    proc = sockguard("audit", "--map", str(lab.pin_path), "--json", *extra)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def entry_cookie_ok(doc: dict[str, Any], finding: dict[str, Any], sock: socket.socket) -> bool:
    """The finding names ``sock`` as the entry's socket as exactly as its source can."""
    [m] = [m for m in doc["maps"] if m["id"] == finding["map"]["id"]]
    if m["exactness"] == "cookie":
        return bool(finding["entry_cookie"] == cookie(sock))
    return m["exactness"] == "tuple" and finding["entry_cookie"] is None


def cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)


def inject_each(lab: Lab, keys: list[bytes]) -> list[socket.socket]:
    """One fresh dummy socket per key: a socket already in a map with an sk_msg
    program cannot be inserted again (EBUSY, sock_map_link)."""
    socks = [s for _ in range((len(keys) + 1) // 2) for s in lab.dummy_pair()]
    for k, s in zip(keys, socks, strict=False):
        lab.inject(k, s)
    return socks[: len(keys)]


def by_key(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["key_hex"]: f for f in doc["findings"]}


def test_live_connections_in_every_namespace_are_ok(lab3: Lab, entry_source: str) -> None:
    a, b, c = lab3.pods
    conns = [
        lab3.pair(b, a, SERVER_PORT),
        lab3.pair(c, b, SERVER_PORT + 1),
        lab3.pair(lab3.node, c, SERVER_PORT + 2),
        lab3.pair(a, c, SERVER_PORT + 3, family=socket.AF_INET6),
    ]
    keys = set(lab3.keys())
    assert keys == {key_for(s) for pair in conns for s in pair}

    code, doc = audit_json(lab3, "--all", "--entry-source", entry_source)

    assert code == 0
    findings = by_key(doc)
    assert set(findings) == {k.hex() for k in keys}
    assert {f["kind"] for f in findings.values()} == {"ok"}
    assert doc["maps"][0]["source"] == entry_source
    assert doc["maps"][0]["exactness"] in ("cookie", "tuple")
    assert doc["maps"][0]["counts"] == {"ok": 8, "stale": 0, "shadowing": 0, "proxy": 0,
                                        "recvpath": 0}
    for pair in conns:
        for s in pair:
            f = findings[key_for(s).hex()]
            assert f["socket"]["cookie"] == cookie(s)
            assert (f["details"]["verified_by_cookie"] is True
                    or f["details"]["verified_by_tuple"] is True)
    # --all names the process of ok entries' sockets too (this test process holds them)
    assert {f["owner"]["pid"] for f in findings.values()} == {os.getpid()}
    netns_of = {f["socket"]["netns"]["name"] for f in findings.values()}
    assert netns_of == {ns.name for ns in (a, b, c, lab3.node)}


def test_injected_keys_without_a_live_socket_are_stale(lab: Lab, entry_source: str) -> None:
    a, b = lab.pods
    live = lab.pair(b, a, SERVER_PORT)
    stale = [cilium_key(a.addr(), SERVER_PORT, b.addr(), 50000 + i) for i in range(3)]
    stale.append(cilium_key("fd00:dead::1", 443, "fd00:dead::2", 50100, socket.AF_INET6))
    dummies = inject_each(lab, stale)

    code, doc = audit_json(lab, "--entry-source", entry_source)

    assert code == 1
    findings = by_key(doc)
    assert set(findings) == {k.hex() for k in stale}
    for k, dummy in zip(stale, dummies, strict=True):
        f = findings[k.hex()]
        assert f["kind"] == "stale" and f["confirmed"] is True
        assert f["map"]["path"] == str(lab.pin_path)
        assert entry_cookie_ok(doc, f, dummy)
    v6 = findings[stale[-1].hex()]["key"]
    assert v6 == {"family": 6, "sip": "fd00:dead::2", "sport": 50100,
                  "dip": "fd00:dead::1", "dport": 443}
    assert all(key_for(s).hex() not in findings for s in live)

    text = sockguard("audit", "--map", str(lab.pin_path), "--entry-source", entry_source)
    assert text.returncode == 1
    assert f"{b.addr()}:50000 -> {a.addr()}:{SERVER_PORT}" in text.stdout


def test_incident_hang_is_reported_as_shadowing_and_cleaned(lab: Lab, entry_source: str) -> None:
    server_pod, client_pod = lab.pods
    s_ip, c_ip = server_pod.addr(), client_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)
    dummy, _ = lab.dummy_pair()
    # The key the server side of a *future* connection c_ip:40000 -> s_ip:8080 will get.
    future = cilium_key(s_ip, SERVER_PORT, c_ip, CLIENT_PORT)
    lab.inject(future, dummy)

    cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    srv = lab.accept(listener)
    assert proc_tcp_state(client_pod.path, cli) == "ESTABLISHED"
    assert proc_tcp_state(server_pod.path, srv) == "ESTABLISHED"
    cli.sendall(b"GET /healthz")
    srv.settimeout(1.0)
    with pytest.raises(TimeoutError):
        srv.recv(64)  # the incident's hang: the payload went elsewhere
    assert recv_exact(dummy, 12) == b"GET /healthz"

    code, doc = audit_json(lab, "--entry-source", entry_source)
    assert code == 1
    [finding] = [f for f in doc["findings"] if f["key_hex"] == future.hex()]
    assert finding["kind"] == "shadowing" and finding["confirmed"] is True
    assert finding["socket"]["cookie"] == cookie(srv)  # the endangered connection
    assert finding["socket"]["netns"]["name"] == server_pod.name
    assert entry_cookie_ok(doc, finding, dummy)
    assert finding["owner"]["comm"].startswith("py")
    assert [f["kind"] for f in doc["findings"]] == ["shadowing"]

    dry = sockguard("clean", "--map", str(lab.pin_path), "--json", "--entry-source", entry_source)
    assert dry.returncode == 1, dry.stderr
    assert [d["outcome"] for d in json.loads(dry.stdout)["deletions"]] == ["would-delete"]
    assert future in lab.keys()

    done = sockguard("clean", "--map", str(lab.pin_path), "--apply", "--json",
                     "--entry-source", entry_source)
    assert done.returncode == 0, done.stderr
    deletions = json.loads(done.stdout)["deletions"]
    assert [(d["outcome"], d["key_hex"]) for d in deletions] == [("deleted", future.hex())]
    assert "deleted shadowing entry" in done.stderr
    assert future not in lab.keys()

    close_rst(cli)
    close_rst(srv)
    cli2 = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    srv2 = lab.accept(listener)
    cli2.sendall(b"ping")
    assert recv_exact(srv2, 4) == b"ping"
    srv2.sendall(b"pong")
    assert recv_exact(cli2, 4) == b"pong"
    assert key_for(srv2) in lab.keys()  # accelerated again, under its own key
    assert audit_json(lab, "--entry-source", entry_source)[0] == 0


def test_clean_under_churn_deletes_no_live_entry(lab3: Lab, entry_source: str) -> None:
    _churn_clean(lab3, entry_source)


def test_cookie_less_clean_under_churn_deletes_no_live_entry(lab3: Lab) -> None:
    """Port reuse without an entry source (keys only): the re-check before each delete
    still protects every live connection."""
    _churn_clean(lab3, "syscall")


def _churn_clean(lab3: Lab, entry_source: str) -> None:
    a, b, c = lab3.pods
    injected = {cilium_key(a.addr(), 9999, c.addr(), 61000 + i) for i in range(20)}
    inject_each(lab3, sorted(injected))
    long_lived = [lab3.pair(b, a, SERVER_PORT + i) for i in range(3)]
    long_keys = {key_for(s) for pair in long_lived for s in pair}
    listener = lab3.listen(a, port=7000, backlog=128)
    stop = threading.Event()
    churned: list[bytes] = []
    errors: list[BaseException] = []

    def churn(client_ns_index: int) -> None:
        client_ns = (b, c)[client_ns_index]
        try:
            while not stop.is_set():
                cli = lab3.connect(client_ns, a.addr(), 7000)
                churned.append(key_for(cli))
                # The server may close first: a reset or broken pipe is churn too.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    cli.sendall(b"x")
                close_rst(cli) if len(churned) % 2 else cli.close()
        except BaseException as exc:
            errors.append(exc)

    def accept_loop() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()

    threads = [threading.Thread(target=churn, args=(i,)) for i in (0, 1)]
    threads.append(threading.Thread(target=accept_loop))
    for t in threads:
        t.start()
    deleted: set[str] = set()
    try:
        for _ in range(3):
            proc = sockguard("clean", "--map", str(lab3.pin_path), "--apply", "--json",
                             "--entry-source", entry_source,
                             "--confirm-delay", "0.05")
            assert proc.returncode in (0, 1), proc.stderr
            for d in json.loads(proc.stdout)["deletions"]:
                if d["outcome"] == "deleted":
                    deleted.add(d["key_hex"])
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert deleted <= {k.hex() for k in injected}, "a live connection's entry was deleted"
    assert not errors, [traceback.format_exception(e) for e in errors]
    assert len(churned) > 20, "churn did not run"
    assert deleted == {k.hex() for k in injected}
    remaining = set(lab3.keys())
    assert long_keys <= remaining
    assert not (remaining & injected)
    for cli, srv in long_lived:
        cli.sendall(b"still")
        assert recv_exact(srv, 5) == b"still"


def test_audit_and_clean_refuse_a_key_owned_by_a_live_socket_found_late(lab: Lab) -> None:
    """The incident's raw key bytes, decoded in the human table."""
    dummy, _ = lab.dummy_pair()
    incident_key = raw_key("10.10.134.48", 8080, "10.10.101.249", 56184)
    lab.inject(incident_key, dummy)
    proc = sockguard("audit", "--map", str(lab.pin_path))
    assert proc.returncode == 1
    assert "10.10.134.48:8080 -> 10.10.101.249:56184" in proc.stdout
    assert "stale" in proc.stdout


def test_entry_of_a_reset_socket_held_open_is_stale(lab: Lab, entry_source: str) -> None:
    """A reset socket keeps its key until its process closes the fd: that key
    blocks the next connection with the same tuple, so it is stale."""
    a, b = lab.pods
    cli, srv = lab.pair(b, a, SERVER_PORT, src_port=CLIENT_PORT)
    cli_key, srv_key = key_for(cli), key_for(srv)
    # Asked now: a reset socket leaves sock_diag, and on kernels before 5.12 the
    # iterator can only read a cookie that something already generated.
    srv_cookie = cookie(srv)
    close_rst(cli)  # the server side is reset; its process keeps the fd

    deadline = time.monotonic() + 2
    while cli_key in lab.keys() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv_key in lab.keys()
    code, doc = audit_json(lab, "--entry-source", entry_source)
    assert code == 1
    [f] = doc["findings"]
    assert (f["key_hex"], f["kind"]) == (srv_key.hex(), "stale")
    assert f["details"]["entry_socket_state"] == "CLOSE"
    assert (f["entry_cookie"] == srv_cookie
            or (f["entry_cookie"] is None and doc["maps"][0]["exactness"] == "tuple"))


def test_maps_lists_the_lab_map_with_its_program_and_entries(lab: Lab) -> None:
    lab.pair(*lab.pods, SERVER_PORT)
    proc = sockguard("maps", "--json")
    assert proc.returncode == 0, proc.stderr
    [m] = [m for m in json.loads(proc.stdout)["maps"] if m["path"] == str(lab.pin_path)]
    assert (m["name"], m["type"], m["key_size"], m["value_size"]) == (
        "cilium_sock_ops", "sockhash", 44, 4)
    assert m["entries"] == 2 and m["max_entries"] == 65535
    text = sockguard("maps", "--map", str(lab.pin_path))
    assert text.returncode == 0
    assert "cilium_sock_ops" in text.stdout
    if not sockmap_prog_query_supported():  # before kernel 6.0 no one can list them
        assert m["programs"] is None and "kernel cannot list" in text.stdout
        return
    assert [p.split(":")[:2] for p in m["programs"]] == [["sk_msg", "lab_sk_msg"]]
    assert "sk_msg:lab_sk_msg" in text.stdout


def test_audit_discovers_the_pinned_map_without_map_flag(lab: Lab, entry_source: str) -> None:
    a, b = lab.pods
    [dummy] = inject_each(lab, [cilium_key(a.addr(), 1, b.addr(), 2)])
    proc = sockguard("audit", "--json", "--entry-source", entry_source)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    ours = [f for f in doc["findings"] if f["map"]["path"] == str(lab.pin_path)]
    assert [f["kind"] for f in ours] == ["stale"]
    assert entry_cookie_ok(doc, ours[0], dummy)


def test_l7_proxy_entry_is_proxy_not_stale(lab: Lab) -> None:
    """Cilium's proxy redirect: sip = host gateway, sport = proxy port, dip:dport =
    the client's own local side; it does not describe its socket's full tuple.
    The evidence that it is one: the proxy listens on that port in the host netns."""
    a, b = lab.pods
    listener = lab.listen(a, port=SERVER_PORT)
    # The client is made outside the lab cgroup so that sockops does not key it by
    # its tuple; it is then inserted under the proxy key, as Cilium's sockops does.
    with entered(b.path):
        cli = lab.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    cli.settimeout(5)
    cli.connect((a.addr(), SERVER_PORT))
    lab.accept(listener)
    client_ip, client_port = cli.getsockname()[:2]
    # "The proxy": a listener in the host namespace (where this test runs), no traffic.
    proxy = lab.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(1)
    gateway, proxy_port = b.gw4, proxy.getsockname()[1]
    entry = raw_key(gateway, proxy_port, client_ip, client_port)
    lab.inject(entry, cli)

    for extra in (("--proxy-ip", str(gateway)), ()):  # with or without cilium_host known
        code, doc = audit_json(lab, "--all", *extra)
        assert code == 0, doc
        [f] = [f for f in doc["findings"] if f["key_hex"] == entry.hex()]
        assert f["kind"] == "proxy"
        assert f["entry_cookie"] == cookie(cli)
        assert f["socket"]["local"] == f"{client_ip}:{client_port}"
        dry = sockguard("clean", "--map", str(lab.pin_path), "--json", *extra)
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout)["deletions"] == []
    cleaned = sockguard("clean", "--map", str(lab.pin_path), "--apply", "--json")
    assert cleaned.returncode == 0, cleaned.stderr
    assert entry in lab.keys()


def test_gateway_sourced_connection_is_ok_stale_or_shadowing(lab: Lab, entry_source: str) -> None:
    """Host -> pod from cilium_host's address (kubelet's probes) is judged like any connection,
    although that address is also the one L7-proxy entries carry."""
    pod, _ = lab.pods
    gateway, pod_ip = str(pod.gw4), pod.addr()
    gw = ("--proxy-ip", gateway, "--entry-source", entry_source)
    listener = lab.listen(pod, port=SERVER_PORT)
    probe_cli = lab.connect(lab.node, pod_ip, SERVER_PORT, src_ip=gateway)
    probe_srv = lab.accept(listener)
    assert key_for(probe_srv) in lab.keys()
    assert raw_key(gateway, probe_cli.getsockname()[1], pod_ip, SERVER_PORT) == key_for(probe_srv)

    code, doc = audit_json(lab, "--all", *gw)  # live: ok, not proxy
    assert code == 0, doc
    assert {f["kind"] for f in doc["findings"]} == {"ok"} and len(doc["findings"]) == 2

    # left behind: an entry of a gateway connection that is gone, beside a live one
    left = cilium_key(pod_ip, SERVER_PORT, gateway, 45000)
    inject_each(lab, [left])
    code, doc = audit_json(lab, *gw)
    assert code == 1
    assert [(f["key_hex"], f["kind"]) for f in doc["findings"]] == [(left.hex(), "stale")]

    # colliding: the pod side of the next probe from gateway:CLIENT_PORT
    future = cilium_key(pod_ip, SERVER_PORT, gateway, CLIENT_PORT)
    [dummy] = inject_each(lab, [future])
    cli = lab.connect(lab.node, pod_ip, SERVER_PORT, src_ip=gateway, src_port=CLIENT_PORT)
    srv = lab.accept(listener)
    cli.sendall(b"GET /healthz")
    srv.settimeout(1.0)
    with pytest.raises(TimeoutError):
        srv.recv(64)
    assert recv_exact(dummy, 12) == b"GET /healthz"
    code, doc = audit_json(lab, *gw)
    assert code == 1
    kinds = {f["key_hex"]: f["kind"] for f in doc["findings"]}
    assert kinds == {left.hex(): "stale", future.hex(): "shadowing"}
    [shadow] = [f for f in doc["findings"] if f["kind"] == "shadowing"]
    assert shadow["socket"]["cookie"] == cookie(srv)

    done = sockguard("clean", "--map", str(lab.pin_path), "--apply", "--json", *gw)
    assert done.returncode == 0, done.stderr
    deleted = {d["key_hex"] for d in json.loads(done.stdout)["deletions"]
               if d["outcome"] == "deleted"}
    assert deleted == {left.hex(), future.hex()}
    assert key_for(probe_srv) in lab.keys() and key_for(probe_cli) in lab.keys()
    close_rst(cli)
    close_rst(srv)
    cli2 = lab.connect(lab.node, pod_ip, SERVER_PORT, src_ip=gateway, src_port=CLIENT_PORT)
    srv2 = lab.accept(listener)
    cli2.sendall(b"ping")
    assert recv_exact(srv2, 4) == b"ping"
    assert audit_json(lab, *gw)[0] == 0
