"""A second key layout is one ``KeyLayout`` value: the audit, the kernel's judgement
of healthy entries and the tracer's kernel-side filter all take it.

``MIRROR`` differs from Cilium's layout in every respect the layout describes:
a 4-byte family code first, the owning socket's *local* side in the source
fields, little-endian 2-byte ports, 40 bytes.  Its keys are written here by
:func:`mirror_key`, independently of sockguard's encoder.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockguard.core.audit import AuditPolicy
from sockguard.core.layout import (
    CILIUM,
    FILTER_KEY,
    Field,
    KernelKeyForm,
    KeyLayout,
    filter_key,
    kernel_form,
    key_for_socket,
)
from sockguard.core.model import Endpoint, Kind, Tuple4
from sockguard.kernel import libbpf, maps, sockhash_lookup, sockmap_iter
from sockguard.kernel.node_audit import run_audit
from sockguard.trace.events import TraceEvent
from sockguard.trace.tracer import Tracer, daemon_options
from sockguard.trace.watched import MapWatch
from tests.conftest import entry_source_skip_reason

MIRROR = KeyLayout(
    name="mirror", size=40, family=Field(0, 4), sip=Field(4, 16), dip=Field(20, 16),
    sport=Field(36, 2), dport=Field(38, 2), families=((4, 4), (6, 6)),
    port_order="little", owner_local="src")

SOCKHASH = libbpf.BPF_MAP_TYPE_SOCKHASH
MakeMap = Callable[..., int]
TcpPair = Callable[..., tuple[socket.socket, socket.socket]]


def tuple_of(sock: socket.socket) -> Tuple4:
    """``sock``'s connection; an IPv4-mapped one as IPv4."""
    (lip, lport), (rip, rport) = sock.getsockname()[:2], sock.getpeername()[:2]
    la, ra = ip_address(lip), ip_address(rip)
    if isinstance(la, IPv6Address) and la.ipv4_mapped and isinstance(ra, IPv6Address):
        la, ra = la.ipv4_mapped, ra.ipv4_mapped
    return Tuple4(la.version, Endpoint(la, lport), Endpoint(ra, rport))


def mirror_key(sock: socket.socket) -> bytes:
    """The MIRROR key of ``sock``: family, local address, remote address (16 bytes
    each, IPv4 in the first 4), local port, remote port (little-endian u16)."""
    t = tuple_of(sock)
    la, ra = (e.ip.packed.ljust(16, b"\0") for e in (t.local, t.remote))
    return struct.pack("<I16s16sHH", t.family, la, ra, t.local.port, t.remote.port)


# -- pure: the form the programs get, the filter's form ------------------------------------


def test_the_programs_get_each_layouts_offsets_for_the_owning_sockets_sides() -> None:
    assert kernel_form(CILIUM) == KernelKeyForm(
        remote_addr=0, local_addr=16, remote_port=36, local_port=40, family=32,
        family_v4=1, family_v6=2, port_big_endian=1)
    assert kernel_form(MIRROR) == KernelKeyForm(
        remote_addr=20, local_addr=4, remote_port=38, local_port=36, family=0,
        family_v4=4, family_v6=6, port_big_endian=0)


@pytest.mark.parametrize("layout", [
    KeyLayout(name="v4only", size=12, sip=Field(0, 4), dip=Field(4, 4), family=Field(8, 1),
              sport=Field(9, 1), dport=Field(10, 2), families=((1, 4), (2, 6))),
    KeyLayout(name="long", size=80, sip=Field(0, 16), dip=Field(16, 16), family=Field(32, 1),
              sport=Field(36, 4), dport=Field(40, 4), families=((1, 4), (2, 6))),
    KeyLayout(name="wide-codes", size=44, sip=Field(0, 16), dip=Field(16, 16),
              family=Field(32, 2), sport=Field(36, 4), dport=Field(40, 4),
              families=((0x200, 4), (0x300, 6))),
    KeyLayout(name="v4-codes-only", size=44, sip=Field(0, 16), dip=Field(16, 16),
              family=Field(32, 1), sport=Field(36, 4), dport=Field(40, 4), families=((1, 4),)),
], ids=lambda layout: layout.name)
def test_a_layout_the_programs_cannot_write_is_judged_in_python(layout: KeyLayout) -> None:
    assert kernel_form(layout) is None


_v4 = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
_v6 = st.builds(IPv6Address, st.integers(2**48, 2**128 - 1))  # never IPv4-mapped
_port = st.integers(1, 0xFFFF)


@st.composite
def _tuples(draw: st.DrawFn) -> Tuple4:
    ips = draw(st.sampled_from([_v4, _v6]))
    local, remote = draw(ips), draw(ips)
    return Tuple4(local.version, Endpoint(local, draw(_port)), Endpoint(remote, draw(_port)))


@given(_tuples())
def test_every_layouts_key_of_a_socket_has_that_sockets_filter_key(tup: Tuple4) -> None:
    want = key_for_socket(FILTER_KEY, tup)
    assert filter_key(MIRROR, key_for_socket(MIRROR, tup)) == want
    assert filter_key(CILIUM, key_for_socket(CILIUM, tup)) == want


def test_bytes_a_layout_cannot_hold_have_no_filter_key() -> None:
    assert filter_key(MIRROR, b"\x05" + bytes(39)) is None  # family code 5
    assert filter_key(MIRROR, bytes(39)) is None


# -- kernel: the entry sources judge MIRROR's entries, the audit takes them -------------------


def _need(source: str) -> None:
    reason = entry_source_skip_reason(source)
    if reason is not None:
        pytest.skip(reason)


