"""The maps adapter on real sockhash/sockmap maps: discovery, resolution, keys, probes."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from sockguard.core.errors import (
    BpffsNotMountedError,
    MapGoneError,
    MapNotFoundError,
    NotASockMapError,
    NotRootError,
)
from sockguard.core.model import MapInfo
from sockguard.kernel import keywalk, libbpf, maps, sockmap_iter
from tests.lab import sk_msg_attached, sockmap_prog_query_supported

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_kernel")]

SO_COOKIE = 57
KEY = 44
SOCKHASH = libbpf.BPF_MAP_TYPE_SOCKHASH
SOCKMAP = libbpf.BPF_MAP_TYPE_SOCKMAP

MakeMap = Callable[..., int]
TcpPair = Callable[..., tuple[socket.socket, socket.socket]]


def cookie_of(sock: socket.socket) -> int:
    value: int = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return value


def key(n: int) -> bytes:
    return n.to_bytes(4, "big") * (KEY // 4)


def unique_name() -> str:
    return "sgt_" + uuid.uuid4().hex[:11]  # 15 bytes, the kernel's limit


def fill(fd: int, sock: socket.socket, count: int, value_size: int = 4) -> list[bytes]:
    fmt = "=Q" if value_size == 8 else "=i"
    keys = [key(n) for n in range(count)]
    for k in keys:
        libbpf.map_update(fd, k, struct.pack(fmt, sock.fileno()))
    return keys


def info_of(fd: int) -> MapInfo:
    return maps.resolve_map(f"id:{libbpf.map_info(fd).id}")


# --- bpffs ---------------------------------------------------------------------


def test_require_bpffs(tmp_path: Path) -> None:
    maps.require_bpffs("/sys/fs/bpf")
    with pytest.raises(BpffsNotMountedError, match="mount -t bpf bpf /sys/fs/bpf"):
        maps.require_bpffs(str(tmp_path))


def test_is_bpffs_uses_nearest_existing_parent(bpffs_dir: Path, tmp_path: Path) -> None:
    assert maps.is_bpffs(str(bpffs_dir / "not" / "yet"))
    assert not maps.is_bpffs(str(tmp_path / "nope"))


# --- discovery -----------------------------------------------------------------


def test_discover_pinned_maps(make_map: MakeMap, bpffs_dir: Path) -> None:
    sockhash = make_map(SOCKHASH, KEY, 4, 256, name="sg_disc")
    sockmap = make_map(SOCKMAP, 4, 8, 8, name="sg_disc_arr")
    plain = make_map(libbpf.BPF_MAP_TYPE_HASH, 4, 4)
    (bpffs_dir / "sub").mkdir()
    libbpf.obj_pin(sockhash, str(bpffs_dir / "a_first"))
    libbpf.obj_pin(sockhash, str(bpffs_dir / "sub" / "z_second"))  # same map, two pins
    libbpf.obj_pin(sockmap, str(bpffs_dir / "arr"))
    libbpf.obj_pin(plain, str(bpffs_dir / "plain"))

    found = maps.discover_maps(str(bpffs_dir), names=())
    by_id = {m.id: m for m in found}
    assert len(found) == len(by_id) == 2
    hinfo = by_id[libbpf.map_info(sockhash).id]
    assert hinfo == MapInfo(
        id=hinfo.id,
        name="sg_disc",
        map_type="sockhash",
        key_size=KEY,
        value_size=4,
        max_entries=256,
        path=str(bpffs_dir / "a_first"),
        programs=() if sockmap_prog_query_supported() else None,  # None: kernel < 6.0
    )
    assert by_id[libbpf.map_info(sockmap).id].map_type == "sockmap"


def test_discover_skips_pinned_programs(bpffs_dir: Path, sk_msg_object: Path) -> None:
    with libbpf.BpfObject(sk_msg_object) as obj:
        obj.load()
        libbpf.obj_pin(obj.program("sg_test_msg").fd, str(bpffs_dir / "prog"))
        assert maps.discover_maps(str(bpffs_dir), names=()) == []


def test_discover_loaded_maps_by_name(make_map: MakeMap, tmp_path: Path) -> None:
    name = unique_name()
    fd = make_map(SOCKHASH, KEY, 4, name=name)
    make_map(libbpf.BPF_MAP_TYPE_HASH, 4, 4, name=name)  # same name, wrong type
    # a root that is not a bpffs is skipped; the id scan still finds the map
    found = maps.discover_maps(str(tmp_path), names=(name,))
    assert [(m.id, m.path) for m in found] == [(libbpf.map_info(fd).id, None)]


def test_discover_dedupes_pinned_and_named(make_map: MakeMap, bpffs_dir: Path) -> None:
    name = unique_name()
    fd = make_map(SOCKHASH, KEY, 4, name=name)
    libbpf.obj_pin(fd, str(bpffs_dir / "pinned"))
    found = maps.discover_maps(str(bpffs_dir), names=(name,))
    assert [m.path for m in found] == [str(bpffs_dir / "pinned")]


def test_discover_reports_attached_sk_msg(make_map: MakeMap, sk_msg_object: Path) -> None:
    if not sockmap_prog_query_supported():
        pytest.skip(f"no BPF_PROG_QUERY on sockmaps before kernel 6.0 ({os.uname().release})")
    name = unique_name()
    fd = make_map(SOCKHASH, KEY, 4, name=name)
    with libbpf.BpfObject(sk_msg_object) as obj:
        obj.load()
        prog = obj.program("sg_test_msg")
        prog_id = libbpf.prog_info(prog.fd).id
        # by link where the kernel has sockmap links (6.10+), else legacy attach + detach
        with sk_msg_attached(prog, fd):
            map_id = libbpf.map_info(fd).id
            # other sockhashes may be pinned under /sys/fs/bpf meanwhile
            (found,) = [m for m in maps.discover_maps(names=(name,)) if m.id == map_id]
            assert found.programs == (f"sk_msg:sg_test_msg:{prog_id}",)
            assert maps.resolve_map(name).programs == found.programs


# --- resolve_map ---------------------------------------------------------------


def test_resolve_by_path_id_and_name(make_map: MakeMap, bpffs_dir: Path) -> None:
    name = unique_name()
    fd = make_map(SOCKHASH, KEY, 4, 32, name=name)
    map_id = libbpf.map_info(fd).id
    pin = bpffs_dir / "by_path"
    libbpf.obj_pin(fd, str(pin))

    by_path = maps.resolve_map(str(pin))
    assert (by_path.id, by_path.path, by_path.name) == (map_id, str(pin), name)
    by_id = maps.resolve_map(f"id:{map_id}")
    assert (by_id.id, by_id.path, by_id.max_entries) == (map_id, None, 32)
    assert maps.resolve_map(name).id == map_id


def test_resolve_by_pinned_basename(make_map: MakeMap, bpffs_dir: Path) -> None:
    fd = make_map(SOCKHASH, KEY, 4, name="sg_kernel_name")
    basename = "pin_only_" + uuid.uuid4().hex[:8]
    (bpffs_dir / "tc").mkdir()
    libbpf.obj_pin(fd, str(bpffs_dir / "tc" / basename))
    found = maps.resolve_map(basename, bpffs_root=str(bpffs_dir))
    assert found.id == libbpf.map_info(fd).id
    assert found.path == str(bpffs_dir / "tc" / basename)


def test_resolve_errors(make_map: MakeMap, bpffs_dir: Path, tmp_path: Path) -> None:
    missing = unique_name()
    with pytest.raises(MapNotFoundError, match=f"no map named {missing}"):
        maps.resolve_map(missing, bpffs_root=str(bpffs_dir))
    with pytest.raises(MapNotFoundError, match="no map with id 2147483000"):
        maps.resolve_map("id:2147483000")
    with pytest.raises(MapNotFoundError, match="bad map id"):
        maps.resolve_map("id:twelve")
    with pytest.raises(MapNotFoundError, match="no such pinned map"):
        maps.resolve_map(str(bpffs_dir / "absent"))

    name = unique_name()
    plain = make_map(libbpf.BPF_MAP_TYPE_HASH, 4, 4, name=name)
    plain_id = libbpf.map_info(plain).id
    expected = f"map {name} \\(id {plain_id}\\) is a hash, not a sockhash or sockmap"
    with pytest.raises(NotASockMapError, match=expected):
        maps.resolve_map(name)
    with pytest.raises(NotASockMapError, match="is a hash"):
        maps.resolve_map(f"id:{plain_id}")
    libbpf.obj_pin(plain, str(bpffs_dir / "plain"))
    with pytest.raises(NotASockMapError, match="is a hash"):
        maps.resolve_map(str(bpffs_dir / "plain"))

    fake = tmp_path / "cilium_sock_ops"
    fake.write_text("")
    with pytest.raises(BpffsNotMountedError, match="not on a bpf filesystem"):
        maps.resolve_map(str(fake))


def test_resolve_ambiguous_name(make_map: MakeMap) -> None:
    name = unique_name()
    make_map(SOCKHASH, KEY, 4, name=name)
    make_map(SOCKHASH, KEY, 4, name=name)
    with pytest.raises(MapNotFoundError, match="ambiguous"):
        maps.resolve_map(name)


# --- MapHandle -----------------------------------------------------------------


def test_open_map_gone(make_map: MakeMap) -> None:
    fd = libbpf.map_create(SOCKHASH, "sg_gone", KEY, 4, 8)
    info = info_of(fd)
    os.close(fd)  # the last reference: the id is released at once (bpf_map_put)
    with pytest.raises(MapGoneError):
        maps.open_map(info)


def test_keys_lookup_contains_delete_value8(make_map: MakeMap, tcp_pair: TcpPair) -> None:
    fd = make_map(SOCKHASH, KEY, 8, 64)
    client, server = tcp_pair()
    with maps.open_map(info_of(fd)) as handle:
        assert list(handle.keys()) == []
        assert handle.contains(key(1)) is False
        handle.insert_socket(key(1), client.fileno())
        handle.insert_socket(key(2), server.fileno())
        assert sorted(handle.keys()) == [key(1), key(2)]
        assert handle.lookup_cookie(key(1)) == cookie_of(client)
        assert handle.lookup_cookie(key(2)) == cookie_of(server)
        assert handle.lookup_cookie(key(3)) is None
        assert handle.contains(key(2)) and not handle.contains(key(3))
        assert handle.delete(key(2)) is True
        assert handle.delete(key(2)) is False
        assert not handle.contains(key(2))
    assert handle.fd == -1


@pytest.mark.parametrize("count", [0, 1, 2, 50])
def test_contains_value4_by_get_next_key(make_map: MakeMap, tcp_pair: TcpPair, count: int) -> None:
    """With a 4-byte value no lookup works (ENOSPC); get_next_key semantics decide."""
    fd = make_map(SOCKHASH, KEY, 4, 128)
    client, _ = tcp_pair()
    keys = fill(fd, client, count)
    with maps.open_map(info_of(fd)) as handle:
        assert handle.lookup_cookie(key(0)) is None
        for k in keys:  # includes the first and the last key of the walk
            assert handle.contains(k), k.hex()
        for n in range(count, count + 20):
            assert not handle.contains(key(n))


def test_sockmap_keys_and_value4_contains(make_map: MakeMap, tcp_pair: TcpPair) -> None:
    fd = make_map(SOCKMAP, 4, 4, 8)
    client, _ = tcp_pair()
    libbpf.map_update(fd, struct.pack("=I", 5), struct.pack("=i", client.fileno()))
    with maps.open_map(info_of(fd)) as handle:
        # every index is a key of a sockmap, occupied or not (sock_map_get_next_key)
        assert list(handle.keys()) == [struct.pack("=I", i) for i in range(8)]
        iterator = sockmap_iter.iterator_available()[0]
        if iterator:
            assert handle.contains(struct.pack("=I", 5))
            assert not handle.contains(struct.pack("=I", 4))
        else:  # only the iterator tells an occupied slot of a 4-byte sockmap: never guess
            with pytest.raises(NotRootError, match="sockmap iterator"):
                handle.contains(struct.pack("=I", 5))
        assert handle.delete(struct.pack("=I", 4)) is False  # empty slot: EINVAL
        assert handle.delete(struct.pack("=I", 99)) is False  # out of range: EINVAL
        assert handle.delete(struct.pack("=I", 5)) is True
        assert handle.delete(struct.pack("=I", 5)) is False  # emptied: EINVAL
        if iterator:
            assert not handle.contains(struct.pack("=I", 5))


@pytest.fixture(params=["native", "python"])
def key_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each walk test twice: the native loop (where the package built it) and the
    Python loop it falls back to (forced by hiding the library)."""
    if request.param == "native":
        native, why = keywalk.available()
        if not native:
            pytest.skip(why)
    else:
        monkeypatch.setattr(keywalk, "_load", lambda: (None, "hidden by the test"))
    return str(request.param)


