"""Prometheus metrics of the daemon, in a registry of their own.

Why a dedicated ``CollectorRegistry``: the default one also exports the
process/platform collectors of whatever else imports prometheus_client, and
tests build several ``Metrics`` in one process.

Per-map series (entries, findings) come from a custom collector that reads
the last successful audit's snapshot, swapped in as one reference: a scrape
never sees half of one audit and half of another, and a map that disappeared
stops being exported instead of freezing at its last value.

Label values are bounded: ``kind`` is a finding kind, ``reason`` one of the
fixed tuples below, ``map_id``/``map_name`` the (few) audited maps.

The endpoint (``MetricsServer``) serves prometheus_client's WSGI app: it
answers GET (any path but ``/healthz`` serves the metrics) and OPTIONS, and
refuses every other method with 405, so it is read-only.  ``GET /healthz`` is
the liveness answer the daemon gives (``Health``): 200 while its audits make
progress, 503 when they hang — what systemd's watchdog sees on a host, for a
Kubernetes livenessProbe where there is no systemd.  It runs in one thread
with a bounded number of connections and per-connection timeouts, so local
users holding connections open cannot take the daemon's threads or file
descriptors.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import platform
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sockguard import __version__
from sockguard.core.model import Kind
from sockguard.core.policy import DELETED_KINDS as DELETED_KINDS
from sockguard.core.policy import EXPORTED_KINDS
from sockguard.kernel.node_audit import NodeAudit
from sockguard.kernel.remediation import DONE_OUTCOMES, Deletion, Refusal
from sockguard.trace.detections import TRACER_DETECTIONS
from sockguard.trace.events import DROP_CALLERS, EARLY_AUDIT, UPDATE_ERRNOS

log = logging.getLogger(__name__)

#: The ``kind`` labels of sockguard_findings, from the one policy table (sockguard/core/policy.py).
FINDING_KINDS: tuple[Kind, ...] = EXPORTED_KINDS
#: The ``reason`` labels of sockguard_deletions_refused, one per ``remediation.Refusal``.
REFUSAL_REASONS = tuple(r.value for r in Refusal)
FAILURE_REASONS = ("map_not_found", "map_gone", "not_a_sockmap", "layout_mismatch",
                   "permission", "bpffs", "libbpf", "fd_exhausted", "os_error", "internal")
RELOAD_RESULTS = ("success", "failure")
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def refusal_reason(d: Deletion) -> str:
    """The bounded label for a deletion that did not happen: the refusal remediation named.

    A deletion made without one (none of remediation's) counts as ``other``.
    """
    return (d.refusal or Refusal.OTHER).value


@dataclass(frozen=True)
class MapSample:
    map_id: int
    map_name: str
    entries: int
    findings: dict[Kind, int]
    pending: int
    undecodable: int
    entry_source: str = "syscall"
    exactness: str = "none"


@dataclass(frozen=True)
class Snapshot:
    """What the last successful audit saw, exported as gauges."""

    maps: tuple[MapSample, ...] = ()
    sockets: int = 0
    namespaces: int = 0
    taken: bool = False
    unreadable: int = 0  # namespaces that exist but could not be read
    vanished: int = 0
    unseen_entries: int = 0  # entries whose socket lives in a namespace no scan read
    unverified: int = 0

    @classmethod
    def of(cls, audit: NodeAudit) -> Snapshot:
        samples = tuple(
            MapSample(r.map.id, r.map.name, r.entries, {k: r.count(k) for k in FINDING_KINDS},
                      r.pending, len(r.undecodable), audit.sources.get(r.map.id, "syscall"),
                      audit.exactness.get(r.map.id, "none"))
            for r in audit.results
        )
        return cls(samples, audit.sockets, len(audit.namespaces), True, len(audit.unreadable),
                   len(audit.vanished), sum(audit.unseen.values()), audit.unverified)


class _SnapshotCollector(Collector):
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot  # one read: consistent for this scrape
        labels = ["map_id", "map_name"]
        entries = GaugeMetricFamily("sockguard_map_entries",
                                    "Entries in the map at the last successful audit",
                                    labels=labels)
        findings = GaugeMetricFamily(
            "sockguard_findings",
            "Confirmed findings by kind at the last successful audit (stale: no live socket owns "
            "the tuple; shadowing: a live connection's peer redirects into another socket; "
            "recvpath: a live owner reads with tcp_recvmsg although its key is in the map; "
            "proxy: L7-proxy entries)",
            labels=[*labels, "kind"])
        pending = GaugeMetricFamily("sockguard_pending_entries",
                                    "Entries whose tuple was mid-handshake (no verdict yet)",
                                    labels=labels)
        undecodable = GaugeMetricFamily("sockguard_undecodable_entries",
                                        "Keys the layout could not decode", labels=labels)
        exact = GaugeMetricFamily(
            "sockguard_entry_source_info",
            "How the last audit learned which socket each entry points to (source: iterator, "
            "tc_lookup, syscall; exactness: cookie, tuple, or none = shadowing cannot be told "
            "from ok on this map); always 1",
            labels=[*labels, "source", "exactness"])
        for m in snap.maps:
            lv = [str(m.map_id), m.map_name]
            entries.add_metric(lv, m.entries)
            for kind in FINDING_KINDS:
                findings.add_metric([*lv, kind.value], m.findings.get(kind, 0))
            pending.add_metric(lv, m.pending)
            undecodable.add_metric(lv, m.undecodable)
            exact.add_metric([*lv, m.entry_source, m.exactness], 1)
        yield from (entries, findings, pending, undecodable, exact)
        if snap.taken:
            yield GaugeMetricFamily("sockguard_maps_audited", "Maps audited by the last audit",
                                    value=len(snap.maps))
            yield GaugeMetricFamily("sockguard_live_sockets",
                                    "TCP sockets (all but LISTEN) seen in all namespaces",
                                    value=snap.sockets)
            yield GaugeMetricFamily("sockguard_namespaces_scanned",
                                    "Network namespaces scanned by the last audit",
                                    value=snap.namespaces)
            yield GaugeMetricFamily(
                "sockguard_namespaces_unreadable",
                "Namespaces the last audit could not read (out of fds, a failed dump) or that "
                "vanished during it: an owner there could not be seen", value=snap.unreadable
                + snap.vanished)
            yield GaugeMetricFamily(
                "sockguard_entries_in_unseen_namespaces",
                "Entries whose socket lives in a namespace no scan read (names deleted, "
                "sockets alive)", value=snap.unseen_entries)
            yield GaugeMetricFamily(
                "sockguard_unverified_entries",
                "Entries with no owner in the namespaces read whose own socket is unknown: "
                "not called stale, not deleted, because the scan was incomplete",
                value=snap.unverified)
            complete = not (snap.unreadable or snap.vanished or snap.unseen_entries)
            yield GaugeMetricFamily(
                "sockguard_audit_complete",
                "1 when the last audit saw every namespace it knows of and every entry's "
                "socket's namespace; 0: nothing is deleted for an absent owner",
                value=int(complete))

    def describe(self) -> Iterable[Metric]:
        return []


@dataclass
class Metrics:
    """Every metric the daemon exports, registered in ``registry``."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.audits = Counter("sockguard_audits", "Audit cycles started", registry=r)
        self.audit_failures = Counter("sockguard_audit_failures",
                                      "Audit cycles that failed, by reason", ["reason"], registry=r)
        self.audit_duration = Histogram("sockguard_audit_duration_seconds",
                                        "Duration of successful audit cycles (both looks and "
                                        "remediation)", buckets=DURATION_BUCKETS, registry=r)
        self.last_success = Gauge("sockguard_last_successful_audit_timestamp_seconds",
                                  "Unix time of the last successful audit (0: none yet)",
                                  registry=r)
        self.deletions = Counter("sockguard_deletions", "Map entries deleted, by finding kind",
                                 ["kind"], registry=r)
        self.refusals = Counter("sockguard_deletions_refused",
                                "Bad entries not deleted, by reason", ["reason"], registry=r)
        self.reloads = Counter("sockguard_config_reloads", "SIGHUP reloads, by result",
                               ["result"], registry=r)
        self.interval = Gauge("sockguard_audit_interval_seconds",
                              "Configured seconds between audits", registry=r)
        self.remediation_enabled = Gauge("sockguard_remediation_enabled",
                                         "1 when confirmed bad entries are deleted", registry=r)
        Info("sockguard_build", "sockguard version", registry=r).info(
            {"version": __version__, "python": platform.python_version()})
        # Bounded label sets exported from the start, so rate()/increase() see zeros.
        for reason in FAILURE_REASONS:
            self.audit_failures.labels(reason=reason)
        for kind in DELETED_KINDS:
            self.deletions.labels(kind=kind.value)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason=reason)
        for result in RELOAD_RESULTS:
            self.reloads.labels(result=result)
        self._snapshot = _SnapshotCollector()
        r.register(self._snapshot)
        self.tracer = TracerMetrics(r)  # see the tracer section below

    def audit_succeeded(self, audit: NodeAudit, deletions: Sequence[Deletion], seconds: float,
                        when: float) -> None:
        self._snapshot.snapshot = Snapshot.of(audit)
        self.count_deletions(deletions)
        self.audit_duration.observe(seconds)
        self.last_success.set(when)

    def count_deletions(self, deletions: Sequence[Deletion]) -> None:
        for d in deletions:
            if d.outcome == "deleted":
                self.deletions.labels(kind=d.finding.kind.value).inc()
            elif d.outcome not in DONE_OUTCOMES:
                self.refusals.labels(reason=refusal_reason(d)).inc()

    def exported_maps(self) -> list[tuple[int, str]]:
        """(id, name) of the maps whose per-map series are exported now."""
        return [(m.map_id, m.map_name) for m in self._snapshot.snapshot.maps]

    def forget_map(self, map_id: int) -> None:
        """Drop a vanished map's per-map series (the rest of the snapshot stays)."""
        snap = self._snapshot.snapshot
        self._snapshot.snapshot = replace(
            snap, maps=tuple(m for m in snap.maps if m.map_id != map_id))

    def audit_failed(self, reason: str) -> None:
        self.audit_failures.labels(reason=reason if reason in FAILURE_REASONS else "internal").inc()

    def configured(self, interval: float, remediate: bool) -> None:
        self.interval.set(interval)
        self.remediation_enabled.set(1 if remediate else 0)


