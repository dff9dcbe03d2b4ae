"""What the running kernel lets sockguard do, probed for real, with a reason for each answer.

Why probe instead of reading the kernel version or config: every one of
these can say "yes" while the kernel still refuses.  On the project's own
machine CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS=y, BTF present, root — and
fentry/fexit programs still fail to load with EPERM; kprobe-type programs load
but cannot attach because CONFIG_KPROBES is off (no kprobe PMU, no
kprobe_events).  So each feature is tried the way the tracer will use it:

- a program of that type is loaded alone from ``probe_caps.bpf.o`` (the
  others left out with autoload off), then attached where harmless — at the
  tracer's own attach points, for microseconds, doing nothing — and detached;
- a ring buffer map is created and closed;
- iterators: ``iter/sockmap`` through ``sockmap_iter.iterator_available``,
  ``iter/tcp`` loaded from the probe object;
- the tc lookup of a sockhash entry's socket (the entry source where
  ``iter/sockmap`` cannot load) through ``sockhash_lookup.lookup_available``,
  which loads the program and runs it once.

Results are cached per process (``probe()``).  :func:`plan` turns them into
the detections the tracer can run and says, for each one that cannot, why.
"""

from __future__ import annotations

import errno
import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

from sockguard.core.errors import LibbpfMissingError
from sockguard.kernel import bpf_object, kallsyms, libbpf, maps
from sockguard.kernel.libbpf import BpfError

PROBE_OBJECT = bpf_object.object_path("probe_caps")
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

#: probe_caps.bpf.c programs by feature.
PROBE_PROGRAMS = {
    "kprobe": "probe_kprobe",
    "fentry": "probe_fentry",
    "tp_btf": "probe_tp_btf",
    "tp_btf_sock": "probe_tp_btf_sock",
    "raw_tp": "probe_raw_tp",
    "iter_tcp": "probe_iter_tcp",
}

#: Kernel functions the tracer's kprobe/fentry programs attach to.
TRACE_SYMBOLS = ("sock_hash_update_common", "sk_psock_drop", "inet_recvmsg", "inet6_recvmsg",
                 "tcp_recvmsg", "tcp_bpf_recvmsg", "sock_map_close")


@dataclass(frozen=True)
class Feature:
    """One kernel feature: usable or not, and why (one line an operator can act on)."""

    name: str
    available: bool
    reason: str
    loads: bool | None = None  # program types: whether a program loads (even if it cannot attach)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"available": self.available, "reason": self.reason}
        if self.loads is not None:
            out["loads"] = self.loads
        return out


@dataclass(frozen=True)
class Detection:
    """One thing sockguard can notice on this node, and through what (or why not)."""

    name: str
    description: str
    active: bool
    via: str | None
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"description": self.description, "active": self.active, "via": self.via,
                "reason": self.reason}


def _errname(err: int | None) -> str:
    return errno.errorcode.get(err or 0, str(err))


def kernel_config(option: str) -> str | None:
    """``y``/``m``/a value for CONFIG_<option> from /proc/config.gz or /boot; None if unknown.

    "n" when the config is readable and says ``# CONFIG_X is not set``.
    """
    sources = ["/proc/config.gz", f"/boot/config-{os.uname().release}"]
    for src in sources:
        try:
            if src.endswith(".gz"):
                with gzip.open(src, "rt", errors="replace") as fh:
                    text = fh.read()
            else:
                with open(src, errors="replace") as fh:
                    text = fh.read()
        except OSError:
            continue
        key = f"CONFIG_{option}"
        for line in text.splitlines():
            if line.startswith(f"{key}="):
                return line.split("=", 1)[1]
            if line == f"# {key} is not set":
                return "n"
        return "n"
    return None


