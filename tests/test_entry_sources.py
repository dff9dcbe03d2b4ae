"""Which socket each entry points to, from every source the kernel allows.

The sockmap iterator and the tc lookup (a SCHED_CLS program run with
BPF_PROG_TEST_RUN) must agree on every entry, and the audit must reach the
same verdicts from each, including from the tuple-only variant of the tc
lookup that kernels refusing ``bpf_skc_to_tcp_sock`` in tc programs give.
Each source is asked of the capability probe: one the machine refuses is
skipped with the probe's reason; where both load, both are exercised.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable

import pytest

from sockguard.core.audit import AuditPolicy
from sockguard.core.errors import NotRootError
from sockguard.core.layout import CILIUM, kernel_form
from sockguard.core.model import Kind
from sockguard.core.rows import COOKIE_UNKNOWN
from sockguard.kernel import libbpf, sockhash_lookup, sockmap_iter
from sockguard.kernel.maps import open_map, select_maps
from sockguard.kernel.node_audit import EntrySource, entry_source, run_audit
from sockguard.kernel.remediation import reverify
from sockguard.kernel.sockets import OwnerProbe
from tests.conftest import entry_source_skip_reason
from tests.lab import Lab, cilium_key, close_rst, key_for, recv_exact

pytestmark = pytest.mark.kernel

SERVER_PORT = 8080
CLIENT_PORT = 40000
SO_COOKIE = 57
KEY = 44
CILIUM_FORM = kernel_form(CILIUM)
assert CILIUM_FORM is not None


def _need(name: str) -> None:
    reason = entry_source_skip_reason(name)
    if reason is not None:
        pytest.skip(reason)


def _tuple_program_loads() -> None:
    """Skip unless the tuple-only tc program loads here (it needs less than the other)."""
    _need("tc_lookup")
    fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_SOCKHASH, "sg_t_tuple", KEY, 4, 1)
    try:
        sockhash_lookup._load(fd, KEY, sockhash_lookup.TUPLE_PROGRAM).close()
    except libbpf.BpfError as exc:
        pytest.skip(f"the tuple-only tc lookup does not load here: {exc}")
    finally:
        os.close(fd)


def cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


#: A tc lookup forced to its tuple-only program, as kernels without the BTF cast give it.
TUPLE_ONLY = EntrySource("tc_lookup", "tuple", False, "forced by the test")


def test_probe_answers_with_a_reason() -> None:
    ok, why = sockhash_lookup.lookup_available()
    assert why, "the probe must say why, either way"
    if ok:
        assert sockhash_lookup.lookup_exactness() in ("cookie", "tuple")
        assert why.startswith("tc lookup loads")
    else:
        assert sockhash_lookup.lookup_exactness() is None


def test_auto_prefers_the_iterator_then_the_tc_lookup() -> None:
    src = entry_source("auto")
    if sockmap_iter.iterator_available()[0]:
        assert (src.name, src.exactness) == ("iterator", "cookie")
    elif sockhash_lookup.lookup_available()[0]:
        assert src.name == "tc_lookup"
        assert src.exactness == sockhash_lookup.lookup_exactness()
    else:
        assert (src.name, src.exactness) == ("syscall", "none")
        assert "no entry source can run here" in src.reason
    assert entry_source("syscall").exactness == "none"


MakeMap = Callable[..., int]
TcpPair = Callable[..., tuple[socket.socket, socket.socket]]
SOCKHASH = libbpf.BPF_MAP_TYPE_SOCKHASH


@pytest.mark.usefixtures("bpf_kernel")
def test_iterator_probe_agrees_with_a_real_read(make_map: MakeMap) -> None:
    """Whichever way the probe answers, a real walk of a map behaves that way."""
    ok, why = sockmap_iter.iterator_available()
    fd = make_map(SOCKHASH, 44, 4)
    if ok:
        assert why.startswith("iter/sockmap loads"), why
        assert sockmap_iter.read_records(fd, 44) == {}
    else:
        assert "sockmap iterator" in why, why
        with pytest.raises(OSError if "rejects" in why else NotRootError):
            sockmap_iter.read_records(fd, 44)


def test_tc_lookup_agrees_with_the_iterator(make_map: MakeMap, tcp_pair: TcpPair) -> None:
    _need("tc_lookup")
    _need("iterator")
    fd = make_map(SOCKHASH, KEY, 4, 256)
    socks = [s for _ in range(8) for s in tcp_pair()]
    keys = []
    for s in socks:
        cookie(s)  # generated now: the tc lookup reads the cookie field
        k = _key(s)
        libbpf.map_update(fd, k, struct.pack("=i", s.fileno()))
        keys.append(k)
    absent = bytes(KEY)
    by_tc = sockhash_lookup.read_records(fd, KEY, [*keys, absent])
    by_iter = sockmap_iter.read_records(fd, KEY)
    assert absent not in by_tc
    assert by_tc == by_iter
    assert {r[1] for r in by_tc.values()} == {cookie(s) for s in socks}


def test_batched_runs_answer_each_key_as_a_run_of_its_own(make_map: MakeMap,
                                                         tcp_pair: TcpPair) -> None:
    """More keys than one run holds, absent ones among them, in judge mode and not:
    each record equals what a one-key run says, healthy entries are counted."""
    _need("tc_lookup")
    fd = make_map(SOCKHASH, KEY, 4, 256)
    socks = [s for _ in range(sockhash_lookup.BATCH) for s in tcp_pair()]
    keys = []
    for s in socks:
        cookie(s)
        libbpf.map_update(fd, _key(s), struct.pack("=i", s.fileno()))
        keys.append(_key(s))
    dummy = socks[0]  # one entry whose socket has another tuple: not healthy
    stray = cilium_key("127.0.0.9", 1, "127.0.0.9", 2)
    libbpf.map_update(fd, stray, struct.pack("=i", dummy.fileno()))
    asked = [k for i, k in enumerate(keys) for k in (k, bytes([i]) * KEY)] + [stray]

    batched = sockhash_lookup.read_records(fd, KEY, asked)
    program = sockhash_lookup._probe()[0]
    assert program is not None
    obj = sockhash_lookup._load(fd, KEY, program)
    try:
        reader = sockhash_lookup.Reader(obj, program, KEY)
        one_by_one = {k: r for k in asked if (r := reader.lookup(k)) is not None}
        with pytest.raises(libbpf.BpfError, match="rebuild"):
            reader.run(asked[: sockhash_lookup.BATCH + 1])  # more than the program reads
    finally:
        obj.close()
    assert batched == one_by_one
    assert set(batched) == {*keys, stray}

    records, healthy = sockhash_lookup.read_judged(fd, KEY, asked, CILIUM_FORM)
    if program == sockhash_lookup.BTF_PROGRAM:
        assert set(records) == {stray}
        assert healthy == {os.stat("/proc/self/ns/net").st_ino: len(keys)}
    else:  # tuple-only records are never judged healthy in the kernel
        assert set(records) == {*keys, stray} and healthy == {}


def test_a_session_loads_each_lookup_program_once(make_map: MakeMap, tcp_pair: TcpPair,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Both looks of an audit reuse the loaded program; it is unloaded when the session ends."""
    _need("tc_lookup")
    fd = make_map(SOCKHASH, KEY, 4, 16)
    a, b = tcp_pair()
    for s in (a, b):
        cookie(s)
        libbpf.map_update(fd, _key(s), struct.pack("=i", s.fileno()))
    loads: list[libbpf.BpfObject] = []
    real = sockhash_lookup._load_or_refuse

    def counted(*args: object, **kwargs: object) -> libbpf.BpfObject:
        obj = real(*args, **kwargs)  # type: ignore[arg-type]
        loads.append(obj)
        return obj

    monkeypatch.setattr(sockhash_lookup, "_load_or_refuse", counted)
    keys = [_key(a), _key(b)]
    with sockhash_lookup.session():
        first = sockhash_lookup.read_judged(fd, KEY, keys, CILIUM_FORM)
        again = sockhash_lookup.read_judged(fd, KEY, keys, CILIUM_FORM)
        records = sockhash_lookup.read_records(fd, KEY, keys)
        assert len(loads) == 2  # one judging, one not
        prog_fd = loads[0].program(sockhash_lookup._probe()[0] or "").fd
        assert libbpf.prog_info(prog_fd).id > 0  # still loaded inside the session
    assert first == again
    assert set(records) == set(keys)
    with pytest.raises(libbpf.BpfError):
        loads[0].program(sockhash_lookup._probe()[0] or "")  # closed at the end
    sockhash_lookup.read_records(fd, KEY, keys)
    assert len(loads) == 3  # outside a session every read loads its own


