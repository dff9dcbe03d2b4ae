"""``sockguard doctor``: one screen about this node's kernel, BPF setup and what sockguard sees.

Why a command of its own: whether sockguard can catch the incident's failure as
it happens depends on the kernel (kprobes, trampolines, tp_btf, iterators),
and an operator must not have to guess which detections are live.  Doctor
gathers the capability probe's answers (each with its reason), the kernel's
leak-range verdict, the sockops programs attached to cgroups and the
sk_msg/sk_skb programs attached to sockmaps, and prints the detection table.

It only reads: programs are loaded for the capability probe and detached
again, nothing is attached to a cgroup or map.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sockguard.core.errors import SockguardError
from sockguard.kernel import keywalk, libbpf, task_owners
from sockguard.kernel import maps as maps_adapter
from sockguard.kernel.capabilities import Capabilities, probe
from sockguard.kernel.libbpf import BpfError
from sockguard.trace.detections import plan

#: How deep below a cgroup2 mount doctor looks for sockops attachments, and how many dirs.
CGROUP_DEPTH = 4
CGROUP_LIMIT = 5000


@dataclass(frozen=True)
class LeakVerdict:
    """Whether this kernel version is in the range known to leak sockhash entries."""

    verdict: str  # "known-affected", "before-known-range", "not-known"
    text: str


def parse_release(release: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from a ``uname -r`` string such as ``5.10.134-16.al8.x86_64``."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def leak_verdict(release: str) -> LeakVerdict:
    """The incident's range: 5.10 from 5.10.58 on (where "Remove unhash handler for BPF
    sockmap usage" was backported); its fix reached only 6.x, so no fixed 5.10 release
    is known.  Other versions are neither known to leak nor known to be safe.
    """
    ver = parse_release(release)
    if ver is None:
        return LeakVerdict("not-known", f"cannot parse kernel release {release!r}")
    major, minor, patch = ver
    if (major, minor) == (5, 10) and patch >= 58:
        return LeakVerdict("known-affected",
                           f"{major}.{minor}.{patch} is in the range known to leak sockhash "
                           "entries: 5.10 from 5.10.58 on (the incident's kernels; the fix was "
                           "backported only to 6.x, so no fixed 5.10 release is known)")
    if (major, minor) == (5, 10):
        return LeakVerdict("before-known-range",
                           f"{major}.{minor}.{patch} predates 5.10.58, where the known leak "
                           "begins; run audits anyway")
    return LeakVerdict("not-known",
                       f"{major}.{minor}.{patch} is outside the only range known to leak "
                       "(5.10 from 5.10.58 on); not known to be affected, not known to be "
                       "safe: keep auditing")


# -- cgroups -----------------------------------------------------------------------------


def cgroup2_mounts() -> list[str]:
    """Mount points of cgroup v2 hierarchies (``/sys/fs/cgroup`` or ``.../unified``)."""
    out: list[str] = []
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    out.append(left.split()[4])
    except OSError:
        pass
    return sorted(set(out))


def _walk(root: str, depth: int) -> Iterator[str]:
    yield root
    if depth <= 0:
        return
    try:
        entries = sorted(e.path for e in os.scandir(root) if e.is_dir(follow_symlinks=False))
    except OSError:
        return
    for path in entries:
        yield from _walk(path, depth - 1)


@dataclass(frozen=True)
class ProgRef:
    """An attached program: id, name and the ids of the maps it uses."""

    id: int
    name: str
    map_ids: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "map_ids": list(self.map_ids)}


def prog_ref(prog_id: int) -> ProgRef:
    """Name and used maps of program ``prog_id`` (BPF_OBJ_GET_INFO_BY_FD with map_ids)."""
    import ctypes

    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except BpfError:
        return ProgRef(prog_id, "?")
    try:
        info = libbpf._BpfProgInfo()
        ids = (ctypes.c_uint32 * 64)()
        info.nr_map_ids = 64
        info.map_ids = ctypes.addressof(ids)
        size = ctypes.c_uint32(ctypes.sizeof(info))
        ret = libbpf.lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
        if ret < 0:
            return ProgRef(prog_id, "?")
        n = min(info.nr_map_ids, 64)
        return ProgRef(prog_id, info.name.decode(errors="replace"), tuple(ids[:n]))
    finally:
        os.close(fd)


@dataclass
class SockopsScan:
    """sockops programs attached (directly) to cgroup v2 directories."""

    roots: list[str] = field(default_factory=list)
    scanned: int = 0
    truncated: bool = False
    attached: dict[str, list[ProgRef]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def scan_sockops(depth: int = CGROUP_DEPTH, limit: int = CGROUP_LIMIT) -> SockopsScan:
    """Query BPF_CGROUP_SOCK_OPS on every cgroup2 dir up to ``depth`` levels down."""
    scan = SockopsScan(roots=cgroup2_mounts())
    for root in scan.roots:
        for path in _walk(root, depth):
            if scan.scanned >= limit:
                scan.truncated = True
                return scan
            scan.scanned += 1
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                ids = libbpf.prog_query(fd, libbpf.BPF_CGROUP_SOCK_OPS)
            except BpfError as exc:
                if len(scan.errors) < 5:
                    scan.errors.append(f"{path}: {exc}")
                continue
            finally:
                os.close(fd)
            if ids:
                scan.attached[path] = [prog_ref(i) for i in ids]
    return scan


def sock_maps() -> list[dict[str, object]]:
    """Every loaded sockhash/sockmap with its attached sk_msg/sk_skb programs."""
    out: list[dict[str, object]] = []
    map_id = 0
    for _ in range(1 << 20):
        nxt = libbpf.map_get_next_id(map_id)
        if nxt is None:
            break
        map_id = nxt
        try:
            fd = libbpf.map_fd_by_id(map_id)
        except BpfError:
            continue
        try:
            raw = libbpf.map_info(fd)
        except BpfError:
            continue
        finally:
            os.close(fd)
        if raw.type not in maps_adapter.SOCK_MAP_TYPES:
            continue
        try:
            info = maps_adapter.resolve_map(f"id:{map_id}")
            if info.name.startswith(maps_adapter.PROBE_MAP_PREFIX):
                continue  # our own probe's, not yet freed
        except (SockguardError, OSError):
            continue
        out.append({"id": info.id, "name": info.name, "type": info.map_type,
                    "key_size": info.key_size, "value_size": info.value_size,
                    "max_entries": info.max_entries,
                    "programs": None if info.programs is None else list(info.programs)})
    return out


# -- report ------------------------------------------------------------------------------


def report(caps: Capabilities | None = None) -> dict[str, Any]:
    """Everything doctor knows, as the JSON document (``version`` 1, fields only added)."""
    caps = caps or probe()
    release = os.uname().release
    verdict = leak_verdict(release)
    scan = scan_sockops()
    try:
        maps: list[dict[str, object]] = sock_maps()
        maps_error = None
    except (BpfError, OSError) as exc:
        maps, maps_error = [], str(exc)
    ver = parse_release(release)
    doc: dict[str, Any] = {
        "version": 1,
        "kernel": {"release": release, "version": list(ver) if ver else None,
                   "leak_range": {"verdict": verdict.verdict, "text": verdict.text}},
        "features": caps.as_dict(),
        "key_walk": _key_walk(),
        "owners": _owners(),
        "sockops": {
            "cgroup_roots": scan.roots, "cgroups_scanned": scan.scanned,
            "truncated": scan.truncated, "depth": CGROUP_DEPTH,
            "attached": [{"cgroup": path, "programs": [p.as_dict() for p in progs]}
                         for path, progs in scan.attached.items()],
            "errors": scan.errors,
        },
        "maps": maps,
        "detections": {k: d.as_dict() for k, d in plan(caps).items()},
    }
    if maps_error:
        doc["maps_error"] = maps_error
    return doc


def _key_walk() -> dict[str, object]:
    """Which loop walks a map's keys (not the kernel's doing: how the package was built)."""
    native, reason = keywalk.available()
    return {"native": native, "reason": reason}


def _owners() -> dict[str, object]:
    """How a finding's process is found: in the kernel, or from every fd table in /proc."""
    kernel, reason = task_owners.available()
    return {"kernel": kernel, "reason": reason}


