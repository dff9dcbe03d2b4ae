"""The rules only the iterators make possible, without root: dead entry sockets,
keys that do not describe their socket, and the receive-path check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from ipaddress import ip_address
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockguard.core.audit import AuditPolicy, SocketIndex, audit_records
from sockguard.core.errors import SockguardError
from sockguard.core.layout import CILIUM, decode, key_for_socket
from sockguard.core.model import (
    RECV_BPF,
    RECV_OTHER,
    RECV_TCP,
    Endpoint,
    Kind,
    LiveSocket,
    MapEntry,
    MapInfo,
    Netns,
    TargetSocket,
    Tuple4,
)
from sockguard.core.rows import Record, SocketTable
from sockguard.core.tcp_states import TCP_CLOSE, TCP_ESTABLISHED
from sockguard.kernel.remediation import reverify
from tests.audit_oracle import audit_map, judge

MAP = MapInfo(7, "cilium_sock_ops", "sockhash", 44, 4, 65535, "/sys/fs/bpf/x")
POD = Netns(4026532000, "pod-a")
NO_POLICY = AuditPolicy()


def tup(local: str, lport: int, remote: str, rport: int) -> Tuple4:
    lip, rip = ip_address(local), ip_address(remote)
    return Tuple4(lip.version, Endpoint(lip, lport), Endpoint(rip, rport))


SERVER = tup("10.0.1.2", 8080, "10.0.2.2", 40000)
DUMMY = tup("127.0.0.1", 5555, "127.0.0.1", 6666)


def live(t: Tuple4, cookie: int, recv: str | None = None,
         state: int = TCP_ESTABLISHED) -> LiveSocket:
    return LiveSocket(t, state, cookie, cookie + 5000, POD, 0, recv)


def entry(key_tuple: Tuple4, cookie: int | None, target_tuple: Tuple4 | None = None, *,
          state: int = TCP_ESTABLISHED, dead: bool = False,
          recv: str | None = RECV_BPF) -> MapEntry:
    raw = key_for_socket(CILIUM, key_tuple)
    target = None
    if cookie is not None:
        target = TargetSocket(cookie, 4, state, POD.ino, target_tuple or key_tuple, dead, recv)
    return MapEntry(raw.hex(), decode(CILIUM, raw), cookie, target)


# --- examples -----------------------------------------------------------------------


def test_an_accelerated_owner_is_ok_and_says_its_path() -> None:
    index = SocketIndex.build([live(SERVER, 1, RECV_BPF)])
    v = judge(entry(SERVER, 1), index, NO_POLICY)
    assert v.kind is Kind.OK
    assert v.details == {"verified_by_cookie": True, "recv_path": RECV_BPF}


def test_entry_pointing_to_its_owner_after_close_is_stale() -> None:
    """The incident's leak before reuse: the socket is closed (SOCK_DEAD) and still in the map."""
    index = SocketIndex.build([live(SERVER, 1, RECV_BPF, state=4)])  # FIN_WAIT1, orphaned
    v = judge(entry(SERVER, 1, state=4, dead=True), index, NO_POLICY)
    assert v.kind is Kind.STALE and v.socket is None
    assert v.details["entry_socket_dead"] is True
    assert "outlived close()" in v.reason


def test_the_incident_before_any_payload_is_shadowing_with_the_plain_receive_path() -> None:
    """Entry under the server's key points to a dummy; the server reads with tcp_recvmsg."""
    index = SocketIndex.build([live(SERVER, 1, RECV_TCP), live(DUMMY, 9, RECV_BPF)])
    v = judge(entry(SERVER, 9, DUMMY), index, NO_POLICY)
    assert v.kind is Kind.SHADOWING
    assert v.socket is not None and v.socket.cookie == 1
    assert v.details["owner_recv_path"] == RECV_TCP
    assert v.details["entry_recv_path"] == RECV_BPF
    assert v.details["key_mismatch"] is True
    assert "tcp_recvmsg" in v.reason


