"""Shared pytest configuration.

The kernel lab (tests/lab) is imported as ``tests.lab`` by test modules, so
the project root must be importable whichever way pytest was started.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.lab.fixtures import lab, lab3, lab_object  # noqa: E402

__all__ = ["lab", "lab3", "lab_object"]


# --- kernel helpers for test_libbpf / test_maps / test_sockmap_iter ------------

import importlib.util  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from types import ModuleType  # noqa: E402

import pytest  # noqa: E402

BPFFS_ROOT = Path("/sys/fs/bpf")

_SK_MSG_SRC = """\
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
char _license[] SEC("license") = "GPL";
SEC("sk_msg")
int sg_test_msg(struct sk_msg_md *msg) { return SK_PASS; }
"""


def bpf_skip_reason() -> str | None:
    """Why the real-kernel BPF tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    if not BPFFS_ROOT.is_dir():
        return f"{BPFFS_ROOT} is missing"
    if not _is_bpffs(BPFFS_ROOT):
        return f"{BPFFS_ROOT} is not a bpffs: mount -t bpf bpf {BPFFS_ROOT}"
    from sockguard.kernel import libbpf

    ok, why = libbpf.available()
    return None if ok else why


#: The entry sources a kernel path can take (``--entry-source``), each asked of the probe.
EXACT_ENTRY_SOURCES = ("iterator", "tc_lookup")


def entry_source_skip_reason(name: str) -> str | None:
    """Why the entry source ``name`` cannot run here (the capability probe's words), or None."""
    reason = bpf_skip_reason()
    if reason is not None:
        return reason
    from sockguard.kernel import sockhash_lookup, sockmap_iter

    probe = {"iterator": sockmap_iter.iterator_available,
             "tc_lookup": sockhash_lookup.lookup_available}[name]
    ok, why = probe()
    return None if ok else f"--entry-source {name} cannot run here: {why}"


@pytest.fixture(params=EXACT_ENTRY_SOURCES)
def entry_source(request: pytest.FixtureRequest) -> str:
    """Each exact entry source in turn, skipped with the probe's reason where refused.

    A test that takes this fixture runs once per source the machine allows,
    so both paths are exercised wherever both load.
    """
    name: str = request.param
    reason = entry_source_skip_reason(name)
    if reason is not None:
        pytest.skip(reason)
    return name


def _is_bpffs(path: Path) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(
            line.split()[4] == str(path) and line.split(" - ")[1].split()[0] == "bpf" for line in fh
        )


@pytest.fixture
def bpf_kernel() -> None:
    """Skip (with the reason printed by -ra) unless root with bpffs and libbpf."""
    reason = bpf_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def bpffs_dir(bpf_kernel: None) -> Iterator[Path]:
    """A per-test directory in /sys/fs/bpf, removed with its pins afterwards."""
    path = BPFFS_ROOT / f"sockguard-test-{uuid.uuid4().hex[:10]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_map(bpf_kernel: None) -> Iterator[Callable[..., int]]:
    """Factory: ``make_map(type, key_size, value_size, max_entries, name=...)`` -> fd."""
    from sockguard.kernel import libbpf

    fds: list[int] = []

    def make(
        map_type: int, key_size: int, value_size: int, max_entries: int = 64, name: str = "sg_test"
    ) -> int:
        fd = libbpf.map_create(map_type, name, key_size, value_size, max_entries)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


@pytest.fixture
def tcp_pair() -> Iterator[Callable[..., tuple[socket.socket, socket.socket]]]:
    """Factory of established (client, server) TCP pairs on loopback, closed afterwards."""
    socks: list[socket.socket] = []

    def make(family: int = socket.AF_INET) -> tuple[socket.socket, socket.socket]:
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.bind((host, 0))
            listener.listen(1)
            client = socket.socket(family, socket.SOCK_STREAM)
            socks.append(client)
            client.settimeout(5)
            client.connect(listener.getsockname()[:2])
            server, _ = listener.accept()
            socks.append(server)
        return client, server

    yield make
    for s in socks:
        s.close()


def _load_bpf_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "sockguard_bpf_build", Path(_ROOT) / "bpf" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def sk_msg_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compiled object with one no-op ``sk_msg`` program, ``sg_test_msg``."""
    if shutil.which("clang") is None and shutil.which("clang-14") is None:
        pytest.skip("clang not installed: cannot build the test sk_msg program")
    build = _load_bpf_build()
    tmp = tmp_path_factory.mktemp("sk_msg")
    src = tmp / "sg_test_msg.bpf.c"
    src.write_text(_SK_MSG_SRC)
    try:
        return Path(build.compile_one(src, tmp / "sg_test_msg.bpf.o"))
    except build.BuildError as exc:
        pytest.skip(f"cannot build the test sk_msg program: {exc}")
