"""``sockguard run``: the always-on node service.

Two threads, for a reason:

- the **audit thread** runs one cycle every ``audit.interval`` seconds
  (resolve maps, ``node_audit.run_audit``, then — only when
  ``remediation.enabled`` — ``remediation.clean`` with the same guards as
  ``sockguard clean --apply``: confirmed findings only, re-verified right
  before each delete, at most ``remediation.max_deletes`` per cycle).  It
  records a *heartbeat* whenever it makes progress: between phases of a
  cycle, at its end, and while it waits for the next one.
- the **main thread** acts on signals (SIGHUP reload, SIGTERM/SIGINT stop;
  received without a lock, see ``service/signals.py``) and sends
  ``WATCHDOG=1`` — but only while the audit thread's heartbeat is younger
  than half of WatchdogSec.  A hung audit (a stuck syscall, a netlink
  read that never returns) stops the heartbeat, the pings stop, and systemd's
  watchdog kills and restarts us: the pings measure real progress, they are
  not a free-running timer.  Where there is no systemd (a Kubernetes
  DaemonSet), ``GET /healthz`` on the metrics endpoint answers from the same
  heartbeat (``Daemon.health``): 503 once it is older than
  ``metrics.liveness_timeout``, for the livenessProbe.

sd_notify: ``READY=1`` is sent after the first *successful* audit (so
``systemctl start`` returning means sockguard has really looked at the maps),
``STATUS=`` after every cycle, ``RELOADING=1``/``READY=1`` around a reload and
``STOPPING=1`` at stop.

A failing cycle (map vanished, namespace gone, EPERM, anything else) is logged,
counted in ``sockguard_audit_failures_total{reason}`` and the daemon carries on.
SIGTERM stops the loop; an audit in progress gets ``STOP_GRACE`` seconds to
finish and is then abandoned (the process exits 0 without waiting for it;
BPF deletes are single syscalls, so nothing is left half-done).

Test hook (documented, tiny, inert unless set): when the environment variable
``SOCKGUARD_TEST_BLOCK_FILE`` names a file, every audit cycle blocks at its
start for as long as that file exists — it does not even look at the stop
flag, just like a hung syscall.  The watchdog and SIGTERM tests use it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sockguard.core.errors import (
    FD_ERRNOS,
    BpffsNotMountedError,
    FdExhaustedError,
    LayoutMismatchError,
    LibbpfMissingError,
    MapGoneError,
    MapNotFoundError,
    NotASockMapError,
    NotRootError,
    SockguardError,
    from_os_error,
)
from sockguard.core.layout import LAYOUTS
from sockguard.core.model import Finding, MapInfo
from sockguard.core.policy import SHOWN_KINDS
from sockguard.kernel import libbpf
from sockguard.kernel import maps as maps_adapter
from sockguard.kernel.capabilities import Detection
from sockguard.kernel.cilium import audit_policy
from sockguard.kernel.node_audit import NodeAudit, run_audit
from sockguard.kernel.remediation import Deletion, clean_each_map, deletions
from sockguard.kernel.sockhash_lookup import session as lookup_session
from sockguard.service.config import Config, describe, load_config, overrides_from_args
from sockguard.service.metrics import Metrics, start_server
from sockguard.service.notify import Notifier, make_log_handler, monotonic_usec
from sockguard.service.signals import SignalInbox, signal_name
from sockguard.trace.collision import CollisionGate
from sockguard.trace.events import EARLY_AUDIT, ENTRY_GONE_BAD, Meaning, TraceEvent
from sockguard.trace.tracer import (
    Tracer,
    TracerUnavailableError,
    attached_detections,
    daemon_options,
)
from sockguard.trace.watched import MapWatch

log = logging.getLogger("sockguard.service.daemon")

BLOCK_ENV = "SOCKGUARD_TEST_BLOCK_FILE"
#: Seconds an audit in progress may still take after SIGTERM before it is abandoned.
STOP_GRACE = 2.0
#: Longest sleep of either thread: bounds signal handling and heartbeat latency.
TICK = 0.25


def _out_of_fds(exc: BaseException) -> bool:
    """Whether ``exc`` or anything in its cause/context chain is EMFILE/ENFILE."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, FdExhaustedError) or (
                isinstance(cur, OSError) and cur.errno in FD_ERRNOS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def fd_usage() -> str:
    """"N fds open, RLIMIT_NOFILE M" as far as it can be told (listing needs an fd too)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        count = str(len(os.listdir("/proc/self/fd")))
    except OSError:
        count = "?"
    return f"{count} fds open, RLIMIT_NOFILE {soft}"


def failure_reason(exc: BaseException) -> str:
    """A bounded label for why a cycle failed (see metrics.FAILURE_REASONS).

    Running out of fds is decided first, whatever error it surfaced as: a map
    that cannot be opened for want of an fd is not a missing map.
    """
    if _out_of_fds(exc):
        return "fd_exhausted"
    if isinstance(exc, OSError):  # a kernel error nobody translated: as the adapters would
        exc = from_os_error(exc, "audit") or exc
    table: tuple[tuple[type[BaseException], str], ...] = (
        (MapNotFoundError, "map_not_found"),
        (MapGoneError, "map_gone"),
        (NotASockMapError, "not_a_sockmap"),
        (LayoutMismatchError, "layout_mismatch"),
        (NotRootError, "permission"),
        (BpffsNotMountedError, "bpffs"),
        (LibbpfMissingError, "libbpf"),
        (OSError, "os_error"),
    )
    for cls, reason in table:
        if isinstance(exc, cls):
            return reason
    return "internal"


def metrics_url(address: str, port: int) -> str:
    """``http://127.0.0.1:9795/metrics``; an IPv6 address in brackets (``http://[::1]:…``)."""
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/metrics"