def test_without_the_entry_cookie_the_receive_path_still_flags_the_owner() -> None:
    index = SocketIndex.build([live(SERVER, 1, RECV_TCP)])
    v = judge(entry(SERVER, None), index, NO_POLICY)
    assert v.kind is Kind.RECVPATH
    assert v.socket is not None and v.socket.cookie == 1
    assert v.details == {"verified_by_cookie": False, "owner_recv_path": RECV_TCP}


def test_without_the_entry_cookie_an_accelerated_owner_is_ok() -> None:
    for recv in (RECV_BPF, RECV_OTHER, None):
        index = SocketIndex.build([live(SERVER, 1, recv)])
        assert judge(entry(SERVER, None), index, NO_POLICY).kind is Kind.OK


def test_entry_on_its_owner_whose_path_is_plain_is_recvpath() -> None:
    """The sockmap iterator itself reads tcp_recvmsg on the entry's own socket."""
    index = SocketIndex.build([live(SERVER, 1)])  # sock_diag: no path known
    v = judge(entry(SERVER, 1, recv=RECV_TCP), index, NO_POLICY)
    assert v.kind is Kind.RECVPATH and v.details["verified_by_cookie"] is True


def test_stale_entry_whose_key_is_not_its_sockets() -> None:
    v = judge(entry(SERVER, 9, DUMMY), SocketIndex.build([live(DUMMY, 9)]), NO_POLICY)
    assert v.kind is Kind.STALE
    assert v.details["key_mismatch"] is True and v.details["entry_socket"] == str(DUMMY)
    assert "does not describe" in v.reason


def test_stale_entry_of_a_reset_socket_reports_its_state() -> None:
    v = judge(entry(SERVER, 1, state=TCP_CLOSE), SocketIndex.build([]), NO_POLICY)
    assert v.kind is Kind.STALE and v.details["entry_socket_state"] == "CLOSE"
    assert "key_mismatch" not in v.details


def test_proxy_entry_whose_client_is_dead_is_stale_not_proxy() -> None:
    gw = ip_address("10.0.2.1")
    client = tup("10.0.2.2", 40000, "10.0.1.2", 8080)
    proxy_key = Tuple4(4, client.local, Endpoint(gw, 15001))
    policy = AuditPolicy(frozenset({gw}), host_listen_ports=frozenset({15001}))
    index = SocketIndex.build([live(client, 3, RECV_BPF, state=4)])
    assert judge(entry(proxy_key, 3, client), index, policy).kind is Kind.PROXY
    v = judge(entry(proxy_key, 3, client, state=4, dead=True), index, policy)
    assert v.kind is Kind.STALE
    assert v.details == {"proxy": True, "entry_socket_dead": True}


# --- remediation of a dead entry ------------------------------------------------------


class _Handle:
    """A map whose entry's socket cannot be read (no exact source), unless ``record`` is given."""

    def __init__(self, info: MapInfo, record: Record | None = None,
                 readable: bool = False) -> None:
        self.info = info
        self.record = record
        self.readable = readable

    def contains(self, raw: bytes) -> bool:
        return True

    def lookup_cookie(self, raw: bytes) -> int | None:
        return None

    def entry_socket(self, raw: bytes) -> Record | None:
        if not self.readable:
            raise SockguardError("no entry source here")
        return self.record


class _Probe:
    def __init__(self, owner: LiveSocket | None, unreadable: tuple[str, ...] = ()) -> None:
        self._owner = owner
        self.unreadable = list(unreadable)

    @property
    def complete(self) -> bool:
        return not self.unreadable

    def owner(self, t: Tuple4) -> LiveSocket | None:
        return self._owner


def _reverify(finding_kind: Kind, details: dict[str, object], owner: LiveSocket | None,
              cookie: int = 1, handle: _Handle | None = None,
              probe: _Probe | None = None) -> bool:
    from sockguard.core.model import Finding

    f = Finding(finding_kind, MAP, entry(SERVER, cookie, dead=True), "why", None, None, True,
                details)
    ok, _why = reverify(cast(Any, handle or _Handle(MAP)), f, cast(Any, probe or _Probe(owner)))
    return ok