def test_key_cursor_walks_with_the_loop_asked_for(make_map: MakeMap, tcp_pair: TcpPair,
                                                  key_loop: str) -> None:
    """Both loops give every key once, in the kernel's order, and count the calls made."""
    fd = make_map(SOCKHASH, KEY, 4, 8192)
    client, _ = tcp_pair()
    keys = fill(fd, client, 5000)
    cursor = libbpf.KeyCursor(fd, KEY, chunk=512)
    assert cursor.native is (key_loop == "native")
    order = []
    k = cursor.next(None)
    while k is not None:
        order.append(k)
        k = cursor.next(k)
    assert sorted(order) == sorted(keys)
    seen: dict[bytes, None] = {}
    fresh: list[bytes] = []
    stop, calls, repeated = cursor.collect(None, seen, fresh, 1200)
    assert (stop, calls, repeated) == (order[1199], 1200, False)
    stop, calls, repeated = cursor.collect(stop, seen, fresh, 10**6)
    assert (stop, calls, repeated) == (None, 5000 - 1200 + 1, False)  # + the ENOENT call
    assert fresh == order and list(seen) == order
    # Walking on from a seen key that was deleted restarts at the first bucket: the
    # walk stops at its first repeat.
    libbpf.map_delete(fd, order[3000])
    again: list[bytes] = []
    stop, _calls, repeated = cursor.collect(order[3000], seen, again, 10**6)
    assert (stop, repeated, again) == (order[0], True, [])


