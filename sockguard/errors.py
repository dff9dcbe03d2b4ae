"""Errors an operator can act on.

Every failure the CLI reports is a ``SockguardError``: it carries a one-line
reason and is printed as ``sockguard: <reason>`` with exit status 2, never as
a traceback.
"""

from __future__ import annotations


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
