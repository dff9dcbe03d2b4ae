"""The sock_diag adapter's exact lookups, against real loopback sockets (root)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from ipaddress import ip_address

import pytest

from sockguard.core.audit import normalize
from sockguard.core.model import Endpoint, Tuple4
from sockguard.core.tcp_states import TCP_ESTABLISHED
from sockguard.kernel import sockets
from sockguard.kernel.netns import enumerate_netns, host_netns_path
from sockguard.kernel.sockets import OwnerProbe, lookup_tuples

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sock_diag in every namespace needs root")

Pair = Callable[..., tuple[socket.socket, socket.socket]]


def _tuple(sock: socket.socket) -> Tuple4:
    """The tuple of ``sock`` from its own side (local, remote)."""
    local, remote = sock.getsockname(), sock.getpeername()
    family = 4 if sock.family == socket.AF_INET else 6
    return Tuple4(family, Endpoint(ip_address(local[0]), local[1]),
                  Endpoint(ip_address(remote[0]), remote[1]))


def _host_refs() -> list:
    host = os.stat(host_netns_path()).st_ino
    return [ref for ref in enumerate_netns() if ref.netns.ino == host]


def test_batched_lookups_find_exactly_the_live_tuples(tcp_pair: Pair) -> None:
    """More tuples than one batch, present and absent, v4 and v6: each answered once."""
    present: list[Tuple4] = []
    for i in range(sockets._BATCH + 30):
        client, server = tcp_pair(socket.AF_INET6 if i % 10 == 0 else socket.AF_INET)
        present += [_tuple(client), _tuple(server)]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener_port = listener.getsockname()[1]
    absent = [Tuple4(4, Endpoint(ip_address("127.77.0.1"), 40000 + i),
                     Endpoint(ip_address("127.77.0.2"), 50000 + i)) for i in range(200)]
    # inet_diag_find_one_icsk() may answer with a listener on the local port: not a match.
    absent.append(Tuple4(4, Endpoint(ip_address("127.0.0.1"), listener_port),
                         Endpoint(ip_address("127.77.0.3"), 1)))
    mixed = [t for pair in zip(present, absent, strict=False) for t in pair] + present[len(absent):]

    with listener, OwnerProbe(_host_refs()) as probe:
        found = probe.found_all(mixed)
        one = probe.found(present[0])
        none = probe.owner(absent[-1])

    assert set(found) == {normalize(t) for t in present}
    for tup in present:
        (live,) = found[normalize(tup)]
        assert live.state == TCP_ESTABLISHED
    assert [normalize(s.tuple) for s in one] == [normalize(present[0])]
    assert none is None


def test_lookup_tuples_is_a_scan_of_just_those(tcp_pair: Pair) -> None:
    client, server = tcp_pair()
    gone = _tuple(client)
    wanted = [gone, _tuple(server)]
    scan = lookup_tuples(wanted, _host_refs())
    assert scan.complete
    assert len(scan.namespaces) == 1
    assert {normalize(s.tuple) for s in scan.table.sockets()} == {normalize(t) for t in wanted}


def test_placed_tuples_are_asked_in_their_namespace_or_everywhere(tcp_pair: Pair) -> None:
    """A tuple placed in a namespace the probe cannot see is asked everywhere: never lost."""
    client, server = tcp_pair()
    host = _host_refs()
    here, unknown = _tuple(client), _tuple(server)
    with OwnerProbe(host) as probe:
        found = probe.found_all([], {here: host[0].netns.ino, unknown: 1})
    assert set(found) == {normalize(here), normalize(unknown)}
    assert {s.netns.ino for socks in found.values() for s in socks} == {host[0].netns.ino}