def test_key_cursor_reports_a_failing_walk(tmp_path: Path, key_loop: str) -> None:
    """A descriptor that is no map: the kernel's error, raised, whichever loop walks."""
    with open(tmp_path / "plain", "w") as plain:
        cursor = libbpf.KeyCursor(plain.fileno(), KEY)
        with pytest.raises(libbpf.BpfError, match="bpf_map_get_next_key"):
            cursor.collect(None, {}, [], 100)


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_keys_survive_deleting_while_iterating(make_map: MakeMap, tcp_pair: TcpPair,
                                               chunk: int, key_loop: str) -> None:
    """Deleting keys already yielded, the cursor among them whenever a chunk ends there."""
    fd = make_map(SOCKHASH, KEY, 4, 1024)
    client, _ = tcp_pair()
    keys = set(fill(fd, client, 600))
    yielded: list[bytes] = []
    with maps.open_map(info_of(fd)) as handle:
        for n, k in enumerate(handle.keys(chunk=chunk)):
            yielded.append(k)
            if n % 3 == 0:
                handle.delete(k)  # the cursor itself: the kernel restarts the walk
    assert len(yielded) == len(set(yielded))
    assert set(yielded) == keys


@pytest.mark.parametrize("chunk", [1, 4096])
def test_keys_under_concurrent_deletes(make_map: MakeMap, tcp_pair: TcpPair, chunk: int,
                                       key_loop: str) -> None:
    """Another thread deletes random keys and, racing the walk, the key just yielded
    (with chunks of 4096 the native loop meets the deletes inside a chunk)."""
    fd = make_map(SOCKHASH, KEY, 4, 4096)
    client, _ = tcp_pair()
    keys = fill(fd, client, 3000)
    doomed = random.Random(7).sample(keys, 1500)
    deleted: set[bytes] = set()
    yielded: list[bytes] = []
    started, done = threading.Event(), threading.Event()

    def deleter() -> None:
        started.wait()
        for k in doomed:
            for victim in (k, yielded[-1] if yielded else k):
                libbpf.map_delete(fd, victim)
                deleted.add(victim)
            if done.is_set():
                return

    worker = threading.Thread(target=deleter)
    worker.start()
    try:
        with maps.open_map(info_of(fd)) as handle:
            for k in handle.keys(chunk=chunk):
                started.set()
                yielded.append(k)
    finally:
        done.set()
        started.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    assert len(yielded) == len(set(yielded)), "a key was yielded twice"
    survivors = set(keys) - deleted
    assert survivors <= set(yielded), "a key present throughout the walk was missed"
    assert set(yielded) <= set(keys)