def test_tuple_only_records_carry_tuple_and_state(make_map: MakeMap, tcp_pair: TcpPair) -> None:
    _tuple_program_loads()
    fd = make_map(SOCKHASH, KEY, 4, 16)
    a, b = tcp_pair()
    for s in (a, b):
        libbpf.map_update(fd, _key(s), struct.pack("=i", s.fileno()))
    recs = sockhash_lookup.read_records(fd, KEY, [_key(a), _key(b)],
                                        sockhash_lookup.TUPLE_PROGRAM)
    for s in (a, b):
        rec = recs[_key(s)]
        local, remote = s.getsockname(), s.getpeername()
        assert rec[1] == COOKIE_UNKNOWN
        assert rec[3:5] == (socket.AF_INET, 1)  # family, ESTABLISHED
        assert (socket.inet_ntoa(rec[5]), rec[7]) == local
        assert (socket.inet_ntoa(rec[6]), rec[8]) == remote


def _key(sock: socket.socket) -> bytes:
    local, remote = sock.getsockname(), sock.getpeername()
    return cilium_key(local[0], local[1], remote[0], remote[1])


def _collision_hang(lab: Lab) -> tuple[socket.socket, socket.socket, socket.socket, bytes]:
    """The incident on the lab: a dummy socket under the key of a future server side."""
    server_pod, client_pod = lab.pods
    s_ip, c_ip = server_pod.addr(), client_pod.addr()
    listener = lab.listen(server_pod, port=SERVER_PORT)
    dummy, _ = lab.dummy_pair()
    future = cilium_key(s_ip, SERVER_PORT, c_ip, CLIENT_PORT)
    lab.inject(future, dummy)
    cli = lab.connect(client_pod, s_ip, SERVER_PORT, src_port=CLIENT_PORT)
    srv = lab.accept(listener)
    cli.sendall(b"GET /healthz")
    assert recv_exact(dummy, 12) == b"GET /healthz"  # redirected to the wrong socket
    return cli, srv, dummy, future


