"""Kernel addresses the iterators compare a socket's ``sk_prot->recvmsg`` against.

A socket in a sockmap/sockhash reads through its psock's proto, whose
``recvmsg`` is ``tcp_bpf_recvmsg`` (``tcp_bpf_recvmsg_parser`` when the map has
an sk_skb verdict program, net/ipv4/tcp_bpf.c ``tcp_bpf_rebuild_protos``); any
other TCP socket, IPv4 or IPv6, has ``tcp_recvmsg`` (tcp_prot and tcpv6_prot
share it).  The incident's hang is a socket whose key is in the map while its
receive path is still ``tcp_recvmsg``.

Why /proc/kallsyms read here and handed to the programs in ``.rodata``, not
libbpf's typeless ``__ksym`` externs: the two tcp_bpf functions are static, and
libbpf refuses to load the whole object when a static name is ambiguous; here
each symbol fails soft on its own (0, and the iterators report the path as
unknown), a hidden address (kptr_restrict) is recognised, and the file is read
once per process instead of at every load.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sockguard.core.layout import KernelKeyForm
from sockguard.kernel.bpf_object import CStruct

KALLSYMS = "/proc/kallsyms"
RECV_SYMBOLS = ("tcp_recvmsg", "tcp_bpf_recvmsg", "tcp_bpf_recvmsg_parser")

#: ``struct sg_config`` of bpf/sock_state.h, the whole ``.rodata`` of the iterators and
#: the tc lookup (set by name, see :func:`config`; this copy is for tests).
CONFIG = CStruct("sg_config", "=QQQII8s",
                 "tcp_recvmsg tcp_bpf_recvmsg tcp_bpf_recvmsg_parser key_size judge key_form")


@dataclass(frozen=True)
class RecvSymbols:
    """The receive functions' addresses (0 where unusable) and why any is missing."""

    tcp_recvmsg: int = 0
    tcp_bpf_recvmsg: int = 0
    tcp_bpf_recvmsg_parser: int = 0
    problems: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """Whether the iterators can tell the two paths apart."""
        return bool(self.tcp_recvmsg and self.tcp_bpf_recvmsg)


def find_symbols(data: bytes, names: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """Addresses of the core-kernel text symbols ``names`` in kallsyms ``data``.

    A name listed with different addresses (two static functions) or with
    address 0 (kptr_restrict hides addresses) gets no address; module
    symbols (``\\t[mod]`` suffix) never match.
    """
    found: dict[str, int] = {}
    problems: list[str] = []
    for name in names:
        needle = b" " + name.encode() + b"\n"
        addrs: set[int] = set()
        at = data.find(needle)
        while at >= 0:
            start = data.rfind(b"\n", 0, at) + 1
            fields = data[start:at].split()
            if len(fields) == 2 and fields[1] in (b"t", b"T", b"w", b"W"):
                addrs.add(int(fields[0], 16))
            at = data.find(needle, at + 1)
        if not addrs:
            problems.append(f"{name} not in {KALLSYMS}")
        elif len(addrs) > 1:
            problems.append(f"{name} is ambiguous in {KALLSYMS}")
        elif addrs == {0}:
            problems.append(f"{name}'s address is hidden (kernel.kptr_restrict)")
        else:
            found[name] = addrs.pop()
    return found, problems


@functools.cache
def recv_symbols(path: str = KALLSYMS) -> RecvSymbols:
    """The receive functions of the running kernel (read once per process)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return RecvSymbols(problems=(f"cannot read {path}: {exc.strerror}",))
    found, problems = find_symbols(data, RECV_SYMBOLS)
    return RecvSymbols(found.get("tcp_recvmsg", 0), found.get("tcp_bpf_recvmsg", 0),
                       found.get("tcp_bpf_recvmsg_parser", 0), tuple(problems))


def config(key_size: int = 0, judge: KernelKeyForm | None = None) -> dict[str, int]:
    """The load-time settings (``struct sg_config``) of an iterator or entry-source object.

    ``judge``: the form of the map's keys, by which the entry sources judge
    healthy entries and count them instead of reporting them
    (bpf/entry_record.h); None: every entry is reported.
    """
    syms = recv_symbols()
    settings = {"sg_config.tcp_recvmsg": syms.tcp_recvmsg,
                "sg_config.tcp_bpf_recvmsg": syms.tcp_bpf_recvmsg,
                "sg_config.tcp_bpf_recvmsg_parser": syms.tcp_bpf_recvmsg_parser,
                "sg_config.key_size": key_size, "sg_config.judge": int(judge is not None)}
    if judge is not None:
        settings.update(judge.settings("sg_config.key_form"))
    return settings
