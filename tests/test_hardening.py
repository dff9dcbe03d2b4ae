"""Hardening against local users and odd values: escaping, the metrics endpoint, labels.

The endpoint tests talk to a real ``MetricsServer`` over loopback TCP; the
daemon-level tests (1,100 idle connections, a vanished map's gauges) are in
test_daemon.py.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import resource
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from sockguard.cli.output import audit_json, audit_text, clean_text
from sockguard.core.audit import AuditResult
from sockguard.core.errors import FdExhaustedError, MapNotFoundError
from sockguard.core.escape import printable
from sockguard.core.layout import CILIUM, decode
from sockguard.core.model import Finding, Kind, MapEntry, MapInfo, Owner
from sockguard.kernel.libbpf import BpfError
from sockguard.kernel.node_audit import NodeAudit
from sockguard.kernel.remediation import Deletion
from sockguard.service import metrics as metrics_mod
from sockguard.service.daemon import failure_reason, metrics_url
from sockguard.service.metrics import Metrics, MetricsServer, Snapshot, start_server
from sockguard.service.notify import EscapingFormatter, JournaldHandler, StderrFormatter
from tests.lab import Lab

EVIL = "evil\n2026-12-01 ERROR forged\x1b[31m"
SAMPLE_KEY = bytes.fromhex("0a0a8630" + "00" * 12 + "0a0a65f9" + "00" * 12
                         + "01000000" + "1f900000" + "db780000")


# -- escaping --------------------------------------------------------------------------------


def _evil_finding() -> Finding:
    info = MapInfo(7, "cilium_sock_ops", "sockhash", 44, 4, 65535)
    entry = MapEntry(SAMPLE_KEY.hex(), decode(CILIUM, SAMPLE_KEY))
    return Finding(Kind.STALE, info, entry, f"no live socket; last seen by {EVIL}",
                   owner=Owner(4242, EVIL))


def test_printable_escapes_control_characters_only() -> None:
    assert printable(EVIL) == "evil\\n2026-12-01 ERROR forged\\x1b[31m"
    assert printable("a\rb\tc\x00d\x7fe\x9bf\u2028g") == "a\\rb\\tc\\x00d\\x7fe\\x9bf\\u2028g"
    plain = "cilium-agent[123] 10.0.0.1:80 -> [fd00::1]:443 ümlaut"
    assert printable(plain) == plain


def test_text_table_and_reasons_escape_comm_json_keeps_it_raw() -> None:
    f = _evil_finding()
    audit = NodeAudit(results=[AuditResult(f.map, 1, [f])], namespaces=[], sockets=0)
    text = audit_text(audit)
    assert "\x1b" not in text and "\nforged" not in text
    assert not any(line.startswith("2026-12-01") for line in text.splitlines())
    assert "evil\\n2026-12-01 ERROR forged\\x1b[31m[4242]" in text  # the PROCESS column
    doc = json.loads(audit_json(audit))
    assert doc["findings"][0]["owner"]["comm"] == EVIL  # JSON: raw, escaped by JSON itself
    cleaned = clean_text([Deletion(f, "refused", f"refused: owner {EVIL}")], applied=True)
    assert "\x1b" not in cleaned and len(cleaned.splitlines()) == 2  # header + one row


def _record(logger: str, msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(logger, logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_stderr_log_lines_escape_comm_and_fields_journal_stays_raw() -> None:
    rec = _record("sockguard.service.daemon", "socket %s (pid %d %s) receives via %s", "1 -> 2",
                  42, EVIL, "tcp_recvmsg", SOCKGUARD_COMM=EVIL, SOCKGUARD_PID=42)
    line = StderrFormatter().format(rec)
    assert "\n" not in line and "\x1b" not in line
    assert "pid 42 evil\\n2026-12-01 ERROR forged\\x1b[31m" in line
    assert "SOCKGUARD_COMM=evil\\n2026-12-01 ERROR forged\\x1b[31m" in line
    assert rec.getMessage().count("\n") == 1, "the record itself is left untouched"
    cli = EscapingFormatter("sockguard: %(message)s").format(
        _record("sockguard", "deleted entry owned by %s", EVIL))
    assert cli == "sockguard: deleted entry owned by evil\\n2026-12-01 ERROR forged\\x1b[31m"
    sent: list[dict[str, str]] = []
    fields = JournaldHandler(sender=sent.append).fields(rec)
    assert fields["SOCKGUARD_COMM"] == EVIL and EVIL in fields["MESSAGE"]  # framed, raw


def test_a_traceback_keeps_its_lines_after_the_escaped_message() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        rec = logging.LogRecord("sockguard.service.daemon", logging.ERROR, __file__, 1,
                                "cycle crashed for %s", (EVIL,), sys.exc_info())
    out = StderrFormatter().format(rec)
    first, *rest = out.splitlines()
    assert "forged\\x1b[31m" in first and rest[0].startswith("Traceback")


# -- failure labels, URLs ----------------------------------------------------------------------


def test_fd_exhaustion_is_labelled_as_such_wherever_it_surfaces() -> None:
    assert failure_reason(OSError(errno.EMFILE, "Too many open files")) == "fd_exhausted"
    assert failure_reason(OSError(errno.ENFILE, "Too many open files in system")) \
        == "fd_exhausted"
    assert failure_reason(FdExhaustedError("x")) == "fd_exhausted"
    try:  # an EMFILE wrapped into another error still counts as fd exhaustion
        try:
            raise BpfError(errno.EMFILE, "bpf_obj_get")
        except BpfError as exc:
            raise MapNotFoundError("cannot open pinned object") from exc
    except MapNotFoundError as wrapped:
        assert failure_reason(wrapped) == "fd_exhausted"
    assert failure_reason(MapNotFoundError("no such pinned map")) == "map_not_found"
    assert "fd_exhausted" in metrics_mod.FAILURE_REASONS


def test_metrics_url_brackets_ipv6() -> None:
    assert metrics_url("127.0.0.1", 9795) == "http://127.0.0.1:9795/metrics"
    assert metrics_url("::1", 9795) == "http://[::1]:9795/metrics"


def test_forget_map_drops_only_that_maps_series() -> None:
    m = Metrics()
    two = [MapInfo(i, f"m{i}", "sockhash", 44, 4, 16) for i in (1, 2)]
    audit = NodeAudit(results=[AuditResult(i, 3, []) for i in two], namespaces=[], sockets=5)
    m.audit_succeeded(audit, [], 0.1, time.time())
    assert m.exported_maps() == [(1, "m1"), (2, "m2")]
    m.forget_map(1)
    get = m.registry.get_sample_value
    assert get("sockguard_map_entries", {"map_id": "1", "map_name": "m1"}) is None
    assert get("sockguard_map_entries", {"map_id": "2", "map_name": "m2"}) == 3
    assert get("sockguard_live_sockets") == 5
    assert isinstance(Snapshot(), Snapshot)


# -- the endpoint ------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    srv = start_server(Metrics(), "127.0.0.1", 0)
    yield srv
    srv.shutdown()
    srv.server_close()


def _scrape(port: int, host: str = "127.0.0.1") -> tuple[float, bytes]:
    t0 = time.monotonic()
    body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
    return time.monotonic() - t0, body


def _raise_nofile(want: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return soft, hard


def test_idle_and_slow_clients_are_dropped_and_connections_are_bounded(
        server: MetricsServer) -> None:
    port = server.server_address[1]
    old = _raise_nofile(4096)
    conns: list[socket.socket] = []
    try:
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes its request
        conns.append(slow)
        for _ in range(300):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        seconds, body = _scrape(port)
        assert seconds < 1.0 and b"sockguard_audits_total" in body
        assert server.open_connections <= metrics_mod.MAX_CONNECTIONS
        assert threading_count() <= 3, "one serving thread, not one per connection"
        time.sleep(metrics_mod.REQUEST_TIMEOUT + 0.5)
        assert server.open_connections == 0, "idle and slow clients are dropped"
        slow.settimeout(2)
        assert slow.recv(100) == b"", "the slow client got closed, not answered"
    finally:
        for c in conns:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def threading_count() -> int:
    import threading
    return sum(1 for t in threading.enumerate() if t.name == "metrics")


def test_endpoint_answers_like_prometheus_client_and_refuses_garbage(
        server: MetricsServer) -> None:
    port = server.server_address[1]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", method="OPTIONS")
    assert urllib.request.urlopen(req, timeout=5).headers["Allow"] == "OPTIONS,GET"
    om = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={
        "Accept": "application/openmetrics-text; version=1.0.0"})
    assert urllib.request.urlopen(om, timeout=5).read().rstrip().endswith(b"# EOF")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n")
        reply = io.BytesIO()
        while chunk := s.recv(4096):
            reply.write(chunk)
        assert reply.getvalue().startswith(b"HTTP/1.1 400")


def test_healthz_answers_what_the_daemon_says_and_nothing_else_changes() -> None:
    answer: list[object] = [(True, "ok: fine")]

    def health() -> tuple[bool, str]:
        value = answer[0]
        if isinstance(value, Exception):
            raise value
        assert isinstance(value, tuple)
        return value

    srv = start_server(Metrics(), "127.0.0.1", 0, health)
    port = srv.server_address[1]

    def get(path: str, method: str = "GET") -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    try:
        assert get("/healthz") == (200, b"ok: fine\n")
        answer[0] = (False, "hung: no progress")
        assert get("/healthz") == (503, b"hung: no progress\n")
        assert get("/healthz?x=1")[0] == 503, "the query does not change the path"
        status, body = get("/metrics")
        assert status == 200 and b"sockguard_audits_total" in body, "metrics unaffected"
        assert get("/healthz", "POST")[0] == 405, "still read-only"
        answer[0] = RuntimeError("bug")
        assert get("/healthz")[0] == 500, "a failing answer is an error, not a hang"
        assert get("/metrics")[0] == 200, "and the endpoint stays up"
    finally:
        srv.shutdown()
        srv.server_close()
    # a server given no answer serves the metrics on /healthz too, as on any other path
    with_none = start_server(Metrics(), "127.0.0.1", 0)
    try:
        _t, body = _scrape(with_none.server_address[1])
        url = f"http://127.0.0.1:{with_none.server_address[1]}/healthz"
        assert b"sockguard_build_info" in urllib.request.urlopen(url, timeout=5).read()
    finally:
        with_none.shutdown()
        with_none.server_close()


def test_endpoint_on_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    srv = start_server(Metrics(), "::1", 0)
    try:
        _seconds, body = _scrape(srv.server_address[1], "[::1]")
        assert b"sockguard_build_info" in body
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.kernel
def test_a_pinned_map_unopenable_for_want_of_fds_is_not_called_missing(lab: Lab) -> None:
    """EMFILE while resolving a real pin: FdExhaustedError, labelled ``fd_exhausted``.

    Before, ``_resolve_path`` turned every bpf_obj_get error into MapNotFoundError and
    the daemon counted an fd-starved audit as ``map_not_found``.
    """
    from sockguard.kernel import maps

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
        with pytest.raises(OSError) as full:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        assert full.value.errno == errno.EMFILE
        with pytest.raises(FdExhaustedError) as exc:
            maps.resolve_map(str(lab.pin_path))
        with pytest.raises(FdExhaustedError):
            maps.resolve_map("cilium_sock_ops")  # by name: the id scan opens fds too
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "out of file descriptors" in str(exc.value)
    assert failure_reason(exc.value) == "fd_exhausted"
    assert maps.resolve_map(str(lab.pin_path)).id > 0  # and fine again with fds to spare