# -- tracer events (sockguard/trace/tracer.py, consumed by daemon.TracerRunner) ----------------

#: Bounded label values, each list defined where its values are decided.
DETECTIONS = TRACER_DETECTIONS


class TracerMetrics:
    """Counters of what the tracer saw, and which of its detections are running.

    ``sockguard_detection_active{detection}`` is 0 for a detection the kernel
    does not allow (the journal says why at start): an alert on the counters
    alone would be silently blind there.
    """

    def __init__(self, r: CollectorRegistry) -> None:
        self.update_failures = Counter(
            "sockguard_sockhash_update_failures",
            "Sockhash inserts that failed, by errno (EEXIST: a stale key collides with a new "
            "connection)", ["errno"], registry=r)
        self.psock_drops = Counter(
            "sockguard_psock_drops", "psock drops by caller (update_failed: the insert of a "
            "socket failed and its psock was dropped, the incident's smoking gun)", ["caller"],
            registry=r)
        self.recvmsg_mismatches = Counter(
            "sockguard_recvmsg_mismatches",
            "Sockets that received via tcp_recvmsg while the key of their tuple was in a "
            "sockhash (their peer redirects into another socket)", registry=r)
        self.collisions = Counter(
            "sockguard_tracer_collisions",
            "Connections that became established while the entry of their key pointed to "
            "another socket (a stale key: the peer's payload goes there, this one hangs)",
            registry=r)
        self.early_audits = Counter(
            "sockguard_early_audits",
            "Audits started ahead of the interval by a tracer event, by trigger", ["trigger"],
            registry=r)
        self.active = Gauge("sockguard_detection_active",
                            "1 when the tracer detection runs on this kernel", ["detection"],
                            registry=r)
        self.collision_listening = Gauge(
            "sockguard_tracer_collision_check_listening",
            "1 while the collision check's tracepoint is attached: an audited map may hold a "
            "key a new connection can collide with (no audit has proved every entry owned "
            "since, or tracer.collision_check = always); 0 while idle or not running",
            registry=r)
        for e in UPDATE_ERRNOS:
            self.update_failures.labels(errno=e)
        for c in DROP_CALLERS:
            self.psock_drops.labels(caller=c)
        for t in EARLY_AUDIT:
            self.early_audits.labels(trigger=t.value)
        for d in DETECTIONS:
            self.active.labels(detection=d).set(0)

    def update_failed(self, errno_name: str) -> None:
        self.update_failures.labels(
            errno=errno_name if errno_name in UPDATE_ERRNOS else "other").inc()

    def psock_dropped(self, caller_class: str) -> None:
        self.psock_drops.labels(
            caller=caller_class if caller_class in DROP_CALLERS else "other").inc()

    def set_active(self, active: dict[str, bool]) -> None:
        for d in DETECTIONS:
            self.active.labels(detection=d).set(1 if active.get(d) else 0)


