"""Errors an operator can act on.

Every failure the CLI reports is a ``SockguardError``: it carries a one-line
reason and is printed as ``sockguard: <reason>`` with exit status 2, never as
a traceback.

Kernel errors (``OSError``) become these in one place, ``from_os_error``, so
that "permission denied" means the same thing (and says the same) wherever a
syscall fails.
"""

from __future__ import annotations

import errno
from collections.abc import Collection

#: errnos that mean "out of file descriptors" (the process's RLIMIT_NOFILE, or the system's).
FD_ERRNOS = (errno.EMFILE, errno.ENFILE)
#: errnos that mean "not privileged enough" for a map or namespace operation.
PERMISSION_ERRNOS = (errno.EPERM, errno.EACCES)
#: What the kernel needs here, measured on 6.18: CAP_BPF alone does not open maps by id.
ROOT_HINT = "sockguard needs root (CAP_SYS_ADMIN; CAP_BPF alone is not enough)"


class SockguardError(Exception):
    """A failure with a one-line, operator-facing reason."""

    exit_code = 2


class NotRootError(SockguardError):
    """The BPF and namespace operations need root (CAP_SYS_ADMIN; CAP_BPF alone is not enough)."""


class FdExhaustedError(SockguardError):
    """The process (EMFILE) or the system (ENFILE) ran out of file descriptors."""


class BpffsNotMountedError(SockguardError):
    """/sys/fs/bpf (or the given pin path's parent) is not a bpf filesystem."""


class MapNotFoundError(SockguardError):
    """The --map spec names no map."""


class NotASockMapError(SockguardError):
    """The map exists but is neither a sockhash nor a sockmap."""


class LayoutMismatchError(SockguardError):
    """The map's key size does not fit the key layout."""


class ConfigError(SockguardError):
    """A configuration file or flag is malformed."""


class LibbpfMissingError(SockguardError):
    """The system libbpf.so.1 or a compiled BPF object is not available."""


class MapGoneError(SockguardError):
    """The map was unloaded while it was being read."""


class NamespaceGone(SockguardError):
    """A network namespace disappeared between enumeration and use.

    Expected on a busy node (pods come and go): callers count it as vanished
    rather than failing.  ``path`` is the namespace path that no longer opens.
    """

    def __init__(self, path: str) -> None:
        super().__init__(f"network namespace {path} is gone")
        self.path = path


class KeyDecodeError(SockguardError, ValueError):
    """The bytes are not a key of this layout (wrong size, unknown family).

    Also a ``ValueError``: malformed input, which is how it was caught before
    it joined this hierarchy.
    """


def from_os_error(exc: OSError, what: str, *, missing: SockguardError | None = None,
                  permission: Collection[int] = PERMISSION_ERRNOS,
                  hint: str | None = ROOT_HINT) -> SockguardError | None:
    """The operator-facing error an ``OSError`` from attempting ``what`` means, if any.

    EMFILE/ENFILE: ``FdExhaustedError`` (a map that cannot be opened for want
    of an fd is not a missing map); an errno in ``permission``:
    ``NotRootError`` with ``hint``; ENOENT: ``missing``, which only the caller
    can name (a map id that vanished, a pin never made).  None otherwise: the
    caller decides, usually by re-raising.  ``permission`` is narrower where
    EACCES means something else (a BPF program load refused by the verifier).
    """
    if exc.errno in FD_ERRNOS:
        return FdExhaustedError(f"{what}: {exc.strerror}: sockguard is out of file descriptors")
    if exc.errno in permission:
        return NotRootError(f"{what}: {exc.strerror}; {hint}" if hint else
                            f"{what}: {exc.strerror}")
    if exc.errno == errno.ENOENT:
        return missing
    return None
