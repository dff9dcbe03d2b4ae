"""Network namespaces: finding every one on the host and entering one safely.

A namespace is identified by the inode of its nsfs file; the same namespace is
reachable through many paths (every process in it, a /run/netns bind mount),
so enumeration deduplicates by inode.  Entering uses setns(2) on the calling
thread only: a socket created while inside stays bound to that namespace after
the thread returns, which is all the sockets adapter needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from sockguard.core.errors import (
    NamespaceGone as NamespaceGone,  # raised here; importable from here too
)
from sockguard.core.model import Netns

CLONE_NEWNET = 0x40000000
RUN_NETNS = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


@dataclass(frozen=True)
class NetnsRef:
    """A namespace and one path through which it can be opened."""

    netns: Netns
    path: str


def _ino(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def host_netns_path() -> str:
    """PID 1's namespace is the host's, whatever namespace we run in.

    Where PID 1 cannot be looked at (a sandbox's init), our own namespace
    stands for the host, as in ``enumerate_netns``.
    """
    return "/proc/1/ns/net" if _ino("/proc/1/ns/net") is not None else "/proc/self/ns/net"


def enumerate_netns(proc: str = "/proc", run_netns: str = RUN_NETNS) -> list[NetnsRef]:
    """Every network namespace reachable on the host, deduplicated by inode.

    Order: the host namespace first, then /run/netns names (their names are
    what operators know), then namespaces only reachable through a process.
    Paths that vanish while we look (a process exiting) are skipped.
    """
    seen: dict[int, NetnsRef] = {}

    def add(path: str, name: str) -> None:
        ino = _ino(path)
        if ino is not None and ino not in seen:
            seen[ino] = NetnsRef(Netns(ino, name), path)

    add(f"{proc}/1/ns/net", "host")
    if not seen:  # PID 1 unreadable (a sandbox's init): our own namespace stands for the host
        add(f"{proc}/self/ns/net", "host")
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(run_netns)):
            add(os.path.join(run_netns, name), name)
    with contextlib.suppress(OSError):
        for entry in os.scandir(proc):
            if entry.name.isdigit():
                add(f"{proc}/{entry.name}/ns/net", f"pid:{entry.name}")
    return list(seen.values())


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the body with the calling thread inside the namespace at ``path``.

    Raises NamespaceGone when the path no longer opens.  The thread always
    returns to the namespace it came from, even if the body raises.
    """
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH, errno.EINVAL):
            raise NamespaceGone(path) from exc
        raise
    home = os.open(f"/proc/self/task/{_gettid()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def _gettid() -> int:
    return threading.get_native_id()


def current_netns_ino() -> int:
    """The inode of the calling thread's namespace."""
    return os.stat(f"/proc/self/task/{_gettid()}/ns/net").st_ino