def _record(t: Tuple4, state: int = 1, dead: bool = False) -> Record:
    """An entry-socket record (iterator/tc lookup shape) for the socket with tuple ``t``."""
    return (b"k", 7, 4026531840, 2, state, t.local.ip.packed, t.remote.ip.packed,
            t.local.port, t.remote.port, dead, 0)


def test_stale_needs_positive_evidence_when_a_namespace_could_not_be_asked() -> None:
    """Could not look is not absent: with an unreadable namespace and the entry's socket
    unknown, a stale entry is refused; the entry's own socket can still prove it."""
    blind = _Probe(None, unreadable=("/proc/42/ns/net: Too many open files",))
    assert _reverify(Kind.STALE, {}, None)  # every namespace asked: no owner anywhere
    assert not _reverify(Kind.STALE, {}, None, probe=blind)
    # The entry's socket read again: a live connection with the key's tuple (its
    # namespace unreadable or unreachable) -> refused even with every namespace asked.
    live_self = _Handle(MAP, _record(SERVER), readable=True)
    assert not _reverify(Kind.STALE, {}, None, handle=live_self)
    assert not _reverify(Kind.STALE, {}, None, handle=live_self, probe=blind)
    # ... closed, dead, or another tuple: proof without any namespace.
    for rec in (_record(SERVER, state=7), _record(SERVER, dead=True),
                _record(SERVER.reversed())):
        assert _reverify(Kind.STALE, {}, None, handle=_Handle(MAP, rec, readable=True),
                         probe=blind)
    # the key gone since the audit
    assert not _reverify(Kind.STALE, {}, None, handle=_Handle(MAP, None, readable=True))


def test_a_dead_entry_is_deletable_while_its_own_socket_finishes_closing() -> None:
    dead = {"entry_socket_dead": True}
    assert _reverify(Kind.STALE, dead, live(SERVER, 1, state=4))
    assert not _reverify(Kind.STALE, dead, live(SERVER, 2))  # a new owner: refused
    assert not _reverify(Kind.STALE, {}, live(SERVER, 1))
    assert _reverify(Kind.STALE, dead, None)


def test_clean_does_not_delete_recvpath_findings_unasked() -> None:
    """Refused (so ``clean`` exits 1), never deleted: ``_Handle`` cannot even delete.

    Opting in (``delete_unproven``) is tested in test_policy.py; a finding whose
    entry socket is not unknown stays refused even then.
    """
    from sockguard.core.model import Finding
    from sockguard.kernel.remediation import clean

    f = Finding(Kind.RECVPATH, MAP, entry(SERVER, None), "why", live(SERVER, 1), None, True, {})
    for opt_in in (False, True):
        [d] = clean(cast(Any, _Handle(MAP)), [f], cast(Any, _Probe(live(SERVER, 1))),
                    apply=True, delete_unproven=opt_in)
        assert d.outcome == "refused", d


# --- properties -------------------------------------------------------------------------

octet = st.integers(min_value=1, max_value=6)
ports = st.integers(min_value=1, max_value=6)
tuples = st.builds(lambda a, ap, b, bp: tup(f"10.0.0.{a}", ap, f"10.0.1.{b}", bp),
                   octet, ports, octet, ports)
paths = st.sampled_from([None, RECV_TCP, RECV_BPF, RECV_OTHER])
states = st.sampled_from([1, 1, 1, 2, 4, 6, 7, 8])


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[LiveSocket], list[MapEntry]]:
    ts = draw(st.lists(tuples, max_size=12, unique=True))
    socks = [live(t, i + 1, draw(paths), draw(states)) for i, t in enumerate(ts)]
    entries: list[MapEntry] = []
    for _ in range(draw(st.integers(0, 12))):
        key_t = draw(st.sampled_from(ts)) if ts and draw(st.booleans()) else draw(tuples)
        cookie = draw(st.one_of(st.none(), st.integers(1, len(ts) + 2)))
        target_t = draw(st.sampled_from([key_t, DUMMY]))
        entries.append(entry(key_t, cookie, target_t, state=draw(states), dead=draw(st.booleans()),
                             recv=draw(paths)))
    return socks, entries


