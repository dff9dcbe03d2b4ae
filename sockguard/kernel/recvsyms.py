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
from sockguard.kernel.kallsyms import KALLSYMS, find_symbols

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
