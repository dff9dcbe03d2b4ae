"""The key codec, without root: the incident's bytes, round trips, bad input."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockguard.core.errors import LayoutMismatchError
from sockguard.core.layout import CILIUM, KeyDecodeError, decode, encode, key_for_socket
from sockguard.core.model import Endpoint, Tuple4

# The README's worked key example ("Cilium's key layout"), from the incident.
INCIDENT_KEY = bytes.fromhex(
    "0a0a8630" + "00" * 12 + "0a0a65f9" + "00" * 12 + "01000000" + "1f900000" + "db780000"
)


def test_incident_key_decodes_to_the_incident_tuple() -> None:
    key = decode(CILIUM, INCIDENT_KEY)
    assert key.family == 4
    assert key.sip == ip_address("10.10.134.48") and key.sport == 8080
    assert key.dip == ip_address("10.10.101.249") and key.dport == 56184
    # Written from the peer's point of view: the entry belongs to the socket
    # whose local side is dip:dport (the client at 10.10.101.249:56184).
    assert key.owner.local == Endpoint(ip_address("10.10.101.249"), 56184)
    assert key.owner.remote == Endpoint(ip_address("10.10.134.48"), 8080)
    assert key.as_dict() == {"family": 4, "sip": "10.10.134.48", "sport": 8080,
                             "dip": "10.10.101.249", "dport": 56184}


def test_incident_key_encodes_back_to_the_same_bytes() -> None:
    key = decode(CILIUM, INCIDENT_KEY)
    assert encode(CILIUM, 4, key.sip, key.sport, key.dip, key.dport) == INCIDENT_KEY
    assert key_for_socket(CILIUM, key.owner) == INCIDENT_KEY


def test_ipv6_key() -> None:
    sip, dip = IPv6Address("fd00::1"), IPv6Address("fd00::2:3")
    raw = encode(CILIUM, 6, sip, 443, dip, 50000)
    assert raw[32] == 2
    assert raw[36:40] == (443).to_bytes(2, "big") + b"\0\0"
    key = decode(CILIUM, raw)
    assert (key.family, key.sip, key.sport, key.dip, key.dport) == (6, sip, 443, dip, 50000)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (INCIDENT_KEY[:43], "43 bytes"),
        (INCIDENT_KEY + b"\0", "45 bytes"),
        (INCIDENT_KEY[:32] + b"\x07" + INCIDENT_KEY[33:], "unknown family code 7"),
        (INCIDENT_KEY[:4] + b"\x01" + INCIDENT_KEY[5:], "non-zero padding"),
        (INCIDENT_KEY[:38] + b"\x01" + INCIDENT_KEY[39:], "non-zero high bytes"),
    ],
)
def test_bad_keys_are_refused_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(KeyDecodeError, match=message):
        decode(CILIUM, raw)


def test_map_with_wrong_key_size_is_refused() -> None:
    with pytest.raises(LayoutMismatchError, match="4-byte keys; layout cilium needs 44"):
        CILIUM.check_map(4, "sock_map")
    CILIUM.check_map(44, "cilium_sock_ops")


ports = st.integers(min_value=0, max_value=65535)
v4 = st.builds(IPv4Address, st.integers(min_value=0, max_value=2**32 - 1))
v6 = st.builds(IPv6Address, st.integers(min_value=0, max_value=2**128 - 1))


@given(st.one_of(st.tuples(st.just(4), v4, v4), st.tuples(st.just(6), v6, v6)), ports, ports)
def test_encode_decode_round_trip(fam_ips: tuple[int, object, object], sport: int,
                                  dport: int) -> None:
    family, sip, dip = fam_ips
    raw = encode(CILIUM, family, sip, sport, dip, dport)  # type: ignore[arg-type]
    assert len(raw) == 44
    key = decode(CILIUM, raw)
    assert (key.family, key.sip, key.sport, key.dip, key.dport) == (family, sip, sport, dip, dport)
    assert encode(CILIUM, key.family, key.sip, key.sport, key.dip, key.dport) == raw


@given(v4, ports, v4, ports)
def test_key_for_socket_is_the_peer_perspective(lip: IPv4Address, lport: int,
                                                rip: IPv4Address, rport: int) -> None:
    tup = Tuple4(4, Endpoint(lip, lport), Endpoint(rip, rport))
    key = decode(CILIUM, key_for_socket(CILIUM, tup))
    assert (key.sip, key.sport, key.dip, key.dport) == (rip, rport, lip, lport)
    assert key.owner == tup


@given(st.binary(min_size=44, max_size=44))
def test_decode_never_crashes_on_arbitrary_bytes(raw: bytes) -> None:
    try:
        key = decode(CILIUM, raw)
    except KeyDecodeError:
        return
    assert encode(CILIUM, key.family, key.sip, key.sport, key.dip, key.dport) == raw
