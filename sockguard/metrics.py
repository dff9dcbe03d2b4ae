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

The endpoint is prometheus_client's WSGI server: it answers GET (any path
serves the metrics) and OPTIONS, and refuses every other method with 405, so
it is read-only without a wrapper.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .model import Kind
from .node_audit import NodeAudit
from .policy import DELETED_KINDS as DELETED_KINDS
from .policy import EXPORTED_KINDS
from .remediation import Deletion

#: The ``kind`` labels of sockguard_findings, from the one policy table (sockguard/policy.py).
FINDING_KINDS: tuple[Kind, ...] = EXPORTED_KINDS
REFUSAL_REASONS = ("live_owner", "reinserted", "proxy_entry", "owner_matches", "unproven",
                   "no_owner", "gone", "cap_reached", "error", "other")
FAILURE_REASONS = ("map_not_found", "map_gone", "not_a_sockmap", "layout_mismatch",
                   "permission", "bpffs", "libbpf", "os_error", "internal")
RELOAD_RESULTS = ("success", "failure")
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def refusal_reason(d: Deletion) -> str:
    """The bounded label for a deletion that did not happen, from remediation's outcome."""
    if d.outcome == "gone":
        return "gone"
    if d.outcome == "skipped-cap":
        return "cap_reached"
    text = d.reason
    if "re-inserted" in text:
        return "reinserted"
    if "L7 proxy" in text:
        return "proxy_entry"
    if "a live socket owns" in text:
        return "live_owner"
    if "belongs to its live owner" in text:
        return "owner_matches"
    if "--delete-unproven" in text:
        return "unproven"
    if "no live socket owns" in text:
        return "no_owner"
    return "other"


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

    @classmethod
    def of(cls, audit: NodeAudit) -> Snapshot:
        samples = tuple(
            MapSample(r.map.id, r.map.name, r.entries, {k: r.count(k) for k in FINDING_KINDS},
                      r.pending, len(r.undecodable), audit.sources.get(r.map.id, "syscall"),
                      audit.exactness.get(r.map.id, "none"))
            for r in audit.results
        )
        return cls(samples, audit.sockets, len(audit.namespaces), True)


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
            elif d.outcome != "would-delete":
                self.refusals.labels(reason=refusal_reason(d)).inc()

    def audit_failed(self, reason: str) -> None:
        self.audit_failures.labels(reason=reason if reason in FAILURE_REASONS else "internal").inc()

    def configured(self, interval: float, remediate: bool) -> None:
        self.interval.set(interval)
        self.remediation_enabled.set(1 if remediate else 0)


# -- tracer events (sockguard/tracer.py, consumed by daemon.TracerRunner) ----------------

#: Bounded label values (mirrors tracer.UPDATE_ERRNOS / DROP_CALLERS / capabilities.plan).
UPDATE_ERRNOS = ("EEXIST", "EBUSY", "EINVAL", "ENOMEM", "ENOSPC", "EOPNOTSUPP", "other")
DROP_CALLERS = ("close", "update_failed", "delete", "map_free", "other", "unknown")
DETECTIONS = ("update_failures", "psock_drops", "recv_path", "lifecycle")


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
            "socket failed and its psock was dropped, the seed's smoking gun)", ["caller"],
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
        for e in UPDATE_ERRNOS:
            self.update_failures.labels(errno=e)
        for c in DROP_CALLERS:
            self.psock_drops.labels(caller=c)
        for t in ("update_failure", "recv_mismatch", "key_left_behind"):
            self.early_audits.labels(trigger=t)
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


def start_server(metrics: Metrics, address: str, port: int) -> Any:
    """Serve ``metrics`` on address:port in a daemon thread; returns the server (for shutdown)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=address, registry=metrics.registry)
    return server
