"""Which process holds each of a few sockets, from ``iter/task_file`` (``bpf/task_owners.bpf.c``).

:func:`sockguard.kernel.owners.find_owners` reads every process's fd table from
/proc, a readlink per open file: on a node with 100,000 sockets that is most of
an audit that has findings.  The iterator walks the same tables in the kernel and
returns only the wanted inodes.  Its pids are the initial pid namespace's, so it
is used only where /proc is that namespace's (a DaemonSet with ``hostPID``, a
systemd service); elsewhere, and where the program does not load, the caller
reads /proc.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Collection, Iterator

from sockguard.core.errors import LibbpfMissingError, NotRootError
from sockguard.kernel import bpf_object, libbpf
from sockguard.kernel.bpf_object import CStruct
from sockguard.kernel.libbpf import BpfError

OBJECT_PATH = bpf_object.object_path("task_owners")
PROGRAM = "task_owners"
#: struct owner_record of bpf/task_owners.bpf.c.
RECORD = CStruct("owner_record", "=QI4x", "ino tgid")
#: WANTED_MAX of bpf/task_owners.bpf.c: inodes per walk.
WANTED_MAX = 4096
#: The initial pid namespace's inode (PROC_PID_INIT_INO, include/linux/proc_ns.h).
PROC_PID_INIT_INO = 0xEFFFFFFC


def _in_initial_pid_namespace(proc: str = "/proc") -> bool:
    try:
        return os.stat(f"{proc}/self/ns/pid").st_ino == PROC_PID_INIT_INO
    except OSError:
        return False


def holders(inodes: Collection[int]) -> dict[int, int]:
    """Socket inode -> pid of the first process (lowest pid) holding it, for the inodes
    some process holds.  Raises BpfError / NotRootError / LibbpfMissingError when the
    iterator cannot run; :func:`available` says whether it can."""
    wanted = sorted({ino for ino in inodes if ino})
    found: dict[int, int] = {}
    if not wanted:
        return found
    with _attached() as (obj, link):
        fd = obj.map("wanted").fd
        for start in range(0, len(wanted), WANTED_MAX):
            batch = wanted[start:start + WANTED_MAX]
            for ino in batch:
                libbpf.map_update(fd, ino.to_bytes(8, "little"), b"\x01")
            data = libbpf.iter_read(link)
            if len(data) % RECORD.size:
                raise BpfError(errno.EIO, f"task-file iterator: {len(data)} bytes is not "
                                          "whole records")
            for ino, tgid in RECORD.iter_unpack(data):
                found.setdefault(ino, tgid)
            for ino in batch:
                libbpf.map_delete(fd, ino.to_bytes(8, "little"))
    return found


@contextlib.contextmanager
def _attached() -> Iterator[tuple[libbpf.BpfObject, libbpf.Link]]:
    """The program loaded and attached as an iterator; detached and closed on exit."""
    obj = bpf_object.load(OBJECT_PATH, refused="the task-file iterator")
    try:
        with obj.program(PROGRAM).attach_iter() as link:
            yield obj, link
    finally:
        obj.close()


@functools.cache
def available() -> tuple[bool, str]:
    """Whether the iterator finds socket holders here, and if not, why (cached)."""
    if not _in_initial_pid_namespace():
        return False, ("not in the initial pid namespace: its pids would not be /proc's "
                       "(processes are found from /proc)")
    try:
        with _attached():
            pass
    except LibbpfMissingError as exc:
        return False, str(exc)
    except (NotRootError, BpfError) as exc:
        return False, f"the task-file iterator does not load: {str(exc).splitlines()[0]}"
    return True, "iter/task_file: socket holders found in the kernel"
