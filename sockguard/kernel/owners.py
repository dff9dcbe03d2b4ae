"""Which process (and container, and Kubernetes pod) holds a socket, from /proc.

Only asked for the few sockets that findings name: walking every process's
fd table is the expensive part of ``ss -p`` and is not needed for a clean map;
where the kernel allows, ``task_owners`` walks the fd tables in the kernel.
The pod's UID comes from the process's cgroup, its namespace and name from
the directory kubelet keeps the pod's logs in: no CRI or API server call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import replace

from sockguard.core.errors import SockguardError
from sockguard.core.model import Owner
from sockguard.kernel import task_owners

log = logging.getLogger(__name__)

# Container runtimes put the 64-hex container id in the cgroup path:
# docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope, /docker/<id>, ...
_CONTAINER_ID = re.compile(r"(?:docker|containerd|crio|libpod)[-/]([0-9a-f]{64})|/([0-9a-f]{64})")
# kubelet names a pod's cgroup after its UID: with the systemd driver
# kubepods[-<qos>]-pod<uid with _ for ->.slice, with the cgroupfs driver
# /kubepods[/<qos>]/pod<uid>.
_POD_UID = re.compile(
    r"kubepods[-.a-z]*?-pod([0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12})\.slice"
    r"|/kubepods(?:/[a-z]+)?/pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?:/|$)")


def kubelet_identity(cgroup: str) -> tuple[str | None, str | None]:
    """(pod UID, container id) from a process's /proc/<pid>/cgroup text, where named.

    Outside Kubernetes the pod UID is None; outside any container both are.
    """
    pod = _POD_UID.search(cgroup)
    uid = (pod.group(1).replace("_", "-") if pod.group(1) else pod.group(2)) if pod else None
    cid = _CONTAINER_ID.search(cgroup)
    return uid, (cid.group(1) or cid.group(2)) if cid else None


#: kubelet's pod log root (its podLogsDir setting, default /var/log/pods): one directory a
#: pod, <namespace>_<name>_<uid> (pkg/kubelet/kuberuntime/helpers.go, BuildPodLogsDirectory).
POD_LOGS = "/var/log/pods"


def pod_names(root: str = POD_LOGS) -> dict[str, str]:
    """Pod UID -> ``namespace/name`` from kubelet's pod log directories under ``root``.

    Namespaces and pod names are DNS labels and subdomains, which hold no
    ``_``, so a directory name splits in exactly three.  No directory (not a
    Kubernetes node, or kubelet elsewhere): no names, and findings name the
    pod by its UID.
    """
    names: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            parts = entry.name.split("_")
            if len(parts) == 3 and all(parts) and entry.is_dir(follow_symlinks=False):
                namespace, name, uid = parts
                names[uid] = f"{namespace}/{name}"
    return names


def _identity_of(pid: int, proc: str) -> tuple[str | None, str | None]:
    try:
        with open(f"{proc}/{pid}/cgroup") as fh:
            return kubelet_identity(fh.read())
    except OSError:
        return None, None


def _comm(pid: int, proc: str) -> str:
    try:
        with open(f"{proc}/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def find_owners(inodes: Iterable[int], proc: str = "/proc",
                pod_logs: str = POD_LOGS) -> dict[int, Owner]:
    """Map socket inodes to the first process (lowest pid) holding each one, with its
    pod's namespace and name where a pod log directory of ``pod_logs`` names its UID.

    The holders come from the task-file iterator where it runs (``proc`` the real
    /proc), else from reading every process's fd table."""
    wanted = {f"socket:[{ino}]": ino for ino in inodes if ino}
    if not wanted:
        return {}
    holders = _kernel_holders(wanted.values()) if proc == "/proc" else None
    if holders is not None:
        found = {ino: _owner(pid, proc) for ino, pid in holders.items()}
    else:
        found = _scan_proc(wanted, proc)
    if any(o.pod_uid for o in found.values()):
        names = pod_names(pod_logs)
        found = {ino: replace(o, pod=names.get(o.pod_uid)) if o.pod_uid else o
                 for ino, o in found.items()}
    return found


def _owner(pid: int, proc: str) -> Owner:
    pod_uid, container = _identity_of(pid, proc)
    return Owner(pid, _comm(pid, proc), container, pod_uid)


def _kernel_holders(inodes: Iterable[int]) -> dict[int, int] | None:
    """inode -> pid from the task-file iterator; None where it cannot run (then /proc)."""
    if not task_owners.available()[0]:
        return None
    try:
        return task_owners.holders(list(inodes))
    except (SockguardError, OSError) as exc:
        log.warning("task-file iterator failed (%s): reading /proc instead", exc)
        return None


def _scan_proc(wanted: dict[str, int], proc: str) -> dict[int, Owner]:
    """Every process's fd table read from ``proc`` until each wanted socket is found."""
    found: dict[int, Owner] = {}
    pids: list[int] = []
    with contextlib.suppress(OSError):
        pids = [int(e.name) for e in os.scandir(proc) if e.name.isdigit()]
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # exited, or a kernel thread
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            ino = wanted.get(target)
            if ino is not None and ino not in found:
                found[ino] = _owner(pid, proc)
        if len(found) == len(wanted):
            break
    return found