def _blind(socks: Sequence[LiveSocket], entries: Sequence[MapEntry]
           ) -> tuple[list[LiveSocket], list[MapEntry]]:
    """The same world as sock_diag and a pre-iterator kernel see it: no paths, no SOCK_DEAD."""
    return ([replace(s, recv_path=None) for s in socks],
            [e if e.target is None else replace(e, target=replace(e.target, dead=False,
                                                                   recv_path=None))
             for e in entries])


@settings(max_examples=300)
@given(worlds())
def test_the_new_facts_only_refine_ok_verdicts(world: tuple[list[LiveSocket], list[MapEntry]]
                                                ) -> None:
    """Receive paths and SOCK_DEAD turn some ``ok`` into ``recvpath``/``stale`` and change
    nothing else: stale, shadowing, proxy and pending stay what the tuples say."""
    socks, entries = world
    seen = audit_map(MAP, entries, SocketIndex.build(socks), NO_POLICY).findings
    blind_socks, blind_entries = _blind(socks, entries)
    blind = audit_map(MAP, blind_entries, SocketIndex.build(blind_socks), NO_POLICY).findings
    assert [f.entry.key_hex for f in seen] == [f.entry.key_hex for f in blind]
    for f, b in zip(seen, blind, strict=True):
        if b.kind is Kind.OK:
            assert f.kind in (Kind.OK, Kind.RECVPATH, Kind.STALE)
        else:
            assert f.kind is b.kind
        if f.kind is Kind.RECVPATH:
            assert f.socket is not None
            path = (f.entry.target.recv_path if f.entry.target is not None
                    and f.entry.target.recv_path is not None else f.socket.recv_path)
            assert path == RECV_TCP
        if f.kind is Kind.STALE and b.kind is Kind.OK:
            assert f.entry.target is not None and f.entry.target.dead


@settings(max_examples=300)
@given(worlds())
def test_fast_path_equals_plain_path_with_paths_and_dead_sockets(
        world: tuple[list[LiveSocket], list[MapEntry]]) -> None:
    socks, entries = world
    table = SocketTable()
    for s in socks:
        table.rows.append(((s.tuple.local.ip.packed, s.tuple.local.port,
                            s.tuple.remote.ip.packed, s.tuple.remote.port),
                           s.state, s.cookie, s.inode, s.uid))
        if s.recv_path is not None:
            table.recv[s.cookie] = {RECV_TCP: 1, RECV_BPF: 2, RECV_OTHER: 3}[s.recv_path]
    table.close_span(POD)
    codes = {None: 0, RECV_TCP: 1, RECV_BPF: 2, RECV_OTHER: 3}
    records = []
    with_cookie = [e for e in entries if e.target is not None]
    for e in with_cookie:
        t = e.target
        assert t is not None and t.tuple is not None
        records.append((bytes.fromhex(e.key_hex), t.cookie, t.netns_ino, 2, t.state,
                        t.tuple.local.ip.packed, t.tuple.remote.ip.packed, t.tuple.local.port,
                        t.tuple.remote.port, t.dead, codes[t.recv_path]))
    fast = audit_records(MAP, CILIUM, records, SocketIndex.from_table(table), NO_POLICY)
    plain = audit_map(MAP, with_cookie, SocketIndex.build(socks), NO_POLICY)
    assert fast == plain
    for kind in Kind:
        assert fast.count(kind) == plain.count(kind)


# --- /proc/kallsyms ------------------------------------------------------------------------