@pytest.mark.parametrize("exactness", ["cookie", "tuple"])
def test_collision_hang_is_shadowing_from_the_tc_lookup(lab: Lab, exactness: str) -> None:
    if exactness == "tuple":
        _tuple_program_loads()
        source = TUPLE_ONLY
    else:
        _need("tc_lookup")
        if sockhash_lookup.lookup_exactness() != "cookie":
            pytest.skip("this kernel's tc lookup gives tuples only")
        source = EntrySource("tc_lookup", "cookie", True, "forced by the test")
    cli, srv, dummy, future = _collision_hang(lab)
    live = {key_for(cli)}
    maps, _ = select_maps([str(lab.pin_path)])

    audit = run_audit(maps, CILIUM, AuditPolicy(), confirm_delay=0.05,
                      entry_source_name=source, include_ok=True)

    assert audit.sources == {maps[0].id: "tc_lookup"}
    assert audit.exactness == {maps[0].id: exactness}
    [result] = audit.results
    by_key = {bytes.fromhex(f.entry.key_hex): f for f in result.findings}
    shadow = by_key[future]
    assert shadow.kind is Kind.SHADOWING and shadow.confirmed
    assert shadow.socket is not None and shadow.socket.cookie == cookie(srv)
    if exactness == "tuple":
        assert shadow.entry.cookie is None
        assert shadow.details["verified_by_tuple"] is True
        assert shadow.details["key_mismatch"] is True
    else:
        assert shadow.entry.cookie == cookie(dummy)
    for k in live:
        f = by_key[k]
        assert f.kind is Kind.OK, f.reason
        if exactness == "tuple":
            assert f.details["verified_by_tuple"] is True
    assert {f.kind for f in result.findings} == {Kind.OK, Kind.SHADOWING}


@pytest.mark.parametrize("exactness", ["cookie", "tuple"])
def test_shadowing_delete_refused_once_the_key_is_the_owners_again(
    lab: Lab, exactness: str,
) -> None:
    """The re-check before a delete reads the entry's socket now, not the audit's cookie."""
    _need("tc_lookup")
    if exactness == "tuple":
        _tuple_program_loads()
        source = TUPLE_ONLY
    else:
        if sockhash_lookup.lookup_exactness() != "cookie":
            pytest.skip("this kernel's tc lookup gives tuples only")
        source = EntrySource("tc_lookup", "cookie", True, "forced by the test")
    _cli, srv, _dummy, future = _collision_hang(lab)
    maps, _ = select_maps([str(lab.pin_path)])
    audit = run_audit(maps, CILIUM, AuditPolicy(), confirm_delay=0.05, entry_source_name=source)
    [shadow] = [f for f in audit.results[0].findings if f.kind is Kind.SHADOWING]

    with open_map(maps[0]) as handle, OwnerProbe() as probe:
        ok, why = reverify(handle, shadow, probe)
        assert ok, why  # still pointing at the dummy: deletable
        # A reconnect's insert on the same tuple: the key now holds the owner itself.
        assert handle.delete(future)
        handle.insert_socket(future, srv.fileno())
        ok, why = reverify(handle, shadow, probe)
        assert not ok and "owner" in why, why
    assert future in lab.keys()