def _mapped_pair() -> tuple[socket.socket, socket.socket] | None:
    """Two AF_INET6 sockets of one IPv4 connection (::ffff:127.0.0.1), or None."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::ffff:127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket(socket.AF_INET6)
        client.connect(listener.getsockname()[:2])
        server, _ = listener.accept()
        return client, server
    return None


@pytest.fixture
def mirror_map(make_map: MakeMap, tcp_pair: TcpPair) -> Iterator[tuple[int, list[socket.socket],
                                                                     bytes]]:
    """A MIRROR sockhash: every socket of four connections (IPv4, IPv6 where loopback
    has it, IPv4-mapped) under its own key, and one key its socket does not have."""
    fd = make_map(SOCKHASH, MIRROR.size, 4, 64, name="sg_t_mirror")
    socks = [s for _ in range(2) for s in tcp_pair()]
    with contextlib.suppress(OSError):
        socks += tcp_pair(socket.AF_INET6)
    mapped = _mapped_pair()
    if mapped is not None:
        socks += mapped
    for s in socks:
        libbpf.map_update(fd, mirror_key(s), struct.pack("=i", s.fileno()))
    dummy, other = tcp_pair()
    wrong = struct.pack("<I16s16sHH", 4, IPv4Address("10.9.9.8").packed + bytes(12),
                        IPv4Address("10.9.9.9").packed + bytes(12), 4242, 80)
    libbpf.map_update(fd, wrong, struct.pack("=i", dummy.fileno()))
    yield fd, socks, wrong
    for s in (mapped or ()):
        s.close()
    assert other.fileno() >= 0


@pytest.mark.kernel
@pytest.mark.parametrize("source", ["iterator", "tc_lookup"])
def test_the_kernel_judges_a_second_layouts_entries(
        mirror_map: tuple[int, list[socket.socket], bytes], source: str) -> None:
    _need(source)
    fd, socks, wrong = mirror_map
    form = kernel_form(MIRROR)
    assert form is not None
    keys = [mirror_key(s) for s in socks] + [wrong]
    if source == "iterator":
        records, healthy = sockmap_iter.read_judged(fd, MIRROR.size, form)
    else:
        records, healthy = sockhash_lookup.read_judged(fd, MIRROR.size, keys, form)
    assert sum(healthy.values()) == len(socks)
    assert set(healthy) == {os.stat("/proc/self/ns/net").st_ino}
    assert set(records) == {wrong}


@pytest.mark.kernel
@pytest.mark.parametrize("source", ["iterator", "tc_lookup"])
def test_an_audit_of_a_second_layouts_map_is_the_same_as_of_ciliums(
        mirror_map: tuple[int, list[socket.socket], bytes], source: str) -> None:
    _need(source)
    fd, socks, wrong = mirror_map
    info = maps.resolve_map(f"id:{libbpf.map_info(fd).id}")
    audit = run_audit([info], MIRROR, AuditPolicy(), confirm_delay=0, entry_source_name=source)
    [result] = audit.results
    assert result.healthy == len(socks)  # judged in the kernel, no finding built
    assert result.count(Kind.OK) == len(socks)
    [stale] = result.bad
    assert stale.kind is Kind.STALE and stale.entry.key_hex == wrong.hex()
    assert stale.entry.key.owner == Tuple4(4, Endpoint(IPv4Address("10.9.9.8"), 4242),
                                           Endpoint(IPv4Address("10.9.9.9"), 80))


# -- kernel: the tracer's filter watches MIRROR's map -----------------------------------------


@pytest.mark.kernel
def test_the_tracers_filter_watches_a_second_layouts_map(
        mirror_map: tuple[int, list[socket.socket], bytes], tcp_pair: TcpPair) -> None:
    """The filter keys sockets one way whatever the layout: MIRROR's keys are watched in
    the filter's form, a socket of the map is reported and a socket outside it is not."""
    fd, socks, _wrong = mirror_map
    info = maps.resolve_map(f"id:{libbpf.map_info(fd).id}")
    events: list[TraceEvent] = []
    tracer = Tracer(events.append, daemon_options(), MapWatch(lambda: [info], layout=MIRROR))
    try:
        detections = tracer.start()
        if not detections["lifecycle"].active:
            pytest.skip(f"lifecycle cannot run here: {detections['lifecycle'].reason}")
        assert tracer.filtering and tracer.watched is not None
        assert {filter_key(MIRROR, mirror_key(s)) for s in socks} <= set(tracer.watched.keys)
        assert all(key_for_socket(FILTER_KEY, tuple_of(s)) in tracer.watched.keys
                   for s in socks)
        # A socket of the map whose key is left pointing at another socket when it closes,
        # and a plain socket outside the map.
        victim, _peer = tcp_pair()
        holder, _h = tcp_pair()
        libbpf.map_update(fd, mirror_key(victim), struct.pack("=i", holder.fileno()))
        plain, _p = tcp_pair()
        tracer.watched.due = 0.0
        tracer.poll(0)
        gone = {"victim": tuple_of(victim), "plain": tuple_of(plain)}
        victim.close()
        plain.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                e.kind == "destroy" and e.sock == gone["victim"] for e in events):
            tracer.poll(100)
        [ev] = [e for e in events if e.kind == "destroy" and e.sock == gone["victim"]]
        assert ev.left_behind and ev.key_in_maps == (f"{info.name}#{info.id}",)
        assert not any(e.sock == gone["plain"] for e in events)
    finally:
        tracer.close()
