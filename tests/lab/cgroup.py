"""A private child cgroup v2 for the lab's sockops program.

Cilium attaches its sockops program to the root cgroup; the lab must never do
that (it would touch every socket on the machine, and a legacy attachment
would outlive the test).  It attaches to a child cgroup of its own instead and
decides which sockets are "Cilium-managed" by creating them while the process
sits in that cgroup: a socket's cgroup is captured once, in ``sk_alloc``
(``cgroup_sk_alloc``), and sockops callbacks run for the socket's cgroup, not
for the cgroup of whichever process later uses it.  Accepted sockets inherit
their listener's cgroup.  So: move in, create the socket, move back.

Moving the *process* (``cgroup.procs``) moves all its threads, so every move
is serialised by one process-wide lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")

#: Serialises "move into lab cgroup, create socket, move back" across threads.
MEMBERSHIP_LOCK = threading.RLock()


def is_cgroup2(path: Path = CGROUP2_ROOT) -> bool:
    """True when ``path`` is a mounted cgroup v2 hierarchy."""
    return (path / "cgroup.controllers").is_file() and (path / "cgroup.procs").is_file()


def own_cgroup(pid: int | str = "self") -> str:
    """This process's cgroup v2 path relative to the hierarchy root (``0::<path>``)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise RuntimeError("process has no cgroup v2 membership line")


class LabCgroup:
    """A uniquely named child cgroup, removed (members moved out first) on close."""

    def __init__(self, root: Path = CGROUP2_ROOT, prefix: str = "sockguard-lab-") -> None:
        self.root = root
        self.path = root / f"{prefix}{secrets.token_hex(4)}"
        self.path.mkdir()
        self._fd: int | None = None
        # Where to send the process (and stragglers) back to.
        self.home = root / own_cgroup().lstrip("/")
        if self.home.resolve() == self.path.resolve():  # pragma: no cover - paranoia
            raise RuntimeError("refusing to treat the lab cgroup as home")

    @property
    def fd(self) -> int:
        """An O_RDONLY directory fd, as BPF_LINK_CREATE wants for cgroup attachment."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._fd

    @contextlib.contextmanager
    def member(self) -> Iterator[None]:
        """Run the body with this process inside the lab cgroup, then move it back."""
        with MEMBERSHIP_LOCK:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))
            try:
                yield
            finally:
                (self.home / "cgroup.procs").write_text(str(os.getpid()))

    def members(self) -> list[int]:
        """PIDs currently in the cgroup."""
        try:
            text = (self.path / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(tok) for tok in text.split()]

    def close(self) -> None:
        """Move members to the parent and remove the directory (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self.path.exists():
            return
        parent_procs = self.path.parent / "cgroup.procs"
        for pid in self.members():
            with contextlib.suppress(ProcessLookupError, OSError):
                parent_procs.write_text(str(pid))
        # rmdir fails with EBUSY only while members remain; give a racing exit a moment.
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.02)
        self.path.rmdir()

    def __enter__(self) -> LabCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