# -- the HTTP endpoint -----------------------------------------------------------------------

#: Open connections the endpoint keeps at once. A connection beyond it evicts the oldest
#: one still sending its request (a scraper sends its request at once, an idle one never).
MAX_CONNECTIONS = 64
#: Seconds a client has from connect to the end of its request (head and body), and to
#: read the whole response: a slow or idle client is dropped after that.
REQUEST_TIMEOUT = 3.0
RESPONSE_TIMEOUT = 5.0
#: Largest request accepted (head plus body); a scrape request is a few hundred bytes.
MAX_REQUEST_BYTES = 8192
#: Connections accepted per loop turn, so that a flood cannot evict a scraper whose
#: request is already in its socket before the loop reads it.
ACCEPT_BURST = 16
LISTEN_BACKLOG = 128
_SELECT_TICK = 0.25


#: The liveness answer: whether the daemon is making progress, and one line saying so.
Health = Callable[[], tuple[bool, str]]
HEALTH_PATH = "/healthz"


class _Conn:
    __slots__ = ("deadline", "inbuf", "outbuf", "sock", "writing")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.inbuf = bytearray()
        self.outbuf = memoryview(b"")
        self.writing = False


def _parse_request(data: bytes) -> tuple[dict[str, str], int] | None:
    """(WSGI environ, bytes the request takes) once ``data`` holds a whole request, else None.

    Raises ValueError for a malformed request (answered with 400).
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end].decode("latin-1").split("\r\n")
    parts = head[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("bad request line")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in head[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("bad header line")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or "0")
    if length < 0:
        raise ValueError("bad content-length")
    total = end + 4 + length
    if total > MAX_REQUEST_BYTES:
        raise ValueError("request too large")
    if len(data) < total:
        return None
    path, _, query = target.partition("?")
    environ = {"REQUEST_METHOD": method.upper(), "PATH_INFO": path, "QUERY_STRING": query,
               "HTTP_ACCEPT": headers.get("accept", ""),
               "HTTP_ACCEPT_ENCODING": headers.get("accept-encoding", "")}
    return environ, total


class MetricsServer:
    """The metrics endpoint: one thread, a bounded number of connections, timeouts.

    Why not prometheus_client's ``start_http_server``: it starts a thread per
    connection and waits on each forever, so any local user holding idle
    connections to the port takes the daemon's threads and file descriptors
    (the unit allows 1024 of those by default) until audits fail with EMFILE.
    Here one thread multiplexes every connection with ``selectors``: it
    accepts, reads the request, renders the registry with prometheus_client's
    own WSGI app (same answers: GET on any path, OPTIONS, 405 for the rest,
    gzip and OpenMetrics negotiation) and writes the response without
    blocking. At most ``MAX_CONNECTIONS`` are open; a client that has not sent
    its whole request within ``REQUEST_TIMEOUT`` or read its response within
    ``RESPONSE_TIMEOUT`` is dropped, and a new connection beyond the limit
    evicts the oldest one still sending its request.  Every response closes the
    connection (``Connection: close``).
    """

    def __init__(self, registry: CollectorRegistry, address: str, port: int,
                 health: Health | None = None) -> None:
        self._health = health
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((address, port))
            self._listener.listen(LISTEN_BACKLOG)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.server_address: tuple[Any, ...] = self._listener.getsockname()
        self._app = make_wsgi_app(registry)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._conns: dict[int, _Conn] = {}  # by fd, in accept order
        self._listen_paused_until = 0.0
        self._stopping = threading.Event()
        self.dropped = 0  # connections closed for a timeout or the limit (tests read it)
        self._thread = threading.Thread(target=self.serve_forever, name="metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            if self._listen_paused_until and now >= self._listen_paused_until:
                self._listen_paused_until = 0.0
                self._sel.register(self._listener, selectors.EVENT_READ)
            timeout = _SELECT_TICK
            if self._conns:
                soonest = min(c.deadline for c in self._conns.values())
                timeout = max(0.0, min(timeout, soonest - now))
            for key, _events in self._sel.select(timeout):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(64)
                else:
                    conn = self._conns.get(key.fd)
                    if conn is not None:
                        self._service(conn)
            now = time.monotonic()
            for conn in [c for c in self._conns.values() if c.deadline <= now]:
                self.dropped += 1
                self._close(conn)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, _addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds: free the oldest idle connection, and stop polling the
                    # listener for a moment instead of spinning on it.
                    if not self._evict():
                        self._sel.unregister(self._listener)
                        self._listen_paused_until = time.monotonic() + 0.1
                    return
                continue  # ECONNABORTED and friends: that client gave up
            if len(self._conns) >= MAX_CONNECTIONS and not self._evict():
                sock.close()
                self.dropped += 1
                continue
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + REQUEST_TIMEOUT)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ)

    def _evict(self) -> bool:
        """Close the oldest connection still sending its request; False if there is none."""
        for conn in self._conns.values():
            if not conn.writing:
                self.dropped += 1
                self._close(conn)
                return True
        return False

    def _service(self, conn: _Conn) -> None:
        if conn.writing:
            self._write(conn)
            return
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.inbuf += data
        try:
            parsed = _parse_request(bytes(conn.inbuf))
        except ValueError:
            self._respond(conn, "400 Bad Request", [], b"bad request\n")
            return
        if parsed is None:
            if len(conn.inbuf) > MAX_REQUEST_BYTES:
                self._respond(conn, "400 Bad Request", [], b"request too large\n")
            return
        environ, _size = parsed
        if (self._health is not None and environ["PATH_INFO"] == HEALTH_PATH
                and environ["REQUEST_METHOD"] == "GET"):
            self._answer_health(conn, self._health)
            return
        captured: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            captured[:] = [status, headers]

        try:
            body = b"".join(self._app(environ, start_response))
        except Exception:  # a collector bug must not take the endpoint down
            log.exception("metrics endpoint: rendering failed")
            self._respond(conn, "500 Internal Server Error", [], b"internal error\n")
            return
        self._respond(conn, captured[0], captured[1], body)

    def _answer_health(self, conn: _Conn, health: Health) -> None:
        try:
            alive, why = health()
        except Exception:  # a bug in the answer is not a hung daemon: say so, stay up
            log.exception("metrics endpoint: the liveness answer failed")
            self._respond(conn, "500 Internal Server Error", [], b"internal error\n")
            return
        status = "200 OK" if alive else "503 Service Unavailable"
        self._respond(conn, status, [("Content-Type", "text/plain; charset=utf-8")],
                      why.encode() + b"\n")

    def _respond(self, conn: _Conn, status: str, headers: list[tuple[str, str]],
                 body: bytes) -> None:
        lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers),
                 f"Content-Length: {len(body)}", "Connection: close", "", ""]
        conn.outbuf = memoryview("\r\n".join(lines).encode("latin-1") + body)
        conn.writing = True
        conn.deadline = time.monotonic() + RESPONSE_TIMEOUT
        self._sel.modify(conn.sock, selectors.EVENT_WRITE)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def shutdown(self) -> None:
        """Stop the serving thread (the listener stays bound until ``server_close``)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def server_close(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        self._sel.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()


def start_server(metrics: Metrics, address: str, port: int,
                 health: Health | None = None) -> MetricsServer:
    """Serve ``metrics`` (and ``health`` on /healthz) on address:port in a thread; returns
    the server (for shutdown)."""
    return MetricsServer(metrics.registry, address, port, health).start()
