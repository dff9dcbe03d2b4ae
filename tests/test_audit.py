"""The audit core's rules, without root: plain data in, findings out."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockguard.core.audit import AuditPolicy, SocketIndex, confirm
from sockguard.core.layout import CILIUM, decode, key_for_socket
from sockguard.core.model import Endpoint, Kind, LiveSocket, MapEntry, MapInfo, Netns, Tuple4
from sockguard.core.tcp_states import (
    TCP_ESTABLISHED,
    TCP_FIN_WAIT1,
    TCP_SYN_RECV,
    TCP_SYN_SENT,
    TCP_TIME_WAIT,
)
from tests.audit_oracle import audit_map, judge

MAP = MapInfo(7, "cilium_sock_ops", "sockhash", 44, 4, 65535, "/sys/fs/bpf/x")
POD_NS = Netns(4026532000, "pod-a")
NO_POLICY = AuditPolicy()


def tup(local: str, lport: int, remote: str, rport: int) -> Tuple4:
    lip, rip = ip_address(local), ip_address(remote)
    return Tuple4(lip.version, Endpoint(lip, lport), Endpoint(rip, rport))


def sock(t: Tuple4, cookie: int = 100, state: int = TCP_ESTABLISHED,
         netns: Netns = POD_NS) -> LiveSocket:
    return LiveSocket(t, state, cookie, inode=cookie + 5000, netns=netns)


def entry_for(t: Tuple4, cookie: int | None = None) -> MapEntry:
    raw = key_for_socket(CILIUM, t)
    return MapEntry(raw.hex(), decode(CILIUM, raw), cookie)


SERVER = tup("10.0.1.2", 8080, "10.0.2.2", 40000)
CLIENT = SERVER.reversed()


def test_entry_of_a_live_socket_is_ok() -> None:
    index = SocketIndex.build([sock(SERVER, 1), sock(CLIENT, 2)])
    v = judge(entry_for(SERVER), index, NO_POLICY)
    assert v.kind is Kind.OK
    assert v.socket is not None and v.socket.cookie == 1


def test_ok_is_exact_when_the_cookie_matches() -> None:
    index = SocketIndex.build([sock(SERVER, 1)])
    v = judge(entry_for(SERVER, cookie=1), index, NO_POLICY)
    assert v.kind is Kind.OK and v.details["verified_by_cookie"] is True


def test_entry_without_any_live_socket_is_stale() -> None:
    index = SocketIndex.build([sock(CLIENT, 2)])  # the peer alone does not own it
    v = judge(entry_for(SERVER), index, NO_POLICY)
    assert v.kind is Kind.STALE
    assert "no live socket" in v.reason


def test_stale_entry_of_a_closed_connection_names_its_time_wait() -> None:
    index = SocketIndex.build([sock(SERVER, 1, state=TCP_TIME_WAIT)])
    v = judge(entry_for(SERVER), index, NO_POLICY)
    assert v.kind is Kind.STALE
    assert v.details["closed_in_netns"] == "pod-a"


def test_entry_pointing_at_another_socket_shadows_the_live_owner() -> None:
    dummy = sock(tup("127.0.0.1", 5555, "127.0.0.1", 6666), cookie=99)
    index = SocketIndex.build([sock(SERVER, 1), dummy])
    v = judge(entry_for(SERVER, cookie=99), index, NO_POLICY)
    assert v.kind is Kind.SHADOWING
    assert v.socket is not None and v.socket.cookie == 1  # the endangered connection
    assert v.details["entry_cookie"] == 99
    assert "127.0.0.1:5555" in str(v.details["entry_socket"])


def test_closing_sockets_still_own_their_entry() -> None:
    index = SocketIndex.build([sock(SERVER, 1, state=TCP_FIN_WAIT1)])
    assert judge(entry_for(SERVER), index, NO_POLICY).kind is Kind.OK


def test_tuple_in_handshake_gets_no_verdict_yet() -> None:
    for state in (TCP_SYN_SENT, TCP_SYN_RECV):
        index = SocketIndex.build([sock(SERVER, 1, state=state)])
        assert judge(entry_for(SERVER), index, NO_POLICY).kind is None
    result = audit_map(MAP, [entry_for(SERVER)],
                       SocketIndex.build([sock(SERVER, 1, state=TCP_SYN_RECV)]), NO_POLICY)
    assert result.findings == [] and result.pending == 1


def test_owner_in_any_namespace_counts() -> None:
    other = Netns(4026532999, "pod-z")
    index = SocketIndex.build([sock(SERVER, 1, netns=other)])
    v = judge(entry_for(SERVER), index, NO_POLICY)
    assert v.kind is Kind.OK and v.socket is not None and v.socket.netns == other


def test_dual_stack_socket_with_mapped_addresses_owns_an_ipv4_key() -> None:
    mapped = Tuple4(6, Endpoint(IPv6Address("::ffff:10.0.1.2"), 8080),
                    Endpoint(IPv6Address("::ffff:10.0.2.2"), 40000))
    index = SocketIndex.build([sock(mapped, 1)])
    assert judge(entry_for(SERVER), index, NO_POLICY).kind is Kind.OK


GATEWAY = IPv4Address("10.0.0.1")
PROXY_PORT = 15001
#: cilium_host's address known, and the proxy listening on its port in the host netns.
PROXY_POLICY = AuditPolicy(proxy_ips=frozenset({GATEWAY}),
                           host_listen_ports=frozenset({PROXY_PORT}))
#: cilium_host's address known, nothing listening on the entry's sport.
GATEWAY_ONLY = AuditPolicy(proxy_ips=frozenset({GATEWAY}), host_listen_ports=frozenset({22}))


def proxy_entry(client: Tuple4, proxy_port: int = 15001) -> MapEntry:
    # Cilium's L7 redirect: sip = host gateway, sport = proxy port,
    # dip/dport = the client's own local side.
    from sockguard.core.layout import encode

    raw = encode(CILIUM, 4, GATEWAY, proxy_port, client.local.ip, client.local.port)
    return MapEntry(raw.hex(), decode(CILIUM, raw))


def test_proxy_entry_is_not_stale_for_not_matching_its_socket() -> None:
    client = tup("10.0.2.2", 40000, "10.96.0.10", 80)  # talking to a service IP
    index = SocketIndex.build([sock(client, 3)])
    entry = proxy_entry(client)
    v = judge(entry, index, PROXY_POLICY)
    assert v.kind is Kind.PROXY and v.socket is not None and v.socket.cookie == 3
    # cilium_host unknown: the proxy listening on the sport is evidence enough
    no_gateway = AuditPolicy(host_listen_ports=frozenset({PROXY_PORT}))
    assert judge(entry, index, no_gateway).kind is Kind.PROXY
    # no listener on the sport: the gateway address alone proves nothing
    assert judge(entry, index, GATEWAY_ONLY).kind is Kind.STALE
    assert judge(entry, index, NO_POLICY).kind is Kind.STALE


def test_proxy_unknown_when_host_listeners_could_not_be_read() -> None:
    """Could not look is not absence: an entry from the gateway stays a proxy candidate."""
    client = tup("10.0.2.2", 40000, "10.96.0.10", 80)
    index = SocketIndex.build([sock(client, 3)])
    blind = AuditPolicy(proxy_ips=frozenset({GATEWAY}), host_listen_ports=None)
    assert judge(proxy_entry(client), index, blind).kind is Kind.PROXY
    gone = judge(proxy_entry(client), SocketIndex.build([]), blind)
    assert gone.kind is Kind.STALE and gone.details["proxy"] is True  # never deleted


# A host -> pod connection from cilium_host's address (kubelet's probes): the pod
# side's entry has sip = gateway, sport = the host's ephemeral port.
POD_SIDE = tup("10.0.1.2", 8080, str(GATEWAY), 45678)  # the pod's server socket
HOST_SIDE = POD_SIDE.reversed()


@pytest.mark.parametrize("policy", [PROXY_POLICY, GATEWAY_ONLY, NO_POLICY,
                                    AuditPolicy(frozenset({GATEWAY}), None)])
def test_gateway_sourced_connection_is_judged_like_any_other(policy: AuditPolicy) -> None:
    live_index = SocketIndex.build([sock(POD_SIDE, 1), sock(HOST_SIDE, 2)])
    pod_entry = entry_for(POD_SIDE, 1)
    assert pod_entry.key.sip == GATEWAY
    assert judge(pod_entry, live_index, policy).kind is Kind.OK
    assert judge(entry_for(HOST_SIDE, 2), live_index, policy).kind is Kind.OK
    # the same tuple with the entry pointing elsewhere: the pod's peer hangs
    v = judge(entry_for(POD_SIDE, 99), live_index, policy)
    assert v.kind is Kind.SHADOWING and v.socket is not None and v.socket.cookie == 1


@pytest.mark.parametrize("policy", [PROXY_POLICY, GATEWAY_ONLY, NO_POLICY])
def test_gateway_sourced_entry_left_behind_is_stale(policy: AuditPolicy) -> None:
    # Other kubelet probes to the same pod port are alive; this connection is gone.
    other = tup("10.0.1.2", 8080, str(GATEWAY), 45999)
    index = SocketIndex.build([sock(other, 5), sock(other.reversed(), 6)])
    v = judge(entry_for(POD_SIDE, 1), index, policy)
    assert v.kind is Kind.STALE and "proxy" not in v.details


def test_proxy_entry_whose_client_is_gone_is_stale_but_marked() -> None:  # never deleted
    v = judge(proxy_entry(tup("10.0.2.2", 40000, "10.96.0.10", 80)),
              SocketIndex.build([]), PROXY_POLICY)
    assert v.kind is Kind.STALE and v.details["proxy"] is True


def test_audit_map_counts_kinds() -> None:
    a, b, c = SERVER, CLIENT, tup("10.0.1.2", 8080, "10.0.3.3", 41000)
    index = SocketIndex.build([sock(a, 1), sock(b, 2)])
    result = audit_map(MAP, [entry_for(a), entry_for(b), entry_for(c)], index, NO_POLICY)
    assert (result.entries, result.count(Kind.OK), result.count(Kind.STALE)) == (3, 2, 1)
    assert [f.entry.key.owner for f in result.bad] == [c]


def test_confirm_keeps_only_findings_seen_twice_with_the_same_socket() -> None:
    stale = entry_for(SERVER, cookie=9)
    first = audit_map(MAP, [stale, entry_for(CLIENT, 2)],
                      SocketIndex.build([sock(CLIENT, 2)]), NO_POLICY).findings
    # Second look: the same key now points to another socket (re-inserted).
    reinserted = entry_for(SERVER, cookie=10)
    second = audit_map(MAP, [reinserted], SocketIndex.build([]), NO_POLICY).findings
    assert [f.kind for f in confirm(first, second)] == [Kind.OK]
    again = audit_map(MAP, [stale], SocketIndex.build([]), NO_POLICY).findings
    confirmed = confirm(first, again)
    assert [(f.kind, f.confirmed) for f in confirmed] == [(Kind.STALE, True), (Kind.OK, False)]


def test_confirm_drops_a_candidate_whose_owner_appeared() -> None:
    first = audit_map(MAP, [entry_for(SERVER)], SocketIndex.build([]), NO_POLICY).findings
    second = audit_map(MAP, [entry_for(SERVER)], SocketIndex.build([sock(SERVER)]),
                       NO_POLICY).findings
    assert confirm(first, second) == []


# --- properties ------------------------------------------------------------

octet = st.integers(min_value=1, max_value=254)
ipv4 = st.builds(lambda a, b: IPv4Address(f"10.{a}.{b}.2"), octet, octet)
port = st.integers(min_value=1, max_value=65535)
tuples = st.builds(lambda a, ap, b, bp: Tuple4(4, Endpoint(a, ap), Endpoint(b, bp)),
                   ipv4, port, ipv4, port)
live_states = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 11])


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[LiveSocket], list[MapEntry]]:
    socks_tuples = draw(st.lists(tuples, max_size=20, unique=True))
    socks = [sock(t, cookie=i + 1, state=draw(live_states)) for i, t in enumerate(socks_tuples)]
    entry_tuples = draw(st.lists(st.one_of(st.sampled_from(socks_tuples) if socks_tuples
                                           else tuples, tuples), max_size=20))
    cookies = st.one_of(st.none(), st.integers(min_value=1, max_value=25))
    entries = [entry_for(t, draw(cookies)) for t in entry_tuples]
    return socks, entries


@given(worlds())
def test_no_entry_whose_tuple_a_live_socket_owns_is_ever_stale(
        world: tuple[list[LiveSocket], list[MapEntry]]) -> None:
    socks, entries = world
    index = SocketIndex.build(socks)
    owned = {s.tuple for s in socks if s.state in (1, 4, 5, 8, 9, 11)}
    in_handshake = {s.tuple for s in socks if s.state in (2, 3)}
    for f in audit_map(MAP, entries, index, NO_POLICY).findings:
        if f.entry.key.owner in owned:
            assert f.kind in (Kind.OK, Kind.SHADOWING)
        else:
            assert f.kind is Kind.STALE
        assert f.entry.key.owner not in in_handshake or f.entry.key.owner in owned


@given(worlds())
def test_shadowing_only_when_the_entry_points_elsewhere(
        world: tuple[list[LiveSocket], list[MapEntry]]) -> None:
    socks, entries = world
    for f in audit_map(MAP, entries, SocketIndex.build(socks), NO_POLICY).findings:
        if f.kind is Kind.SHADOWING:
            assert f.entry.cookie is not None and f.socket is not None
            assert all(s.cookie != f.entry.cookie for s in socks
                       if s.tuple == f.entry.key.owner and s.state in (1, 4, 5, 8, 9, 11))
        if f.kind is Kind.OK and f.entry.cookie is not None:
            assert f.socket is not None and f.socket.cookie == f.entry.cookie


@given(worlds())
def test_confirm_never_invents_findings(world: tuple[list[LiveSocket], list[MapEntry]]) -> None:
    socks, entries = world
    first = audit_map(MAP, entries, SocketIndex.build(socks), NO_POLICY).findings
    second = audit_map(MAP, entries[::2], SocketIndex.build(socks[1:]), NO_POLICY).findings
    out = confirm(first, second)
    assert len(out) <= len(first)
    assert all(f in first or f.confirmed for f in out)
    bad_second = {(f.entry.key_hex, f.kind) for f in second}
    assert all((f.entry.key_hex, f.kind) in bad_second for f in out if f.confirmed)


def test_entry_of_a_reset_socket_still_held_open_is_stale_and_says_so() -> None:
    from sockguard.core.model import TargetSocket

    raw = key_for_socket(CILIUM, SERVER)
    entry = MapEntry(raw.hex(), decode(CILIUM, raw), 5, TargetSocket(5, 4, 7, 1, SERVER))
    v = judge(entry, SocketIndex.build([]), NO_POLICY)
    assert v.kind is Kind.STALE
    assert v.details["entry_socket_state"] == "CLOSE"
    assert "reset" in v.reason


def test_ipv4_mapped_endpoints_print_as_ipv4() -> None:
    """A dual-stack socket's IPv4 connection prints as the kernel shows an IPv4 one."""
    from sockguard.core.rows import Interner

    mapped = IPv6Address("::ffff:127.0.0.1")
    assert str(Endpoint(mapped, 8080)) == "127.0.0.1:8080"
    assert str(Endpoint(IPv6Address("fd00::1"), 443)) == "[fd00::1]:443"
    assert Interner().endpoint_text(mapped.packed, 8080) == "127.0.0.1:8080"


def test_a_map_is_proven_healthy_only_when_every_entry_is_owned() -> None:
    """What lets the collision check stop listening: nothing a new connection could hit."""
    from sockguard.core.tcp_states import TCP_SYN_RECV

    owned = SocketIndex.build([sock(SERVER, 1), sock(CLIENT, 2)])
    assert audit_map(MAP, [entry_for(SERVER), entry_for(CLIENT)], owned,
                     NO_POLICY).proven_healthy
    assert audit_map(MAP, [], owned, NO_POLICY).proven_healthy  # an empty map
    stale = audit_map(MAP, [entry_for(SERVER)], SocketIndex.build([sock(CLIENT, 2)]),
                      NO_POLICY)
    assert stale.count(Kind.STALE) == 1 and not stale.proven_healthy
    garbled = audit_map(MAP, [entry_for(SERVER)], owned, NO_POLICY, undecodable=["00: bad"])
    assert not garbled.proven_healthy
    handshake = audit_map(MAP, [entry_for(SERVER)],
                          SocketIndex.build([sock(SERVER, 1, state=TCP_SYN_RECV)]), NO_POLICY)
    assert handshake.count(Kind.OK) == 0 and not handshake.proven_healthy