def map_gone(map_id: int, name: str) -> bool:
    """Whether map ``map_id`` no longer exists (or the id is now another map's).

    Only a definite answer counts: an error other than ENOENT (EPERM, EMFILE)
    says nothing about the map, so it is not called gone.
    """
    try:
        fd = libbpf.map_fd_by_id(map_id)
    except OSError as exc:
        return exc.errno == errno.ENOENT
    try:
        return libbpf.map_info(fd).name != name
    except OSError:
        return False
    finally:
        os.close(fd)


def select_maps(cfg: Config) -> tuple[list[MapInfo], bool]:
    """Resolve the configured maps afresh each cycle (a map may be replaced by a restart)."""
    return maps_adapter.select_maps(cfg.maps, cfg.bpffs, cfg.discover_names)


def finding_fields(f: Finding) -> dict[str, object]:
    """The journal fields of a finding: ``journalctl SOCKGUARD_KIND=stale`` etc."""
    fields: dict[str, object] = {
        "SOCKGUARD_MAP_ID": f.map.id,
        "SOCKGUARD_MAP_NAME": f.map.name,
        "SOCKGUARD_KIND": f.kind.value,
        "SOCKGUARD_KEY": f.entry.key_hex,
        "SOCKGUARD_TUPLE": str(f.entry.key),
    }
    if f.entry.cookie is not None:
        fields["SOCKGUARD_ENTRY_COOKIE"] = f.entry.cookie
    if f.socket is not None:
        fields["SOCKGUARD_LIVE_SOCKET"] = str(f.socket.tuple)
        fields["SOCKGUARD_NETNS"] = f.socket.netns.name
    if f.owner is not None:
        fields["SOCKGUARD_PID"] = f.owner.pid
        fields["SOCKGUARD_COMM"] = f.owner.comm
        if f.owner.container:
            fields["SOCKGUARD_CONTAINER"] = f.owner.container
        if f.owner.pod_uid:
            fields["SOCKGUARD_POD_UID"] = f.owner.pod_uid
        if f.owner.pod:
            fields["SOCKGUARD_POD"] = f.owner.pod
    return fields


_handler: logging.Handler | None = None


def configure_logging(cfg: Config) -> None:
    """Route all ``sockguard.*`` (and other) logging to journald or stderr per ``log.*``."""
    global _handler
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    _handler = make_log_handler(cfg.log_target)
    root.addHandler(_handler)
    root.setLevel(getattr(logging, cfg.log_level.upper()))


