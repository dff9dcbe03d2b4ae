"""Which process (and container, and Kubernetes pod) holds a socket, from /proc.

Only asked for the few sockets that findings name: walking every process's
fd table is the expensive part of ``ss -p`` and is not needed for a clean map.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable

from sockguard.core.model import Owner

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


def find_owners(inodes: Iterable[int], proc: str = "/proc") -> dict[int, Owner]:
    """Map socket inodes to the first process found holding each one."""
    wanted = {f"socket:[{ino}]": ino for ino in inodes if ino}
    found: dict[int, Owner] = {}
    if not wanted:
        return found
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
                pod_uid, container = _identity_of(pid, proc)
                found[ino] = Owner(pid, _comm(pid, proc), container, pod_uid)
        if len(found) == len(wanted):
            break
    return found
