"""A Cilium-compatible sockops lab on the real kernel, for sockguard's tests.

See ``world.Lab`` for what it builds and ``keys.cilium_key`` for the
independent key encoder tests use as their oracle.
"""

from .keys import KEY_SIZE, cilium_key, describe, key_for, raw_key
from .sockets import (
    DEFAULT_TIMEOUT,
    close_rst,
    proc_net_tcp,
    proc_tcp_state,
    recv_exact,
    tcp_info,
)
from .topology import Namespace
from .world import (
    STAT_NAMES,
    Lab,
    build_lab_object,
    lab_unavailable_reason,
    link_attach_unsupported,
    sk_msg_attached,
    sockmap_prog_query_supported,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "KEY_SIZE",
    "STAT_NAMES",
    "Lab",
    "Namespace",
    "build_lab_object",
    "cilium_key",
    "close_rst",
    "describe",
    "key_for",
    "lab_unavailable_reason",
    "link_attach_unsupported",
    "proc_net_tcp",
    "proc_tcp_state",
    "raw_key",
    "recv_exact",
    "sk_msg_attached",
    "sockmap_prog_query_supported",
    "tcp_info",
]