def _mounted(fstype: str, path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and fields[4] == path and right.split()[:1] == [fstype]:
                    return True
    except OSError:
        return False
    return False


def _btf() -> Feature:
    if VMLINUX_BTF.is_file():
        return Feature("btf", True, f"{VMLINUX_BTF} present (CO-RE objects relocate here)")
    return Feature("btf", False, f"{VMLINUX_BTF} missing: kernel built without "
                                 "CONFIG_DEBUG_INFO_BTF; no CO-RE program can load")


def _bpffs() -> Feature:
    if _mounted("bpf", "/sys/fs/bpf"):
        return Feature("bpffs", True, "bpffs mounted at /sys/fs/bpf")
    return Feature("bpffs", False, "/sys/fs/bpf is not a bpffs (mount -t bpf bpf /sys/fs/bpf); "
                                   "pinned maps cannot be discovered")


def _tracefs() -> Feature:
    for path in TRACEFS_DIRS:
        if _mounted("tracefs", path):
            return Feature("tracefs", True, f"tracefs mounted at {path}")
    return Feature("tracefs", False, "tracefs not mounted (mount -t tracefs tracefs "
                                     "/sys/kernel/tracing); not needed: sockguard attaches "
                                     "tp_btf/raw_tp by name")


def _ringbuf() -> Feature:
    try:
        fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_RINGBUF, f"{maps.PROBE_MAP_PREFIX}rb",
                               0, 0, 4096)
    except BpfError as exc:
        return Feature("ringbuf", False, f"creating a BPF ring buffer fails ({_errname(exc.errno)}"
                                         ": kernel < 5.8?); the tracer cannot report events")
    os.close(fd)
    return Feature("ringbuf", True, "BPF ring buffer maps can be created")


def _kallsyms() -> Feature:
    syms = kallsyms.load()
    if not syms.usable:
        return Feature("kallsyms", False, "/proc/kallsyms unreadable or addresses hidden "
                                          "(kptr_restrict): receive paths and psock-drop callers "
                                          "cannot be named")
    missing = [s for s in TRACE_SYMBOLS if syms.address(s) is None]
    if missing:
        return Feature("kallsyms", True, f"readable; not in this kernel: {', '.join(missing)}")
    return Feature("kallsyms", True, "readable; every traced function present")


def _load_probe(program: str) -> libbpf.BpfObject:
    """``program`` of the probe object, loaded alone."""
    return bpf_object.load(PROBE_OBJECT, programs=(program,))


def _kprobe_why_not(exc: BpfError) -> str:
    parts = [f"kprobe programs load, but attaching one fails ({_errname(exc.errno)})"]
    if kernel_config("KPROBES") == "n":
        parts.append("CONFIG_KPROBES is not set")
    elif not KPROBE_PMU.exists():
        parts.append(f"no kprobe PMU ({KPROBE_PMU})")
    return ": ".join(parts)


def _program_feature(feature: str) -> Feature:
    program = PROBE_PROGRAMS[feature]
    try:
        obj = _load_probe(program)
    except LibbpfMissingError as exc:
        return Feature(feature, False, str(exc), loads=False)
    except BpfError as exc:
        why = f"{feature} programs fail to load: {_errname(exc.errno)}"
        if feature == "fentry" and exc.errno == errno.EPERM:
            why += " even as root (the kernel refuses BPF trampolines here)"
        elif feature == "tp_btf" and exc.errno in (errno.EINVAL, errno.ESRCH, errno.ENOENT):
            why += " (no sock:sock_recv_length tracepoint or no BTF for it: kernel < 6.3?)"
        elif feature == "tp_btf_sock":
            why += (" (bpf_get_socket_cookie in tracing programs needs kernel 5.12, "
                    "bpf_get_current_task_btf 5.11)")
        return Feature(feature, False, why, loads=False)
    try:
        if feature == "iter_tcp":
            return Feature(feature, True, "iter/tcp loads", loads=True)

        try:
            link = obj.program(program).attach()
        except BpfError as exc:
            if feature == "kprobe":
                return Feature(feature, False, _kprobe_why_not(exc), loads=True)
            return Feature(feature, False, f"{feature} programs load but do not attach: "
                                           f"{_errname(exc.errno)}", loads=True)
        link.destroy()
        what = {"kprobe": "kprobe attaches (tried on sk_psock_drop)",
                "fentry": "fentry attaches (tried on sk_psock_drop)",
                "tp_btf": "tp_btf attaches (tried on sock_recv_length)",
                "tp_btf_sock": "tp_btf with socket cookie and BTF task attaches (tried on "
                               "tcp_destroy_sock)",
                "raw_tp": "raw_tp attaches (tried on inet_sock_set_state)"}[feature]
        return Feature(feature, True, what, loads=True)
    finally:
        obj.close()