def test_keys_walk_is_bounded_under_endless_churn(make_map: MakeMap, tcp_pair: TcpPair,
                                                  key_loop: str) -> None:
    """Each step deletes the cursor and inserts a new key: the walk must still end."""
    max_entries = 64
    fd = make_map(SOCKHASH, KEY, 4, max_entries)
    client, _ = tcp_pair()
    fill(fd, client, 32)
    fresh = iter(range(1000, 10**6))
    yielded: list[bytes] = []
    with maps.open_map(info_of(fd)) as handle:
        for k in handle.keys(chunk=1):
            yielded.append(k)
            handle.delete(k)
            handle.insert_socket(key(next(fresh)), client.fileno())
            assert len(yielded) <= 4 * max_entries + 16
    assert len(yielded) == len(set(yielded))


def test_a_walk_hands_out_the_last_walks_key_objects(make_map: MakeMap, tcp_pair: TcpPair,
                                                     key_loop: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's audits walk the same map every interval: a key walked before comes
    out as the same object, so the walks do not churn the allocator's arenas."""
    fd = make_map(SOCKHASH, KEY, 4, 1024)
    client, _ = tcp_pair()
    keys = fill(fd, client, 600)
    with maps.open_map(info_of(fd)) as handle:
        first = {k: k for k in handle.keys(chunk=100)}
        libbpf.map_delete(fd, keys[0])
        added = key(5000)
        handle.insert_socket(added, client.fileno())
        second = list(handle.keys(chunk=100))
    assert sorted(second) == sorted([*keys[1:], added])
    assert all(k is first[k] for k in second if k != added)
    assert added not in first
    # the kept walks are bounded: the oldest map's is dropped
    monkeypatch.setattr(maps, "KEPT_WALKS", 1)
    other = make_map(SOCKHASH, KEY, 4, 64)
    fill(other, client, 3)
    with maps.open_map(info_of(other)) as handle:
        list(handle.keys())
    with maps.open_map(info_of(fd)) as handle:
        third = list(handle.keys())
    assert sorted(third) == sorted(second)
    assert not any(k is first[k] for k in third if k != added)
