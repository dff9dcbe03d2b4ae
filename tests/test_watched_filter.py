"""The userspace half of the tracer's kernel-side filter, without root.

``WatchedBits`` must keep a bit set exactly while some watched key hashes
to it (a clear bit makes the kernel skip the socket), ``parked_event``
must turn a parked record back into the event of the socket whose key it
is parked under, and refuse a record two CPUs wrote at once, and
``own_walk_period`` must keep the tracer's own walks of the maps within
their budget and leave them to the audit's walks where those come as often.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockguard.core.layout import CILIUM, encode
from sockguard.trace.events import EV_RECV, EV_STATE, EVENT
from sockguard.trace.watched import (
    OFFER_GRACE,
    PARKED,
    PARKED_SIZE,
    PENDING_BITS,
    WATCHED_BITS,
    WatchedBits,
    key_hash,
    own_walk_period,
    parked_event,
    pending_slot,
    watched_bit,
)

SRC_TP_BTF = 3


def _v4_key(remote: str, rport: int, local: str, lport: int) -> bytes:
    return encode(CILIUM, 4, IPv4Address(remote), rport, IPv4Address(local), lport)


KEYS = [_v4_key(f"10.0.{i // 250}.{i % 250 + 1}", 30000 + i, "10.1.0.1", 8080)
        for i in range(64)]


def _sharing_pair() -> tuple[bytes, bytes]:
    """Two different keys with the same bit (brute force over the remote port)."""
    seen: dict[int, bytes] = {}
    for port in range(1, 65536):
        for third in range(0, 256):
            key = _v4_key(f"10.9.{third}.1", port, "10.1.0.1", 8080)
            bit = watched_bit(key)
            if bit in seen:
                return seen[bit], key
            seen[bit] = key
    raise AssertionError("no two keys share a bit")


def test_sizes_are_the_c_layout() -> None:
    assert PARKED_SIZE == 112  # struct sg_parked, bpf/sockguard_trace.h
    assert len(WatchedBits().bitmap) == (1 << WATCHED_BITS) // 8  # struct sg_watched_bits


def test_slot_and_bit_are_the_top_bits_of_one_hash() -> None:
    for key in KEYS:
        h = key_hash(key)
        assert 0 <= h < 2**32
        assert pending_slot(key) == h >> (32 - PENDING_BITS)
        assert watched_bit(key) == h >> (32 - WATCHED_BITS)
    assert len({watched_bit(k) for k in KEYS}) > 60  # spread, not a constant


def test_a_shared_bit_stays_set_until_its_last_key_goes() -> None:
    a, b = _sharing_pair()
    bits = WatchedBits()
    bits.add(a)
    bits.add(b)
    bits.discard(a)
    assert b in bits  # clearing it would hide b's socket from the kernel
    bits.discard(b)
    assert b not in bits and a not in bits
    assert not any(bits.bitmap)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, len(KEYS) - 1)), max_size=200))
def test_bits_match_the_watched_keys_after_any_changes(ops: list[tuple[bool, int]]) -> None:
    bits, present = WatchedBits(), set()
    for add, i in ops:
        key = KEYS[i]
        if add and key not in present:  # WatchedKeys adds a key once, removes it once
            bits.add(key)
            present.add(key)
        elif not add and key in present:
            bits.discard(key)
            present.discard(key)
    want = bytearray(len(bits.bitmap))
    for key in present:
        bit = watched_bit(key)
        want[bit >> 3] |= 1 << (bit & 7)
    assert bits.bitmap == want
    assert all(key in bits for key in present)


def _parked(key: bytes, *, cookie: int = 0xABCDEF0123, family: int = socket.AF_INET,
            etype: int = EV_STATE, check: int | None = None) -> bytes:
    chk = (cookie & 0xFFFFFFFF) ^ key_hash(key) if check is None else check
    return PARKED.pack(key, etype, 1, 7, SRC_TP_BTF, 123456789, cookie, 0xFFFF81000800,
                       4026531840, 4242, family, chk, -11, b"curl\0", 3)


def test_a_parked_close_of_an_ipv4_socket_reads_back_from_its_key() -> None:
    key = _v4_key("10.0.0.1", 8080, "10.0.0.2", 40000)  # the socket 10.0.0.2:40000 -> :8080
    ev = parked_event(_parked(key))
    assert ev is not None and len(ev) == EVENT.size
    (ts, cookie, netns, etype, pid, _tid, ret, comm, family, sport, dport, old, new,
     saddr, daddr, aux, *_rest) = EVENT.unpack(ev)
    assert (ts, cookie, netns, etype, pid, ret) == (123456789, 0xABCDEF0123, 4026531840,
                                                    EV_STATE, 4242, -11)
    assert comm.rstrip(b"\0") == b"curl" and (old, new) == (1, 7) and aux == 0xFFFF81000800
    assert family == socket.AF_INET and (sport, dport) == (40000, 8080)
    assert IPv4Address(saddr[:4]) == IPv4Address("10.0.0.2")
    assert IPv4Address(daddr[:4]) == IPv4Address("10.0.0.1")


def test_a_v4_mapped_socket_gets_v4_mapped_addresses_back() -> None:
    key = _v4_key("10.0.0.1", 8080, "10.0.0.2", 40000)
    ev = parked_event(_parked(key, family=socket.AF_INET6, etype=EV_RECV))
    assert ev is not None
    fields = EVENT.unpack(ev)
    family, saddr, daddr = fields[8], fields[13], fields[14]
    assert family == socket.AF_INET6
    assert IPv6Address(saddr) == IPv6Address("::ffff:10.0.0.2")
    assert IPv6Address(daddr) == IPv6Address("::ffff:10.0.0.1")


def test_an_ipv6_socket() -> None:
    key = encode(CILIUM, 6, IPv6Address("fd00::1"), 443, IPv6Address("fd00::2"), 50000)
    ev = parked_event(_parked(key, family=socket.AF_INET6))
    assert ev is not None
    fields = EVENT.unpack(ev)
    assert (fields[9], fields[10]) == (50000, 443)
    assert IPv6Address(fields[13]) == IPv6Address("fd00::2")
    assert IPv6Address(fields[14]) == IPv6Address("fd00::1")


def test_a_slot_written_by_two_cpus_at_once_is_refused() -> None:
    a = _v4_key("10.0.0.1", 8080, "10.0.0.2", 40000)
    b = _v4_key("10.0.0.3", 8080, "10.0.0.4", 40001)
    torn = _parked(a, check=(0xABCDEF0123 & 0xFFFFFFFF) ^ key_hash(b))  # b's check, a's key
    assert parked_event(torn) is None


# -- how often the tracer walks the maps itself --------------------------------------------


def test_a_cheap_walk_runs_every_interval_and_an_expensive_one_within_its_budget() -> None:
    assert own_walk_period(1.0, 0.01, None, None) == 1.0  # nothing measured yet
    assert own_walk_period(1.0, 0.01, 0.003, None) == 1.0  # 2,000 keys: every second
    assert own_walk_period(1.0, 0.01, 0.1, None) == pytest.approx(10.0)  # 65,535 keys


def test_a_walk_the_audit_makes_as_often_is_not_made_again() -> None:
    # 65,535 keys (0.1 s a walk) and an audit every 10 s: the walks would be as frequent
    assert own_walk_period(1.0, 0.01, 0.1, 10.0) == pytest.approx(OFFER_GRACE * 10.0)
    # a small map still walked every second between audits ten seconds apart
    assert own_walk_period(1.0, 0.01, 0.003, 10.0) == 1.0
    # audits every 0.3 s (a tight interval): no own walk while they come
    assert own_walk_period(1.0, 0.01, 0.003, 0.3) == 1.0
    assert own_walk_period(1.0, 0.01, 0.1, 0.3) == pytest.approx(10.0)


@given(interval=st.floats(0.1, 10.0), budget=st.floats(0.001, 0.5),
       walk=st.none() | st.floats(0.0, 5.0), gap=st.none() | st.floats(0.01, 3600.0))
def test_the_period_keeps_the_budget_and_own_walks_only_between_rarer_offers(
        interval: float, budget: float, walk: float | None, gap: float | None) -> None:
    period = own_walk_period(interval, budget, walk, gap)
    assert period >= interval
    if walk is not None:
        assert walk <= period * budget * (1 + 1e-9), "an own walk stays within its budget"
    if gap is not None:
        # either own walks come at least twice per offer gap, or they wait for the
        # offers and resume only when one is overdue
        assert 2 * period <= gap or period >= OFFER_GRACE * gap
    if gap is None:  # no audit offers its walk: the budget alone decides
        assert period == pytest.approx(max(interval, (walk or 0.0) / budget))