class Daemon:
    """The audit loop, its metrics endpoint and its conversation with systemd."""

    def __init__(self, config: Config, overrides: dict[str, object] | None = None,
                 notifier: Notifier | None = None, signals: SignalInbox | None = None) -> None:
        self.config = config
        self.overrides = dict(overrides or {})
        self.metrics = Metrics()
        self.notifier = notifier or Notifier()
        self.signals = signals or SignalInbox()
        self._stop = threading.Event()
        self._wake_worker = threading.Event()
        self._heartbeat = time.monotonic()
        self._ready = False
        self._server: Any = None
        self._seen: dict[int, set[tuple[str, str]]] = {}
        self._last_ok: str = "never"
        self._last_counts: tuple[int, ...] | None = None
        self._last_failure: tuple[str, str] | None = None  # (reason, error) last logged
        self._failures = 0
        self._early_lock = threading.Lock()
        self._early_trigger: str | None = None
        #: whether the tracer's collision check must listen: the audits and the tracer's
        #: events decide (sockguard/trace/collision.py)
        self.collision_gate = CollisionGate(config.collision_check)
        self.tracer = TracerRunner(self)

    # -- threads ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status (0 on a requested stop)."""
        self.signals.install()
        try:
            return self._run()
        finally:
            self.signals.close()

    def _run(self) -> int:
        configure_logging(self.config)
        if self.signals.stop_requested:
            log.info("stopped by %s before the first audit",
                     signal_name(self.signals.stop_signal or 0))
            return 0
        log.info("sockguard run starting: %s", describe(self.config))
        self._start_metrics(self.config)
        self.metrics.configured(self.config.interval, self.config.remediate)
        watchdog = self.notifier.watchdog_seconds
        if watchdog is not None:
            log.info("systemd watchdog: %.3g s; pinging while audits make progress", watchdog)
        self.notifier.notify("STATUS=starting: first audit in progress")
        worker = threading.Thread(target=self._worker, name="audit", daemon=True)
        worker.start()
        if self.config.tracer_enabled:
            self.tracer.start()
        else:
            log.info("tracer disabled (tracer.enabled = false)")
        status = self._supervise(worker, watchdog)
        return self._shutdown(worker, status)

    def _supervise(self, worker: threading.Thread, watchdog: float | None) -> int:
        ping_every = watchdog / 4 if watchdog else None
        last_ping = 0.0
        while not self._stop.is_set():
            self.signals.wait(min(TICK, ping_every) if ping_every else TICK)
            if self.signals.stop_requested:
                log.info("stopping: %s", signal_name(self.signals.stop_signal or 0))
                self.request_stop()
                break
            if self.signals.take_reload():
                self._reload()
            now = time.monotonic()
            if watchdog and ping_every and now - last_ping >= ping_every \
                    and now - self._heartbeat < watchdog / 2:
                self.notifier.notify("WATCHDOG=1")
                last_ping = now
            if not worker.is_alive() and not self._stop.is_set():
                log.critical("the audit thread died; exiting so systemd restarts sockguard")
                return 1
        return 0

    def _shutdown(self, worker: threading.Thread, status: int) -> int:
        self.notifier.notify("STOPPING=1", "STATUS=stopping")
        self.tracer.stop()
        worker.join(STOP_GRACE)
        if worker.is_alive():
            log.warning("stopping: abandoning the audit in progress after %.1f s", STOP_GRACE)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            # The audit thread is stuck (a syscall, a long map walk): do not wait for it,
            # nor for the metrics server's poll loop; exiting closes every fd.
            os._exit(status)
        self._stop_metrics()
        log.info("stopped")
        return status

    def _worker(self) -> None:
        # the tc lookup programs stay loaded from one audit to the next (run_audit keeps
        # only those of the maps it audits): a load costs ~10 ms of CPU per map and audit
        with lookup_session():
            self._audit_loop()

    def _audit_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._beat()
            try:
                self._cycle(self.config)
            except Exception as exc:  # never let the thread die on a bug: log, count, go on
                self._crashed(exc)
            self._beat()
            while not self._stop.is_set():
                remaining = started + self.config.interval - time.monotonic()
                if remaining <= 0:
                    break
                early = self._early_wait(started)  # tracer-triggered audit, see below
                if early == 0:
                    break
                wait = min(remaining, self._tick(), early if early is not None else TICK)
                if self._wake_worker.wait(wait):
                    self._wake_worker.clear()
                self._beat()

    def _tick(self) -> float:
        wd = self.notifier.watchdog_seconds
        return min(TICK, wd / 8) if wd else TICK

    def _beat(self) -> None:
        self._heartbeat = time.monotonic()

    def health(self) -> tuple[bool, str]:
        """The answer of ``GET /healthz``: whether the audit thread made progress lately.

        The evidence the systemd watchdog's pings rest on (the heartbeat), for nodes
        without systemd: a Kubernetes livenessProbe on /healthz restarts a daemon whose
        audit hangs in a syscall, where a probe of /metrics would see it serve on.
        """
        age = time.monotonic() - self._heartbeat
        limit = self.config.liveness_timeout
        if age < limit:
            return True, f"ok: the audit thread made progress {age:.1f} s ago"
        return False, (f"hung: no progress from the audit thread for {age:.0f} s "
                       f"(metrics.liveness_timeout = {limit:g} s)")

    # -- early audits requested by tracer events (TracerRunner, end of file) --------------

    def request_early_audit(self, trigger: str) -> None:
        """Have the audit thread start a cycle soon (debounced by EARLY_MIN_GAP)."""
        with self._early_lock:
            if self._early_trigger is None:
                self._early_trigger = trigger
        self._wake_worker.set()

    def _early_wait(self, started: float) -> float | None:
        """None: no early audit pending; 0: start one now; else seconds until it is due."""
        with self._early_lock:
            trigger = self._early_trigger
            if trigger is None:
                return None
            due = started + EARLY_MIN_GAP - time.monotonic()
            if due > 0:
                return due
            self._early_trigger = None
        self.metrics.tracer.early_audits.labels(trigger=trigger).inc()
        log.debug("early audit (%s)", trigger)
        return 0.0

    # -- one cycle ----------------------------------------------------------------------

    def _cycle(self, cfg: Config) -> None:
        self.metrics.audits.inc()
        start = time.monotonic()
        _test_block()
        try:
            maps, discovered = select_maps(cfg)
            audit = run_audit(maps, LAYOUTS[cfg.layout],
                              audit_policy(cfg.proxy_ips),
                              cfg.confirm_delay, use_iterator=cfg.use_iterator,
                              tolerate_skips=discovered, entry_source_name=cfg.entry_source,
                              on_walk=self.tracer.offer_keys)
        except (SockguardError, OSError) as exc:
            self.collision_gate.audited(start, None)
            self._failed(exc)
            return
        self.collision_gate.audited(
            start, [r.map.id for r in audit.results] if audit.proven_healthy else None)
        self._beat()
        if self._stop.is_set():
            return  # stopping: no deletes after SIGTERM
        deletions = self._remediate(cfg, audit) if cfg.remediate else []
        seconds = time.monotonic() - start
        self.metrics.audit_succeeded(audit, deletions, seconds, time.time())
        self._report(cfg, audit, deletions, seconds)

    def _failed(self, exc: BaseException) -> None:
        """Count every failed cycle; log the ERROR once, and again only when it changes."""
        reason = failure_reason(exc)
        self.metrics.audit_failed(reason)
        if reason in ("map_not_found", "map_gone"):
            self._forget_gone_maps(self.config)
        what = f"{exc}"
        if reason == "fd_exhausted":
            what += f" (out of file descriptors: {fd_usage()})"
        self._failures += 1
        if (reason, str(exc)) != self._last_failure:
            self._last_failure = (reason, str(exc))
            log.error("audit failed (%s): %s", reason, what,
                      extra={"SOCKGUARD_FAILURE": reason})
        else:
            log.debug("audit failed again (%s): %s", reason, what,
                      extra={"SOCKGUARD_FAILURE": reason})
        self.notifier.notify(f"STATUS=audit failing ({reason}: {exc}); "
                             f"last successful audit {self._last_ok}")

    def _crashed(self, exc: Exception) -> None:
        """A bug in a cycle: counted every time, its traceback logged once per distinct error."""
        self.collision_gate.audited(time.monotonic(), None)  # it proved nothing
        self.metrics.audit_failed("internal")
        self._failures += 1
        ident = ("internal", f"{type(exc).__name__}: {exc}")
        if ident != self._last_failure:
            self._last_failure = ident
            log.exception("audit cycle crashed", extra={"SOCKGUARD_FAILURE": "internal"})
        else:
            log.debug("audit cycle crashed again: %s", ident[1])

    def _recovered(self) -> None:
        """After failed cycles, say once that audits succeed again."""
        if self._last_failure is not None:
            log.info("audit succeeded again after %d failed cycles (last failure: %s: %s)",
                     self._failures, *self._last_failure,
                     extra={"SOCKGUARD_FAILURE": "recovered"})
        self._last_failure = None
        self._failures = 0

    def _forget_gone_maps(self, cfg: Config) -> None:
        """Stop exporting the per-map series of maps that are gone.

        Gone: the id no longer exists, or, when maps are named in the config, no
        configured spec resolves to it any more (an unpinned map can outlive its
        pin while some fd, the tracer's too, still holds it).
        """
        named: set[int] | None = None
        if cfg.maps:
            named = set()
            for spec in cfg.maps:
                try:
                    named.add(maps_adapter.resolve_map(spec, bpffs_root=cfg.bpffs).id)
                except (MapNotFoundError, MapGoneError, BpffsNotMountedError):
                    continue  # that spec names nothing now
                except (SockguardError, OSError):
                    named = None  # cannot tell (EPERM, EMFILE): keep what is exported
                    break
        for map_id, name in self.metrics.exported_maps():
            if map_gone(map_id, name) or (named is not None and map_id not in named):
                self.metrics.forget_map(map_id)
                log.info("map %s id %d is gone: its per-map series are no longer exported",
                         name, map_id, extra={"SOCKGUARD_MAP_ID": map_id})

    def _remediate(self, cfg: Config, audit: NodeAudit) -> list[Deletion]:
        """``remediation.clean_each_map``, exactly as ``sockguard clean --apply`` drives it.

        A map that fails is logged there and counted (``reason="error"``) here;
        the other maps are cleaned, and the cycle itself succeeds.
        """
        out = deletions(clean_each_map(audit.results, True, cfg.max_deletes,
                                       delete_unproven=cfg.delete_unproven,
                                       stop=self._stop.is_set, progress=self._beat))
        for d in out:
            if d.refusal is not None:
                log.info("not deleted (%s): %s entry %s of map %s: %s", d.outcome,
                         d.finding.kind.value, d.finding.entry.key, d.finding.map.name,
                         d.reason, extra={**finding_fields(d.finding),
                                          "SOCKGUARD_OUTCOME": d.outcome,
                                          "SOCKGUARD_REFUSAL": d.refusal.value})
        return out

    def _report(self, cfg: Config, audit: NodeAudit, deletions: Sequence[Deletion],
                seconds: float) -> None:
        self._recovered()
        self._log_new_findings(cfg, audit)
        entries = sum(r.entries for r in audit.results)
        # Every kind the policy table shows, so that no bad kind is missing from STATUS.
        shown = tuple(sum(r.count(k) for r in audit.results) for k in SHOWN_KINDS)
        deleted = sum(1 for d in deletions if d.outcome == "deleted")
        self._last_ok = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        summary = (f"{len(audit.results)} maps, {entries} entries: "
                   + ", ".join(f"{n} {k.value}" for n, k in zip(shown, SHOWN_KINDS, strict=True))
                   + (f", {deleted} deleted" if cfg.remediate else "")
                   + f"; {audit.sockets} sockets in {len(audit.namespaces)} netns"
                   + ("" if audit.complete else
                      f"; INCOMPLETE: {len(audit.unreadable) + len(audit.vanished)} netns "
                      f"unreadable, {sum(audit.unseen.values())} entries in unseen netns, "
                      f"{audit.unverified} unverified"))
        counts = (len(audit.results), entries, *shown, deleted)
        level = logging.INFO if counts != self._last_counts else logging.DEBUG
        self._last_counts = counts
        log.log(level, "audit: %s (%.2f s)", summary, seconds)
        for skipped in audit.skipped:
            log.warning("skipped map: %s", skipped)
        status = f"STATUS={summary}; last audit {self._last_ok} ({seconds:.2f} s)"
        if not self._ready:
            self._ready = True
            self.notifier.notify("READY=1", status)
            log.info("ready: first audit done")
        else:
            self.notifier.notify(status)

    def _log_new_findings(self, cfg: Config, audit: NodeAudit) -> None:
        """Log each bad entry (``policy.BAD_KINDS``) once, when first seen (not every cycle)."""
        now: dict[int, set[tuple[str, str]]] = {}
        new: list[Finding] = []
        for r in audit.results:
            before = self._seen.get(r.map.id, set())
            ids: set[tuple[str, str]] = set()
            for f in r.bad:
                ident = (f.entry.key_hex, f.kind.value)
                ids.add(ident)
                if ident not in before:
                    new.append(f)
            now[r.map.id] = ids
        self._seen = now
        for f in new[: cfg.log_max_findings]:
            where = f" (live socket {f.socket.tuple} in netns {f.socket.netns})" if f.socket else ""
            log.warning("%s entry %s in map %s id %d%s: %s", f.kind.value, f.entry.key,
                        f.map.name, f.map.id, where, f.reason, extra=finding_fields(f))
        if len(new) > cfg.log_max_findings:
            log.warning("%d more new bad entries not logged one by one",
                        len(new) - cfg.log_max_findings)

    # -- configuration and metrics endpoint --------------------------------------------

    def _reload(self) -> None:
        if self._ready:
            self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")
        old = self.config
        try:
            new = load_config(old.source, self.overrides)
            if (new.metrics_enabled, new.metrics_address, new.metrics_port) != \
                    (old.metrics_enabled, old.metrics_address, old.metrics_port):
                self._restart_metrics(old, new)
        except (SockguardError, OSError) as exc:
            self.metrics.reloads.labels(result="failure").inc()
            log.error("reload rejected, keeping the running configuration: %s", exc,
                      extra={"SOCKGUARD_RELOAD": "failure"})
        else:
            self.config = new
            self.collision_gate.mode = new.collision_check
            configure_logging(new)
            self.metrics.configured(new.interval, new.remediate)
            self.metrics.reloads.labels(result="success").inc()
            log.info("configuration reloaded: %s", describe(new),
                     extra={"SOCKGUARD_RELOAD": "success"})
            if new.tracer_enabled != old.tracer_enabled:
                if new.tracer_enabled:
                    self.tracer.start()
                else:
                    self.tracer.stop()
                    log.info("tracer stopped (tracer.enabled = false)")
            self._wake_worker.set()
        if self._ready:
            self.notifier.notify("READY=1", f"STATUS=configuration reloaded; last successful "
                                            f"audit {self._last_ok}")

    def _start_metrics(self, cfg: Config) -> None:
        if not cfg.metrics_enabled:
            return
        try:
            self._server = start_server(self.metrics, cfg.metrics_address, cfg.metrics_port,
                                        self.health)
        except OSError as exc:
            raise SockguardError(f"cannot serve metrics on {cfg.metrics_address}:"
                                 f"{cfg.metrics_port}: {exc.strerror or exc}") from exc
        log.info("metrics on %s", metrics_url(cfg.metrics_address, cfg.metrics_port))

    def _stop_metrics(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _restart_metrics(self, old: Config, new: Config) -> None:
        self._stop_metrics()
        try:
            self._start_metrics(new)
        except SockguardError:
            self._start_metrics(old)  # put the old endpoint back; the reload is rejected
            raise

    # -- signals ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop serving, from any thread (never from a signal handler: it takes locks)."""
        self._stop.set()
        self._wake_worker.set()
        self.signals.wake()


# -- tracer events: metrics, journal, early audits (sockguard/trace/tracer.py) ------------------

#: An early audit starts at least this long after the previous audit started, so a
#: burst of closing sockets costs one audit per second at most, and a key left behind
#: is still found within about a second (plus audit.confirm_delay).
EARLY_MIN_GAP = 1.0


def tracer_event_fields(ev: TraceEvent) -> dict[str, object]:
    """Journal fields of a tracer event: ``journalctl SOCKGUARD_EVENT=update_failure``."""
    fields: dict[str, object] = {"SOCKGUARD_COOKIE": ev.cookie, "SOCKGUARD_NETNS": ev.netns,
                                 "SOCKGUARD_PID": ev.pid, "SOCKGUARD_COMM": ev.comm,
                                 "SOCKGUARD_TRACE_SOURCE": ev.source}
    if ev.sock is not None:
        fields["SOCKGUARD_LIVE_SOCKET"] = str(ev.sock)
    if ev.map_id is not None:
        fields["SOCKGUARD_MAP_ID"] = ev.map_id
        fields["SOCKGUARD_MAP_NAME"] = ev.map_name
    if ev.key_hex is not None:
        fields["SOCKGUARD_KEY"] = ev.key_hex
    if ev.key is not None:
        fields["SOCKGUARD_TUPLE"] = str(ev.key)
    if ev.errno_name is not None:
        fields["SOCKGUARD_ERRNO"] = ev.errno_name
    if ev.caller is not None:
        fields["SOCKGUARD_CALLER"] = ev.caller
        fields["SOCKGUARD_CALLER_CLASS"] = ev.caller_class
    if ev.recv_fn is not None:
        fields["SOCKGUARD_RECV_FN"] = ev.recv_fn
    if ev.key_in_maps:
        fields["SOCKGUARD_KEY_IN_MAPS"] = ",".join(ev.key_in_maps)
    if ev.entry is not None:  # collision: the socket the key's entry points to
        if ev.entry.sock is not None:
            fields["SOCKGUARD_ENTRY_SOCKET"] = str(ev.entry.sock)
        if ev.entry.cookie is not None:
            fields["SOCKGUARD_ENTRY_COOKIE"] = ev.entry.cookie
        fields["SOCKGUARD_ENTRY_STATE"] = ev.entry.state
        fields["SOCKGUARD_COMPARED_BY"] = ev.compared_by
    return fields


class TracerRunner:
    """The daemon's tracer thread: start what the kernel allows, consume events, stop.

    Why a thread of its own: ``ring_buffer__poll`` blocks, and the audit
    thread's heartbeat must not depend on event traffic.  The tracer is an
    addition: if it cannot start (no ringbuf, nothing attachable) the daemon
    says why and carries on auditing every interval.
    """

    POLL_MS = 250

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.detections: dict[str, Detection] = {}
        self.started = threading.Event()  # set once start was attempted (tests wait on it)
        self._tracer: Tracer | None = None  # while the tracer runs

    def offer_keys(self, start_ns: int, walks: dict[int, list[bytes]]) -> None:
        """The audit's key walk, for the tracer's watched set (it need not walk again)."""
        tracer = self._tracer
        if tracer is not None:
            tracer.offer_keys(start_ns, walks)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self.started.clear()
        self._thread = threading.Thread(target=self._run, name="tracer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        d = self.daemon
        layout = LAYOUTS[d.config.layout]
        watch = MapWatch(lambda: select_maps(d.config)[0], layout)
        tracer = Tracer(self._on_event, daemon_options(), watch)
        try:
            self.detections = tracer.start()
        except TracerUnavailableError as exc:
            log.warning("tracer unavailable, audits only every %.3g s: %s", d.config.interval,
                        exc, extra={"SOCKGUARD_TRACER": "unavailable"})
            self.started.set()
            return
        except (SockguardError, OSError) as exc:
            log.error("tracer failed to start, audits only every %.3g s: %s", d.config.interval,
                      exc, extra={"SOCKGUARD_TRACER": "failed"})
            self.started.set()
            return
        d.metrics.tracer.set_active({k: v.active for k, v in self.detections.items()})
        d.metrics.tracer.collision_listening.set(1 if tracer.listening else 0)
        self._tracer = tracer
        log.info("%s", attached_detections(self.detections),
                 extra={"SOCKGUARD_TRACER": "started"})
        blind = tracer.blind_spot
        if tracer.collisions is not None and blind is not None:
            log.info("collision check always listening: %s", blind)
        self.started.set()
        try:
            while not self._stop.is_set():
                self._gate(tracer, watch)
                tracer.poll(self.POLL_MS)
        except Exception:  # never take the daemon down: audits go on without events
            log.exception("tracer crashed; continuing with periodic audits only")
        finally:
            self._tracer = None
            tracer.close()
            d.metrics.tracer.set_active({})
            d.metrics.tracer.collision_listening.set(0)

    def _gate(self, tracer: Tracer, watch: MapWatch) -> None:
        """Attach or detach the collision check's tracepoint as the gate says; say so once."""
        if tracer.collisions is None:
            want = False  # the state programs serve nothing else in the daemon
        elif tracer.blind_spot is not None:
            want = True  # an entry could go bad unseen: never idle
        else:
            want = self.daemon.collision_gate.listening([h.info.id for h in watch.handles()])
        if want == tracer.listening:
            return
        now = tracer.listen_for_collisions(want)
        self.daemon.metrics.tracer.collision_listening.set(1 if now else 0)
        if now == want and tracer.collisions is not None:
            log.info("collision check %s", "listening: an audited map may hold a key a new "
                     "connection collides with" if now else "idle: the last audit proved "
                     "every entry owned, nothing to collide with",
                     extra={"SOCKGUARD_COLLISION_CHECK": "listening" if now else "idle"})

    def _on_event(self, ev: TraceEvent) -> None:
        meaning = ev.meaning  # decided in one place: TraceEvent.meaning
        if meaning is None:
            return
        d = self.daemon
        if meaning in ENTRY_GONE_BAD:  # something to collide with now
            d.collision_gate.suspect(time.monotonic())
        fields = {**tracer_event_fields(ev), "SOCKGUARD_EVENT": meaning.value}
        if meaning is Meaning.UPDATE_FAILURE:
            d.metrics.tracer.update_failed(ev.errno_name or "other")
            log.warning("sockhash insert failed with %s: map %s#%s key %s for socket %s "
                        "(netns %d, pid %d %s)", ev.errno_name, ev.map_name, ev.map_id,
                        ev.key or ev.key_hex, ev.sock, ev.netns, ev.pid, ev.comm, extra=fields)
        elif meaning is Meaning.PSOCK_DROP:
            d.metrics.tracer.psock_dropped(ev.caller_class or "unknown")
            level = logging.WARNING if ev.caller_class == "update_failed" else logging.DEBUG
            log.log(level, "psock of socket %s dropped by %s (%s)", ev.sock, ev.caller,
                    ev.caller_class, extra=fields)
        elif meaning is Meaning.RECV_MISMATCH:
            d.metrics.tracer.recvmsg_mismatches.inc()
            log.warning("socket %s (netns %d, pid %d %s) receives via %s although its key is in "
                        "%s: its peer redirects into another socket", ev.sock, ev.netns, ev.pid,
                        ev.comm, ev.recv_fn, ", ".join(ev.key_in_maps or ()), extra=fields)
        elif meaning is Meaning.COLLISION:
            d.metrics.tracer.collisions.inc()
            e = ev.entry
            log.warning("socket %s (netns %d, pid %d %s) became established while the entry of "
                        "its key %s in %s points to another socket, %s (cookie %s, %s): its "
                        "peer's payload goes there and this connection hangs; auditing now",
                        ev.sock, ev.netns, ev.pid, ev.comm, ev.key or ev.key_hex,
                        e.map_label if e else "?", e.sock if e else "?",
                        "?" if e is None or e.cookie is None else e.cookie,
                        e.state if e else "?", extra=fields)
        elif meaning is Meaning.KEY_LEFT_BEHIND:
            log.info("socket %s closed but the key of its tuple is still in %s: auditing now",
                     ev.sock, ", ".join(ev.key_in_maps or ()), extra=fields)
        elif meaning is Meaning.RESET_HELD:  # common, and mostly closed at once: debug
            log.debug("socket %s was reset (%s) while its process holds it: the key of its "
                      "tuple stays in %s until it is closed; collision check listening",
                      ev.sock, ev.errno_name, ", ".join(ev.key_in_maps or ()), extra=fields)
        if meaning in EARLY_AUDIT:
            d.request_early_audit(meaning.value)


def _test_block() -> None:
    """The SOCKGUARD_TEST_BLOCK_FILE hook: hang while the named file exists."""
    path = os.environ.get(BLOCK_ENV)
    if not path or not os.path.exists(path):
        return
    log.info("test hook: audit blocked while %s exists", path)
    while os.path.exists(path):
        time.sleep(0.05)


def main(args: argparse.Namespace, signals: SignalInbox | None = None) -> int:
    """Entry point of ``sockguard run`` (called by cli.main, which handles errors).

    ``signals``: the inbox cli.main installed before anything slow, so that a stop
    or reload asked for while the daemon starts is not the default action (death).
    """
    overrides = overrides_from_args(args)
    config = load_config(args.config, overrides)
    return Daemon(config, overrides, signals=signals).run()
