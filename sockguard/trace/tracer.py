"""The tracer: sockhash events as they happen, from three small CO-RE objects.

==========================  ===============================================
``trace_sockhash.bpf.o``    sockhash inserts and their result (EEXIST: the
                            incident's collision); ``sk_psock_drop`` with a short
                            kernel stack naming its caller.  kprobe+kretprobe
                            or fentry/fexit — neither attaches on every kernel.
``trace_recvpath.bpf.o``    ``sk->sk_prot->recvmsg`` of each TCP socket that
                            receives (tp_btf ``sock_recv_length``, or kprobes
                            on ``inet_recvmsg``/``inet6_recvmsg``).
``trace_lifecycle.bpf.o``   TCP sockets established / closing / destroyed
                            (tp_btf or raw_tp ``inet_sock_set_state``,
                            ``tcp_destroy_sock``).
==========================  ===============================================

At each ESTABLISHED whose key is in an audited map, userspace also checks
that the map's entry of that key points to this very socket
(``sockguard.trace.collision``): one that points elsewhere is a ``collision``
event, the new connection's payload redirected into a stale entry's socket,
reported about 50 ms after connect and before any payload is read.

Every object writes the same 256+8-byte record (``bpf/sockguard_trace.h``,
mirrored by :data:`EVENT`) to its own ring buffer; one libbpf consumer polls
all of them (``sockguard.trace.ringbuf``).  Which variant of each object is loaded
comes from the capability probe (``detections.plan``); a detection that
cannot run is reported with the probe's reason, never silently missing.

Userspace adds what the kernel side leaves out on purpose: names for the
addresses (``/proc/kallsyms``), the decoded key (layout), and — for a socket
that receives via ``tcp_recvmsg`` or a socket that just closed — whether the
key of its tuple is in one of the audited maps.  A socket receiving via
``tcp_recvmsg`` while its key is in a map is the incident's shadowed connection:
its peer redirects every payload into whatever socket that entry holds.

In the daemon (``filter_watched``) the kernel side asks first: the receive
and lifecycle objects compute the filter key of the socket at hand (its
tuple as its peer sees it, ``layout.FILTER_KEY``) and look it up in
``watched``, a BPF hash of the audited maps' keys in that form, which
:class:`WatchedKeys` keeps in step (added and deleted keys only, every
``watch_interval`` seconds or less often when the maps are large).  A socket
outside every map then costs one bit test (``watched_bits``, one bit per key
hash, kept by :class:`WatchedBits`; the hash is looked up only when the bit
is set) and no record, so plain traffic does not wake the consumer.  A
socket whose key is not (yet) watched has its would-be event parked
in its object's ``pending`` array, in the slot its key hashes to (8,192
slots; the next socket hashing there overwrites it); a refresh that adds the
key takes the parked event out and reports it ``late``.
The kernel side knows no map layout: userspace turns each map key into its
filter key (``MapWatch.filter_keys``; the same bytes for Cilium's layout).
Failed updates and psock drops are never filtered.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from sockguard.core.errors import SockguardError
from sockguard.core.layout import CILIUM, FILTER_KEY, KeyDecodeError, decode, key_for_socket
from sockguard.core.model import SockKey
from sockguard.core.tcp_states import TCP_ESTABLISHED, state_name
from sockguard.kernel import bpf_object, kallsyms
from sockguard.kernel.bpf_object import BpfObjectMissingError
from sockguard.kernel.capabilities import Capabilities, Detection, probe
from sockguard.kernel.libbpf import BpfError, BpfObject, Link
from sockguard.trace.collision import Candidate, CollisionCheck, EntryReader
from sockguard.trace.detections import PROGRAMS, plan
from sockguard.trace.events import EVENT, TraceEvent, decode_event
from sockguard.trace.ringbuf import RingBuffer
from sockguard.trace.watched import FILTERED_OBJECTS, MapWatch, WatchedKeys

log = logging.getLogger(__name__)

BPF_DIR = bpf_object.BPF_DIR


class TracerUnavailableError(SockguardError):
    """No detection of the tracer can run on this kernel (the message says why)."""


@dataclass
class TracerOptions:
    """What the tracer reports; the daemon and ``sockguard trace`` differ."""

    failures_only: bool = False   # updates: only failed ones (daemon)
    #: lifecycle: only sockets' deaths (tcp_destroy_sock), inet_sock_set_state not
    #: attached (no collision check then)
    deaths_only: bool = False
    all_states: bool = False      # lifecycle: every TCP state transition
    #: lifecycle: inet_sock_set_state reports only the transition into ESTABLISHED
    #: (daemon: the collision check; deaths come from tcp_destroy_sock)
    established_only: bool = False
    #: at ESTABLISHED, check that the entry of the socket's key points to that socket
    check_collisions: bool = True
    only_tcp_recvmsg: bool = False  # recv: only sockets receiving via tcp_recvmsg (daemon)
    every_recv: bool = False      # recv: every recvmsg, not once per socket and function
    check_maps: bool = True       # annotate recv/close events with key_in_maps
    # recv/lifecycle: only sockets whose key is in the audited maps (daemon; any layout)
    filter_watched: bool = False
    watch_interval: float = 1.0   # shortest period between refreshes of the watched set
    #: a refresh may take at most this share of the tracer thread's time (longer period)
    watch_budget: float = 0.01


def daemon_options() -> TracerOptions:
    """What ``sockguard run`` traces (also the overhead benchmark's configuration)."""
    return TracerOptions(failures_only=True, established_only=True, only_tcp_recvmsg=True,
                         filter_watched=True)


@dataclass
class _Loaded:
    obj: BpfObject
    links: list[Link] = field(default_factory=list)


@dataclass
class _Gated:
    """A program attached only while the collision check listens (inet_sock_set_state)."""

    loaded: _Loaded
    name: str
    link: Link | None


class Tracer:
    """Loads, attaches and polls the tracer objects this kernel supports.

    ``handler`` gets each :class:`TraceEvent` in the thread calling
    :meth:`poll`.  :meth:`close` destroys every link (detaching the programs)
    and closes the objects; links also go away if the process dies.
    """

    def __init__(self, handler: Callable[[TraceEvent], None],
                 options: TracerOptions | None = None, watch: MapWatch | None = None,
                 caps: Capabilities | None = None, bpf_dir: Path = BPF_DIR) -> None:
        self.handler = handler
        self.options = options or TracerOptions()
        self.watch = watch
        self.caps = caps
        self.bpf_dir = bpf_dir
        self.detections: dict[str, Detection] = {}
        self._loaded: list[_Loaded] = []
        self._rb: RingBuffer | None = None
        self._syms = kallsyms.load()
        self._clock = time.time_ns() - time.monotonic_ns()
        self._batch: list[tuple[int, bytes, bool]] = []
        self.events = 0
        self.lost_handler_errors = 0
        self.watched: WatchedKeys | None = None
        self._watched_fd: int | None = None  # our dups of the shared maps' fds
        self._bits_fd: int | None = None
        self._pending_fds: list[int] = []
        self.collisions: CollisionCheck | None = None
        #: with ``established_only`` the state programs serve the collision check alone,
        #: and :meth:`listen_for_collisions` attaches or detaches them
        self._gated: list[_Gated] = []
        self._gate_failed: str | None = None

    @property
    def filtering(self) -> bool:
        """Whether the kernel side filters by the watched set (decided by :meth:`start`)."""
        o = self.options
        return o.filter_watched and self.watch is not None

    # -- setup ------------------------------------------------------------------------

    def start(self) -> dict[str, Detection]:
        """Load and attach what the kernel allows; the resulting detections (tracer ones).

        Raises TracerUnavailableError when no tracer detection could be started.
        """
        caps = self.caps or probe()
        wanted = {k: d for k, d in plan(caps).items() if k != "shadowing"}
        self.detections = dict(wanted)
        rb = RingBuffer(self._on_record)
        self._rb = rb
        try:
            for obj_name, variants in PROGRAMS.items():
                self._start_object(obj_name, variants, wanted, rb)
        except BaseException:
            self.close()
            raise
        if not any(d.active for d in self.detections.values()):
            reasons = "; ".join(f"{k}: {d.reason}" for k, d in self.detections.items())
            self.close()
            raise TracerUnavailableError(f"no tracer detection can run here ({reasons})")
        self._start_collisions()
        if (self.filtering and self._watched_fd is not None and self._bits_fd is not None
                and self.watch is not None):
            self.watched = WatchedKeys(self.watch, self._watched_fd, self._bits_fd,
                                       self._pending_fds, self.options.watch_interval,
                                       self.options.watch_budget)
            self._poll_late()  # fill the set before the first events are waited for
        return self.detections

    def _start_collisions(self) -> None:
        """Set up the collision check, or say in its detection why it does not run."""
        det = self.detections.get("collision")
        if det is None or not det.active:
            return
        life = self.detections.get("lifecycle")
        why = None
        if not self.options.check_collisions:
            why = "not asked for"
        elif self.watch is None or not self.options.check_maps:
            why = "no maps to look the keys up in (map checks are off)"
        elif life is None or not life.active:
            why = f"lifecycle tracepoints not attached: {life.reason if life else '?'}"
        elif self.options.deaths_only:
            why = "inet_sock_set_state not attached (deaths only)"
        if why is not None:
            self.detections["collision"] = replace(det, active=False, via=None, reason=why)
            return
        assert det.via is not None and self.watch is not None
        reader = EntryReader(self.watch.handles, det.via)
        reader.prepare()
        self.collisions = CollisionCheck(reader)

    def _settings(self, obj_name: str) -> dict[str, int]:
        """The ``cfg`` fields of ``obj_name`` (bpf/trace_*.bpf.c) for these options."""
        o = self.options
        filtering = int(self.filtering)
        if obj_name == "trace_sockhash":
            return {"cfg.failures_only": o.failures_only}
        if obj_name == "trace_reset":
            return {"cfg.filter_watched": filtering}
        if obj_name == "trace_recvpath":
            only = self._syms.address("tcp_recvmsg") if o.only_tcp_recvmsg else None
            return {"cfg.only_fn": only or 0, "cfg.dedup": not o.every_recv,
                    "cfg.filter_watched": filtering}
        return {"cfg.states_all": o.all_states, "cfg.filter_watched": filtering,
                "cfg.established_only": o.established_only and not o.all_states}

    def _start_object(self, obj_name: str, variants: dict[str, tuple[str, ...]],
                      wanted: dict[str, Detection], rb: RingBuffer) -> None:
        chosen: dict[str, tuple[str, ...]] = {}
        for variant, progs in variants.items():
            det_name, via = variant.split(":")
            det = wanted.get(det_name)
            if det is not None and det.active and det.via == via:
                chosen[det_name] = tuple(p for p in progs if self._wants_program(p))
        if not chosen:
            return
        shared = self.filtering and obj_name in FILTERED_OBJECTS
        reuse = {}
        if shared and self._watched_fd is not None and self._bits_fd is not None:
            reuse = {"watched": self._watched_fd, "watched_bits": self._bits_fd}  # one set
        try:
            obj = bpf_object.load(bpf_object.object_path(obj_name, self.bpf_dir),
                                  programs={p for progs in chosen.values() for p in progs},
                                  settings=self._settings(obj_name), reuse=reuse)
        except BpfObjectMissingError as exc:
            self._disable(chosen, str(exc))
            return
        except BpfError as exc:
            self._disable(chosen, f"{obj_name} does not load: {str(exc).splitlines()[0]}")
            return
        loaded = _Loaded(obj)
        self._loaded.append(loaded)
        if shared:
            if self._watched_fd is None:
                self._watched_fd = os.dup(obj.map("watched").fd)
                self._bits_fd = os.dup(obj.map("watched_bits").fd)
            self._pending_fds.append(obj.map("pending").fd)
        for det_name, progs in chosen.items():
            try:
                for prog in progs:
                    link = obj.program(prog).attach()
                    if self.options.established_only and prog.startswith("state_"):
                        self._gated.append(_Gated(loaded, prog, link))
                    else:
                        loaded.links.append(link)
            except BpfError as exc:
                self._disable({det_name: progs}, f"attaching {prog} failed: "
                                                 f"{errno.errorcode.get(exc.errno or 0, '?')}")
        rb.add(obj.map("events").fd)

    @property
    def blind_spot(self) -> str | None:
        """Why the tracer could miss an entry going bad; None when it sees both ways it
        can: a death with its key still in a map (lifecycle) and a reset or timeout of a
        socket still held (reset), filtered by the watched set.  Only then may the
        collision check stop listening."""
        if not self.filtering or self.watched is None:
            return "the tracer does not filter by the audited maps' keys"
        for name in ("lifecycle", "reset"):
            det = self.detections.get(name)
            if det is None or not det.active:
                return f"{name} detection inactive: {det.reason if det else 'not planned'}"
        return None

    @property
    def listening(self) -> bool:
        """Whether the collision check's tracepoint is attached (False: none to attach)."""
        return any(g.link is not None for g in self._gated)

    def listen_for_collisions(self, on: bool) -> bool:
        """Attach (``on``) or detach the programs that only the collision check needs.

        The daemon asks its :class:`~sockguard.trace.collision.CollisionGate`
        before every poll; unchanged, this does nothing.  An attach that fails
        is logged once (per reason) and tried again at the next call; the
        return value says whether the check listens now.
        """
        for g in self._gated:
            if on and g.link is None:
                try:
                    g.link = g.loaded.obj.program(g.name).attach()
                except BpfError as exc:
                    why = f"attaching {g.name} failed: {errno.errorcode.get(exc.errno or 0, '?')}"
                    if why != self._gate_failed:
                        log.warning("tracer: collision check not listening: %s", why)
                        self._gate_failed = why
                    continue
                self._gate_failed = None
            elif not on and g.link is not None:
                g.link.destroy()
                g.link = None
        return self.listening

    def _wants_program(self, prog: str) -> bool:
        return not (self.options.deaths_only and prog.startswith("state_"))

    def _disable(self, chosen: dict[str, tuple[str, ...]], reason: str) -> None:
        for det_name in chosen:
            self.detections[det_name] = replace(self.detections[det_name], active=False,
                                                via=None, reason=reason)

    # -- events -----------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` and handle the events that arrived; how many.

        Each object has its own ring buffer, so one poll's records are sorted
        by their kernel timestamp before they are decoded and handed on.  With
        the kernel-side filter, the watched set is refreshed first when due,
        and the events parked under its new keys are handled with the rest.
        """
        if self._rb is None:
            return 0
        n = self._poll_late()
        if self.collisions is not None:  # wake up for a due second look
            due = self.collisions.next_due()
            if due is not None:
                timeout_ms = max(0, min(timeout_ms, int((due - time.monotonic()) * 1000) + 1))
        self._batch = []
        try:
            n += self._rb.poll(timeout_ms)
        finally:
            batch, self._batch = self._batch, []
        self._handle(batch)
        return n + self._check_collisions()

    def offer_keys(self, start_ns: int, walks: dict[int, list[bytes]]) -> None:
        """Keys the audit walked (map id -> keys, from ``start_ns``): the watched set takes
        them at the next poll instead of walking the maps again (any thread may call)."""
        w = self.watched
        if w is None:
            return
        keys: dict[bytes, int] = {}
        for map_id, map_keys in reversed(walks.items()):  # a key in two maps: the first's id
            keys.update(dict.fromkeys(map_keys, map_id))
        w.offer(start_ns, keys, frozenset(walks))

    def _poll_late(self) -> int:
        """Refresh the watched set when due; handle the parked events it released."""
        w = self.watched
        if w is None or (time.monotonic() < w.due and not w.has_fresh_offer()):
            return 0
        records = w.refresh()
        self._handle([(int.from_bytes(r[:8], "little"), r, True) for _k, r in records],
                     {r: k for k, r in records})
        return len(records)

    def _handle(self, batch: list[tuple[int, bytes, bool]],
                keys: dict[bytes, bytes] | None = None) -> None:
        batch.sort()
        for _ts, data, late in batch:
            try:
                event = self.decode(data, late=late)
            except Exception:
                self.lost_handler_errors += 1
                log.exception("tracer: cannot decode an event")
                continue
            if keys is not None and self.watch is not None and (
                    event.sock is None
                    or key_for_socket(FILTER_KEY, event.sock) != keys.get(data)):
                continue  # a slot written by two CPUs at once: not one socket's event
            self.events += 1
            self.handler(event)
            if (self.collisions is not None and event.kind == "state" and not event.late
                    and event.state == state_name(TCP_ESTABLISHED) and event.sock is not None
                    and self.watch is not None):
                self.collisions.offer(Candidate(
                    key_for_socket(self.watch.layout, event.sock), event.cookie, event.sock,
                    event.netns, time.monotonic(), event))

    def _check_collisions(self) -> int:
        """Look at the due candidates; hand on a ``collision`` event for each confirmed one."""
        check = self.collisions
        if check is None or check.next_due() is None:
            return 0
        found = check.run()
        for col in found:
            ev = col.candidate.payload
            assert isinstance(ev, TraceEvent)
            key = col.candidate.key
            decoded: SockKey | None = None
            if self.watch is not None:
                try:
                    decoded = decode(self.watch.layout, key)
                except KeyDecodeError:
                    decoded = None
            e = col.entry
            self.events += 1
            self.handler(replace(ev, kind="collision", key_hex=key.hex(), key=decoded,
                                 map_id=e.map_id, map_name=e.map_name,
                                 key_in_maps=(e.map_label,), entry=e,
                                 compared_by=col.compared_by,
                                 detected_after=max(0.0, time.time() - ev.time)))
        return len(found)

    def _on_record(self, data: bytes) -> None:
        if len(data) >= EVENT.size:
            self._batch.append((int.from_bytes(data[:8], "little"), data[: EVENT.size], False))

    def decode(self, data: bytes, late: bool = False) -> TraceEvent:
        """One ``struct sg_event``, with the maps holding its socket's key where that matters."""
        watching = self.watch is not None and self.options.check_maps
        return decode_event(data, self._syms, self._clock, late=late,
                            holding=self.watch.holding if watching and self.watch else None,
                            layout=self.watch.layout if self.watch is not None else CILIUM)

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Detach every program and free everything; idempotent."""
        if self.collisions is not None:
            self.collisions.reader.close()
            self.collisions = None
        if self.watch is not None:
            self.watch.close_all()
        self.watched = None
        self._pending_fds = []
        for fd in (self._watched_fd, self._bits_fd):
            if fd is not None:
                os.close(fd)
        self._watched_fd = self._bits_fd = None
        if self._rb is not None:
            self._rb.close()
            self._rb = None
        for g in self._gated:
            if g.link is not None:
                g.link.destroy()
        self._gated.clear()
        for loaded in self._loaded:
            for link in loaded.links:
                link.destroy()
            loaded.obj.close()
        self._loaded.clear()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attached_detections(detections: dict[str, Detection]) -> str:
    """One log line: which tracer detections run, and why the others do not."""
    on = [f"{k} ({d.via})" for k, d in detections.items() if d.active]
    off = [f"{k}: {d.reason}" for k, d in detections.items() if not d.active]
    text = "tracer active: " + (", ".join(on) if on else "nothing")
    if off:
        text += "; inactive: " + "; ".join(off)
    return text


__all__ = ["Tracer", "TracerOptions", "TracerUnavailableError", "attached_detections",
           "daemon_options"]