def _iter_sockmap() -> Feature:
    from sockguard.kernel.sockmap_iter import iterator_available

    ok, why = iterator_available()
    return Feature("iter_sockmap", ok, why, loads=ok)


def _tc_lookup() -> Feature:
    from sockguard.kernel.sockhash_lookup import lookup_available

    ok, why = lookup_available()
    return Feature("tc_lookup", ok, why, loads=ok)


@dataclass(frozen=True)
class Capabilities:
    """Every probed feature, by name."""

    features: dict[str, Feature]

    def __getitem__(self, name: str) -> Feature:
        return self.features[name]

    def ok(self, name: str) -> bool:
        return self.features[name].available

    def as_dict(self) -> dict[str, object]:
        return {name: f.as_dict() for name, f in self.features.items()}


FEATURE_ORDER = ("btf", "bpffs", "tracefs", "ringbuf", "kallsyms", "kprobe", "fentry", "tp_btf",
                 "tp_btf_sock", "raw_tp", "iter_sockmap", "tc_lookup", "iter_tcp")


def _probe_uncached() -> Capabilities:
    features: dict[str, Feature] = {}
    features["btf"] = _btf()
    features["bpffs"] = _bpffs()
    features["tracefs"] = _tracefs()
    ok, why = libbpf.available()
    if os.geteuid() != 0:
        why, ok = ("not root: not probed (loading BPF programs needs root: CAP_SYS_ADMIN; "
                   "CAP_BPF alone is not enough here)"), False
    if not ok:
        for name in FEATURE_ORDER[3:]:
            features[name] = Feature(name, False, why,
                                     loads=False if name in PROBE_PROGRAMS else None)
        features["kallsyms"] = _kallsyms()
        return Capabilities(features)
    features["ringbuf"] = _ringbuf()
    features["kallsyms"] = _kallsyms()
    for name in ("kprobe", "fentry", "tp_btf", "tp_btf_sock", "raw_tp"):
        features[name] = _program_feature(name)
    features["iter_sockmap"] = _iter_sockmap()
    features["tc_lookup"] = _tc_lookup()
    features["iter_tcp"] = _program_feature("iter_tcp")
    return Capabilities({name: features[name] for name in FEATURE_ORDER})


@functools.cache
def probe() -> Capabilities:
    """The running kernel's capabilities (probed once per process)."""
    return _probe_uncached()


# -- the audit's detection ----------------------------------------------------------------
# (the tracer's, one registry entry each, are in sockguard/trace/detections.py)

SHADOWING = ("audit: which socket each entry points to (tells shadowing from ok on "
             "Cilium's 4-byte-value map)")


def shadowing_detection(caps: Capabilities) -> Detection:
    """The entry source ``auto`` takes (node_audit.entry_source decides the same way)."""
    desc = SHADOWING
    it, tc = caps["iter_sockmap"], caps["tc_lookup"]
    if it.available:
        return Detection("shadowing", desc, True, "iter/sockmap", it.reason)
    if tc.available:
        from sockguard.kernel.sockhash_lookup import lookup_exactness

        exact = "by cookie" if lookup_exactness() == "cookie" else "by tuple and state"
        return Detection("shadowing", desc, True, "tc lookup",
                         f"{tc.reason}; entries' sockets identified {exact} "
                         f"(iter/sockmap: {it.reason})")
    return Detection("shadowing", desc, False, None,
                     f"iter/sockmap: {it.reason}; tc lookup: {tc.reason}")