@pytest.mark.parametrize("source", ["iterator", "tc_lookup"])
def test_the_kernel_judges_healthy_entries_and_reports_only_the_rest(
        make_map: MakeMap, tcp_pair: TcpPair, source: str) -> None:
    """A healthy entry (its own socket alive, connected, with the key's tuple) is only
    counted; a record comes up for every other entry, on both entry sources."""
    _need(source)
    fd = make_map(SOCKHASH, KEY, 4, 256)
    socks = [s for _ in range(10) for s in tcp_pair()]
    for s in socks:
        libbpf.map_update(fd, key_for(s), struct.pack("=i", s.fileno()))
    c6 = None
    with contextlib.suppress(OSError):
        a6, b6 = tcp_pair(socket.AF_INET6)
        for s in (a6, b6):
            libbpf.map_update(fd, key_for(s), struct.pack("=i", s.fileno()))
        c6 = a6
    dummy, other = tcp_pair()
    wrong = cilium_key("10.9.9.9", 80, "10.9.9.8", 4242)  # a key its socket does not have
    libbpf.map_update(fd, wrong, struct.pack("=i", dummy.fileno()))
    closed, peer = tcp_pair()
    closed_key = key_for(closed)
    libbpf.map_update(fd, closed_key, struct.pack("=i", closed.fileno()))
    close_rst(peer)  # the entry's socket is reset: CLOSE, still in the map
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        st = struct.unpack("B", closed.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
        if st == 7:
            break
        time.sleep(0.01)
    keys = [key_for(s) for s in socks] + [wrong, closed_key]
    healthy_keys = len(socks) + (2 if c6 is not None else 0)
    if c6 is not None:
        keys += [key_for(s) for s in (a6, b6)]
    if source == "iterator":
        records, healthy = sockmap_iter.read_judged(fd, KEY, CILIUM_FORM)
    else:
        # Counted in the kernel's own map, drained by each read: within one session (the
        # program stays loaded) a second read counts the same, not twice as many.
        with sockhash_lookup.session():
            records, healthy = sockhash_lookup.read_judged(fd, KEY, keys, CILIUM_FORM)
            again = sockhash_lookup.read_judged(fd, KEY, keys, CILIUM_FORM)
        assert again == (records, healthy)
    assert sum(healthy.values()) == healthy_keys
    assert set(healthy) == {os.stat("/proc/self/ns/net").st_ino}  # the sockets' netns
    assert set(records) == {wrong, closed_key}
    assert records[wrong][1] in (0, cookie(dummy))
    assert records[closed_key][4] == 7  # CLOSE
    assert other.fileno() >= 0


@pytest.mark.kernel
def test_a_long_session_keeps_the_lookup_loaded_and_lets_go_of_maps_no_longer_audited(
        lab: Lab) -> None:
    """The daemon's audit thread holds one session for its life: the tc lookup program of
    a map is loaded once, not at every audit, and dropped (releasing the map it holds)
    as soon as an audit no longer names that map."""
    _need("tc_lookup")
    cli, srv = lab.pair(*reversed(lab.pods), 8080)
    info = select_maps([str(lab.pin_path)])[0][0]
    with sockhash_lookup.session():
        run_audit([info], CILIUM, AuditPolicy(), entry_source_name="tc_lookup")
        loaded = dict(sockhash_lookup._loaded.objects)
        assert loaded and {ident[0] for ident in loaded} == {info.id}
        run_audit([info], CILIUM, AuditPolicy(), entry_source_name="tc_lookup")
        assert sockhash_lookup._loaded.objects == loaded  # the same readers: no reload
        run_audit([], CILIUM, AuditPolicy(), entry_source_name="tc_lookup")
        assert sockhash_lookup._loaded.objects == {}
    cli.close()
    srv.close()
