"""Which process (and container) holds a socket, from /proc.

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


def _container_of(pid: int, proc: str) -> str | None:
    try:
        with open(f"{proc}/{pid}/cgroup") as fh:
            text = fh.read()
    except OSError:
        return None
    m = _CONTAINER_ID.search(text)
    return (m.group(1) or m.group(2)) if m else None


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
                found[ino] = Owner(pid, _comm(pid, proc), _container_of(pid, proc))
        if len(found) == len(wanted):
            break
    return found