def test_kallsyms_symbols_fail_soft_one_by_one() -> None:
    from sockguard.kernel.recvsyms import find_symbols

    data = (b"ffffffff82010b40 T tcp_recvmsg\n"
            b"ffffffff8209d120 t tcp_bpf_recvmsg\n"
            b"ffffffff8209d000 t tcp_bpf_recvmsg\n"       # ambiguous: two statics
            b"ffffffffc0001000 t tcp_bpf_recvmsg_parser\t[some_mod]\n"
            b"ffffffff8209c300 t tcp_bpf_recvmsg_parser2\n")
    found, problems = find_symbols(data, ("tcp_recvmsg", "tcp_bpf_recvmsg",
                                          "tcp_bpf_recvmsg_parser"))
    assert found == {"tcp_recvmsg": 0xFFFFFFFF82010B40}
    assert problems == ["tcp_bpf_recvmsg is ambiguous in /proc/kallsyms",
                        "tcp_bpf_recvmsg_parser not in /proc/kallsyms"]
    hidden, why = find_symbols(b"0000000000000000 T tcp_recvmsg\n", ("tcp_recvmsg",))
    assert hidden == {} and "kptr_restrict" in why[0]


# --- could not look is not absent ----------------------------------------------------


def _index(socks: Sequence[LiveSocket], complete: bool) -> SocketIndex:
    index = SocketIndex.build(socks)
    index.complete = complete
    return index


@pytest.mark.parametrize("complete", [True, False])
def test_an_entry_whose_own_socket_owns_its_tuple_is_ok_without_the_scan(complete: bool) -> None:
    """The scan missed the owner (its namespace unreachable or unreadable): the entry's
    own socket — alive, connected, the key's tuple — is the owner."""
    v = judge(entry(SERVER, 9), _index([], complete), NO_POLICY)
    assert v.kind is Kind.OK and v.details["owner_from_entry_socket"] is True
    assert v.socket is not None and v.socket.tuple == SERVER
    on_tcp = judge(entry(SERVER, 9, recv=RECV_TCP), _index([], complete), NO_POLICY)
    assert on_tcp.kind is Kind.RECVPATH


@pytest.mark.parametrize("complete", [True, False])
def test_the_entry_socket_proves_stale_whatever_the_scan(complete: bool) -> None:
    index = _index([], complete)
    assert judge(entry(SERVER, 9, dead=True), index, NO_POLICY).kind is Kind.STALE
    assert judge(entry(SERVER, 9, state=7), index, NO_POLICY).kind is Kind.STALE
    assert judge(entry(SERVER, 9, SERVER.reversed()), index, NO_POLICY).kind is Kind.STALE


def test_without_the_entry_socket_an_incomplete_scan_calls_nothing_stale() -> None:
    assert judge(entry(SERVER, None), _index([], True), NO_POLICY).kind is Kind.STALE
    blind = _index([], False)
    v = judge(entry(SERVER, None), blind, NO_POLICY)
    assert v.kind is None and v.details == {"unverified": True}
    result = audit_map(MAP, [entry(SERVER, None), entry(SERVER.reversed(), None)], blind,
                       NO_POLICY)
    assert result.findings == [] and result.unverified == 2 and result.pending == 0


@given(complete=st.booleans(), dead=st.booleans(), state=st.sampled_from([1, 4, 7, 8]),
       other=st.booleans(), known=st.booleans())
def test_no_owner_in_the_scan_is_stale_only_with_evidence(
        complete: bool, dead: bool, state: int, other: bool, known: bool) -> None:
    """Property: with no owner in the scan, an entry is called stale only when the
    scan was complete or its own socket is not a live connection with its tuple."""
    e = entry(SERVER, 9 if known else None, SERVER.reversed() if other else None,
              state=state, dead=dead)
    v = judge(e, _index([], complete), NO_POLICY)
    own_socket_is_owner = known and not dead and not other and state in (1, 4, 8)
    if v.kind is Kind.STALE:
        assert complete or (known and not own_socket_is_owner)
    if own_socket_is_owner:
        assert v.kind is Kind.OK
