"""One error hierarchy and one translation of kernel errors, without root.

Why: "permission denied" and "out of file descriptors" were decided by
different rules in different modules (EACCES counted in one, not in
another), and two operator-facing errors lived outside ``SockguardError``, so
the daemon's ``except SockguardError`` missed them and counted a vanished
namespace as an internal crash.
"""

from __future__ import annotations

import errno
import os

import pytest

from sockguard.core import layout
from sockguard.core.errors import (
    ROOT_HINT,
    FdExhaustedError,
    KeyDecodeError,
    MapGoneError,
    NamespaceGone,
    NotRootError,
    SockguardError,
    from_os_error,
)
from sockguard.kernel import netns
from sockguard.kernel.libbpf import BpfError
from sockguard.service.daemon import failure_reason


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
def test_out_of_fds_is_fd_exhaustion_whatever_was_attempted(code: int) -> None:
    err = from_os_error(OSError(code, "Too many open files"), "map id 7",
                        missing=MapGoneError("gone"))
    assert isinstance(err, FdExhaustedError)
    assert str(err) == "map id 7: Too many open files: sockguard is out of file descriptors"


@pytest.mark.parametrize("code", [errno.EPERM, errno.EACCES])
def test_permission_errnos_are_not_root_with_the_hint(code: int) -> None:
    err = from_os_error(OSError(code, os.strerror(code)), "/sys/fs/bpf/x")
    assert isinstance(err, NotRootError)
    assert str(err) == f"/sys/fs/bpf/x: {os.strerror(code)}; {ROOT_HINT}"
    assert "CAP_BPF alone is not enough" in str(err)


def test_a_narrower_permission_set_leaves_eacces_to_the_caller() -> None:
    """A program load's EACCES is the verifier refusing, not a permission problem."""
    eacces = OSError(errno.EACCES, "Permission denied")
    assert from_os_error(eacces, "loading x", permission=(errno.EPERM,)) is None
    eperm = from_os_error(OSError(errno.EPERM, "Operation not permitted"), "loading x",
                          permission=(errno.EPERM,), hint=None)
    assert str(eperm) == "loading x: Operation not permitted"


def test_enoent_is_what_the_caller_names_and_the_rest_is_left_to_it() -> None:
    gone = MapGoneError("map m (id 7) no longer exists")
    assert from_os_error(OSError(errno.ENOENT, "No such file"), "map id 7", missing=gone) is gone
    assert from_os_error(OSError(errno.ENOENT, "No such file"), "map id 7") is None
    assert from_os_error(OSError(errno.EINVAL, "Invalid argument"), "map id 7",
                         missing=gone) is None


def test_the_daemon_labels_untranslated_kernel_errors_by_the_same_rules() -> None:
    assert failure_reason(PermissionError(errno.EACCES, "Permission denied")) == "permission"
    assert failure_reason(BpfError(errno.EPERM, "bpf")) == "permission"
    assert failure_reason(NotRootError("x")) == "permission"
    assert failure_reason(BpfError(errno.EMFILE, "bpf")) == "fd_exhausted"
    assert failure_reason(OSError(errno.EIO, "I/O error")) == "os_error"
    assert failure_reason(OSError(errno.ENOENT, "No such file")) == "os_error"
    assert failure_reason(SockguardError("x")) == "internal"


def test_namespace_gone_and_key_decode_error_are_sockguard_errors() -> None:
    assert netns.NamespaceGone is NamespaceGone and layout.KeyDecodeError is KeyDecodeError
    gone = NamespaceGone("/proc/42/ns/net")
    assert isinstance(gone, SockguardError) and gone.path == "/proc/42/ns/net"
    assert str(gone) == "network namespace /proc/42/ns/net is gone"
    with pytest.raises(ValueError, match="needs 44"):  # still malformed input
        layout.decode(layout.CILIUM, b"\0" * 3)
    with pytest.raises(SockguardError, match="needs 44"):
        layout.decode(layout.CILIUM, b"\0" * 3)