def render_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False)


def render_text(doc: dict[str, Any]) -> str:
    """The one screen: kernel, features, attachments, detections."""
    k = doc["kernel"]
    lines = [f"kernel     {k['release']}",
             f"leak range {k['leak_range']['verdict']}: {k['leak_range']['text']}", "",
             "features"]
    for name, f in doc["features"].items():
        mark = "yes" if f["available"] else "no "
        lines.append(f"  {name:<13} {mark}  {f['reason']}")
    walk = doc["key_walk"]
    lines.append(f"  {'key walk':<13} {'yes' if walk['native'] else 'no '}  {walk['reason']}")
    owners = doc["owners"]
    lines.append(f"  {'owners':<13} {'yes' if owners['kernel'] else 'no '}  {owners['reason']}")
    s = doc["sockops"]
    lines += ["", f"sockops programs (cgroup2 {', '.join(s['cgroup_roots']) or 'not mounted'}; "
                  f"{s['cgroups_scanned']} cgroups to depth {s['depth']}"
                  f"{', truncated' if s['truncated'] else ''})"]
    if not s["attached"]:
        lines.append("  none attached")
    for att in s["attached"]:
        progs = ", ".join(f"{p['name']}#{p['id']} (maps {', '.join(map(str, p['map_ids']))})"
                          for p in att["programs"])
        lines.append(f"  {att['cgroup']}: {progs}")
    lines += ["", "sockhash/sockmap maps"]
    if not doc["maps"]:
        lines.append("  none loaded" + (f" ({doc['maps_error']})" if "maps_error" in doc else ""))
    for m in doc["maps"]:
        progs = ", ".join(m["programs"]) or "no sk_msg/sk_skb program"
        lines.append(f"  {m['name']}#{m['id']} {m['type']} key {m['key_size']} value "
                     f"{m['value_size']}: {progs}")
    lines += ["", "detections"]
    for name, d in doc["detections"].items():
        state = f"active ({d['via']})" if d["active"] else "INACTIVE"
        lines.append(f"  {name:<16} {state:<18} {d['description']}")
        if not d["active"]:
            lines.append(f"  {'':<16} why: {d['reason']}")
    return "\n".join(lines)
