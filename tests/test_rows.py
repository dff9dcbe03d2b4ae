"""The fast paths of the audit give the same answers as the plain ones (no root)."""

from __future__ import annotations

import random
import socket
from ipaddress import IPv4Address, IPv6Address

import pytest

from sockguard.core.audit import (
    AuditPolicy,
    AuditResult,
    SocketIndex,
    audit_records,
    confirm,
    normalize,
)
from sockguard.core.layout import CILIUM, decode, key_for_socket
from sockguard.core.model import Endpoint, Kind, LiveSocket, MapEntry, MapInfo, Netns, Tuple4
from sockguard.core.rows import Interner, Record, SocketTable, positional_constructor, target_socket
from sockguard.kernel.sockets import _request
from tests.audit_oracle import audit_map

MAP = MapInfo(1, "cilium_sock_ops", "sockhash", 44, 4, 65535)
NETNS = [Netns(4026531840, "host"), Netns(4026532000, "pod-a")]
V4 = [b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", b"\x7f\x00\x00\x01"]
V6 = [bytes(10) + b"\xff\xff\x0a\x00\x00\x01", bytes(15) + b"\x01", bytes(15) + b"\x02"]


def _world(seed: int) -> tuple[SocketTable, list[Record]]:
    """Sockets in two namespaces (duplicates, all states, v4-mapped, receive paths) and
    records about them (dead sockets, receive paths, keys not describing their socket)."""
    rnd = random.Random(seed)
    table = SocketTable()
    for netns in NETNS:
        for i in range(200):
            pool = V6 if rnd.random() < 0.25 else V4
            k = (rnd.choice(pool), rnd.randint(1, 12), rnd.choice(pool), rnd.randint(1, 12))
            cookie = rnd.randint(1, 300)
            table.rows.append((k, rnd.choice([1, 1, 1, 2, 3, 4, 6, 7, 8, 12]), cookie, i, 0))
            if rnd.random() < 0.5:  # the receive path iter/tcp saw, for some sockets
                table.recv[cookie] = rnd.choice([1, 2, 2, 3])
        table.close_span(netns)
    records: list[Record] = []
    for _ in range(500):
        row = rnd.choice(table.rows)
        (lip, lport, rip, rport), own_cookie = row[0], row[2]
        if rnd.random() < 0.3:
            lport = rnd.randint(1, 12)
        local: IPv4Address | IPv6Address = (IPv4Address(lip) if len(lip) == 4
                                            else IPv6Address(lip))
        remote: IPv4Address | IPv6Address = (IPv4Address(rip) if len(rip) == 4
                                             else IPv6Address(rip))
        if isinstance(local, IPv6Address) and isinstance(remote, IPv6Address):
            lm, rm = local.ipv4_mapped, remote.ipv4_mapped
            if lm is not None and rm is not None and rnd.random() < 0.5:
                local, remote = lm, rm  # Cilium keys a dual-stack socket as IPv4
        family = 4 if isinstance(local, IPv4Address) else 6
        key = key_for_socket(CILIUM, Tuple4(family, Endpoint(local, lport),
                                            Endpoint(remote, rport)))
        cookie = rnd.choice([rnd.randint(1, 300), *(r[2] for r in table.rows[:5]),
                             *[own_cookie] * 6])
        af = socket.AF_INET if len(lip) == 4 else socket.AF_INET6
        if rnd.random() < 0.2:  # an entry whose socket has another tuple (incident's dummy)
            lip, lport = rnd.choice(V4 if af == socket.AF_INET else V6), rnd.randint(1, 12)
        records.append((key, cookie, 1, af, rnd.choice([1, 1, 7]), lip, rip, lport, rport,
                        rnd.random() < 0.1, rnd.choice([0, 1, 2, 2, 2, 3])))
    records.append((b"\x01" * 44, 5, 1, socket.AF_INET, 1, V4[0], V4[1], 1, 2, False, 2))
    return table, records


def _plain(table: SocketTable, records: list[Record], policy: AuditPolicy) -> AuditResult:
    """The same audit the slow way: LiveSocket values, MapEntry values, audit_map."""
    interner = Interner()
    entries: list[MapEntry] = []
    undecodable: list[str] = []
    for rec in records:
        try:
            key = decode(CILIUM, rec[0])
        except ValueError as exc:
            undecodable.append(f"{rec[0].hex()}: {exc}")
            continue
        target = target_socket(rec, interner)
        entries.append(MapEntry(rec[0].hex(), key, target.cookie, target))
    return audit_map(MAP, entries, SocketIndex.build(table.sockets()), policy, undecodable)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("proxy", [False, True])
def test_audit_records_equals_audit_map(seed: int, proxy: bool) -> None:
    table, records = _world(seed)
    policy = AuditPolicy(frozenset({IPv4Address("10.0.0.2")}) if proxy else frozenset())
    fast = audit_records(MAP, CILIUM, records, SocketIndex.from_table(table), policy)
    plain = _plain(table, records, policy)
    for kind in Kind:
        assert fast.count(kind) == plain.count(kind)
    assert fast.bad == plain.bad
    assert (fast.entries, fast.pending, fast.undecodable) == (
        plain.entries, plain.pending, plain.undecodable)
    assert fast.findings == plain.findings  # builds the compact ok findings, in map order
    assert fast == plain


def test_lazy_result_confirms_and_substitutes_without_building_ok() -> None:
    table, records = _world(1)
    result = audit_records(MAP, CILIUM, records, SocketIndex.from_table(table), AuditPolicy())
    plain = _plain(table, records, AuditPolicy())
    assert result._lazy > 0
    second = plain.bad[::2]
    result.confirm_bad(second)
    result.substitute({id(f): f for f in result.bad})
    assert result._lazy > 0 and result.count(Kind.OK) == plain.count(Kind.OK)
    assert result.findings == confirm(plain.findings, second)


def test_socket_index_views_match_live_sockets() -> None:
    table, _ = _world(2)
    socks = table.sockets()
    index = SocketIndex.build(socks)
    owners = index.owners
    for s in socks:
        if s.state in (1, 4, 8):
            assert s in owners[normalize(s.tuple)]
    assert index.count == len(socks)
    assert set(index.by_cookie) == {s.cookie for s in socks if s.cookie}
    fast = SocketIndex.from_table(table)
    assert fast.owners == owners and fast.timewait == index.timewait
    assert fast.handshake == index.handshake and fast.by_local == index.by_local


def test_interner_text_matches_str() -> None:
    interner = Interner()
    for k in [(V4[0], 80, V4[1], 56184), (V6[1], 443, V6[2], 1), (V6[0], 1, V6[1], 2)]:
        tup = interner.tuple4(k)
        assert interner.tuple_text(k) == str(tup)
        assert interner.key_of(tup) == k
        assert tup == Tuple4(4 if len(k[0]) == 4 else 6,
                             Endpoint(interner.ip(k[0]), k[1]), Endpoint(interner.ip(k[2]), k[3]))


def test_maker_builds_equal_values_and_refuses_others() -> None:
    new = positional_constructor(LiveSocket)
    tup = Tuple4(4, Endpoint(IPv4Address("10.0.0.1"), 1), Endpoint(IPv4Address("10.0.0.2"), 2))
    made = new(tup, 1, 2, 3, NETNS[0], 4, None)
    plain = LiveSocket(tup, 1, 2, 3, NETNS[0], 4)
    assert made == plain and hash(made) == hash(plain) and repr(made) == repr(plain)
    with pytest.raises(TypeError):
        positional_constructor(SocketTable)  # not frozen


def test_request_wire_bytes() -> None:
    # nlmsghdr + inet_diag_req_v2 as the kernel reads them (include/uapi/linux/inet_diag.h)
    assert _request(socket.AF_INET, 1, 0x301).hex() == (
        "4800000014000103010000000000000002060000ff1b0000" + "00" * 40 + "ff" * 8)
    probe = _request(socket.AF_INET6, 105, 1, states=0xFFFFFFFF, sport=80, dport=56184,
                     src=IPv4Address("10.1.2.3").packed, dst=IPv6Address("fe80::1").packed)
    assert probe.hex() == (
        "480000001400010069000000000000000a060000ffffffff0050db780a010203" + "00" * 12
        + "fe80" + "00" * 13 + "01" + "00000000" + "ff" * 8)
