"""The maps adapter: find sockhash/sockmap maps and read, probe and delete their keys.

Everything here is a thin layer over bpf(2) through :mod:`sockguard.kernel.libbpf`;
kernel errors become the operator-facing errors of :mod:`sockguard.core.errors`.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import logging
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sockguard.core.errors import (
    BpffsNotMountedError,
    MapGoneError,
    MapNotFoundError,
    NotASockMapError,
    SockguardError,
    from_os_error,
)
from sockguard.core.model import MapInfo
from sockguard.core.rows import Record
from sockguard.kernel import libbpf
from sockguard.kernel.libbpf import BpfError

log = logging.getLogger(__name__)

SOCK_MAP_TYPES = {libbpf.BPF_MAP_TYPE_SOCKMAP: "sockmap", libbpf.BPF_MAP_TYPE_SOCKHASH: "sockhash"}
#: Name prefix of the maps sockguard creates only to probe the kernel.  A closed map
#: stays listed until the kernel frees it (bpf_map_put defers that to a work queue),
#: so listings of the node's maps skip these by name.
PROBE_MAP_PREFIX = "sg_probe_"
#: How many of the latest keys a walk tries to resume after when its cursor is deleted.
RESUME_DEPTH = 8
#: Maps whose latest complete walk is kept (``MapHandle.keys``), the oldest dropped.
KEPT_WALKS = 8

#: Map id -> the key objects of its latest complete walk (key -> key), newest last.
_last_walks: collections.OrderedDict[int, dict[bytes, bytes]] = collections.OrderedDict()
_last_walks_lock = threading.Lock()  # the audit and tracer threads both walk

BPF_FS_MAGIC = 0xCAFE4A11
MOUNT_HINT = "mount -t bpf bpf /sys/fs/bpf"

# Names of the other map types, for error messages only.
_MAP_TYPE_NAMES = {
    1: "hash", 2: "array", 3: "prog_array", 4: "perf_event_array", 5: "percpu_hash",
    6: "percpu_array", 7: "stack_trace", 8: "cgroup_array", 9: "lru_hash",
    10: "lru_percpu_hash", 11: "lpm_trie", 12: "array_of_maps", 13: "hash_of_maps",
    14: "devmap", 16: "cpumap", 17: "xskmap", 19: "cgroup_storage",
    20: "reuseport_sockarray", 22: "queue", 23: "stack", 24: "sk_storage",
    25: "devmap_hash", 26: "struct_ops", 27: "ringbuf", 28: "inode_storage",
    29: "task_storage", 30: "bloom_filter", 31: "user_ringbuf", 32: "cgrp_storage", 33: "arena",
}  # fmt: skip

# Attach types whose programs run on a sockmap's sockets, and how MapInfo names them.
_MAP_PROG_ATTACH = (
    (libbpf.BPF_SK_MSG_VERDICT, "sk_msg"),
    (libbpf.BPF_SK_SKB_STREAM_PARSER, "sk_skb_stream_parser"),
    (libbpf.BPF_SK_SKB_STREAM_VERDICT, "sk_skb_stream_verdict"),
    (libbpf.BPF_SK_SKB_VERDICT, "sk_skb_verdict"),
)

_KERNEL_NAME_MAX = libbpf.BPF_OBJ_NAME_LEN - 1


def _fs_type(path: str) -> int:
    """statfs(2) ``f_type`` of the filesystem holding ``path`` (os.statvfs lacks it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    # f_type is the first member, a long (__fsword_t) on 64-bit Linux
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def _existing_ancestor(path: str) -> str:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


def is_bpffs(path: str) -> bool:
    """Whether ``path`` (or, if it does not exist, its nearest existing parent) is on a bpffs."""
    try:
        return _fs_type(_existing_ancestor(path)) == BPF_FS_MAGIC
    except OSError:
        return False


def require_bpffs(root: str = "/sys/fs/bpf") -> None:
    """Raise BpffsNotMountedError unless ``root`` is a mounted bpf filesystem."""
    if not is_bpffs(root):
        raise BpffsNotMountedError(f"{root} is not a bpf filesystem; mount it: {MOUNT_HINT}")


def _raise_for(exc: BpfError, what: str) -> None:
    """Raise what ``exc`` means to the operator (out of fds, not root); else return.

    The caller then decides what is left, ENOENT above all: a map freed
    meanwhile is skipped in a scan but an error for a map asked for by name.
    """
    err = from_os_error(exc, what)
    if err is not None:
        raise err from exc


def _type_name(map_type: int) -> str:
    return SOCK_MAP_TYPES.get(map_type) or _MAP_TYPE_NAMES.get(map_type, f"type {map_type}")


def _attached_programs(fd: int) -> tuple[str, ...] | None:
    """The sk_msg/sk_skb programs attached to the map, as ``"kind:name:id"``.

    None when the kernel cannot say: BPF_PROG_QUERY on a sockmap exists only
    since 6.0 (sock_map_bpf_prog_query) and fails with EINVAL before; an empty
    list there would wrongly read as "nothing attached".
    """
    found: list[str] = []
    answered = False
    for attach_type, kind in _MAP_PROG_ATTACH:
        try:
            ids = libbpf.prog_query(fd, attach_type)
        except BpfError as exc:  # EOPNOTSUPP without CONFIG_BPF_STREAM_PARSER, EINVAL < 6.0
            log.debug("prog_query(%s) on map fd %d: %s", kind, fd, exc)
            continue
        answered = True
        for prog_id in ids:
            name = "?"
            try:
                pfd = libbpf.prog_fd_by_id(prog_id)
                try:
                    name = libbpf.prog_info(pfd).name
                finally:
                    os.close(pfd)
            except BpfError:
                pass
            found.append(f"{kind}:{name}:{prog_id}")
    return tuple(found) if answered else None


def _map_info_from_fd(fd: int, path: str | None) -> MapInfo:
    raw = libbpf.map_info(fd)
    return MapInfo(
        id=raw.id,
        name=raw.name,
        map_type=_type_name(raw.type),
        key_size=raw.key_size,
        value_size=raw.value_size,
        max_entries=raw.max_entries,
        path=path,
        programs=_attached_programs(fd) if raw.type in SOCK_MAP_TYPES else (),
    )


def _pinned_files(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _e: None):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _open_pin(path: str) -> int | None:
    """An fd for the map pinned at ``path``; None when it is not a map."""
    try:
        fd = libbpf.obj_get(path, readonly=True)
    except BpfError as exc:
        _raise_for(exc, f"bpf_obj_get({path})")
        return None
    if libbpf.fd_kind(fd) != "map":
        os.close(fd)
        return None
    return fd


def _loaded_map_ids() -> Iterator[int]:
    cur = 0
    while True:
        try:
            nxt = libbpf.map_get_next_id(cur)
        except BpfError as exc:
            _raise_for(exc, "bpf_map_get_next_id")
            raise
        if nxt is None:
            return
        yield nxt
        cur = nxt


def _name_matches(kernel_name: str, wanted: str) -> bool:
    """Kernel map names are cut to 15 bytes, so a longer wanted name matches its prefix."""
    return kernel_name == wanted or (
        len(wanted) > _KERNEL_NAME_MAX and kernel_name == wanted[:_KERNEL_NAME_MAX]
    )


def _loaded_maps_named(name: str) -> list[tuple[int, libbpf.RawMapInfo]]:
    """(id, info) of every loaded map called ``name``; maps that vanish meanwhile are skipped."""
    found = []
    for map_id in _loaded_map_ids():
        try:
            fd = libbpf.map_fd_by_id(map_id)
        except BpfError as exc:
            _raise_for(exc, f"bpf_map_get_fd_by_id({map_id})")
            continue  # freed between get_next_id and get_fd_by_id
        try:
            raw = libbpf.map_info(fd)
        finally:
            os.close(fd)
        if _name_matches(raw.name, name):
            found.append((map_id, raw))
    return found


def discover_maps(
    bpffs_root: str = "/sys/fs/bpf", names: tuple[str, ...] | list[str] = ("cilium_sock_ops",)
) -> list[MapInfo]:
    """Every sockhash/sockmap pinned under ``bpffs_root`` plus loaded ones called ``names``.

    Pinned maps come first (with their first pin path, in sorted walk order),
    then loaded maps by id.  A root that is not a mounted bpffs is skipped:
    Cilium's map is still found by name through the id scan.
    """
    result: list[MapInfo] = []
    seen: set[int] = set()
    if is_bpffs(bpffs_root):
        for path in _pinned_files(bpffs_root):
            fd = _open_pin(path)
            if fd is None:
                continue
            try:
                raw = libbpf.map_info(fd)
                if raw.type in SOCK_MAP_TYPES and raw.id not in seen:
                    seen.add(raw.id)
                    result.append(_map_info_from_fd(fd, path))
            finally:
                os.close(fd)
    else:
        log.debug("%s is not a bpffs; looking up maps by name only", bpffs_root)
    if not names:
        return result
    for map_id in _loaded_map_ids():
        if map_id in seen:
            continue
        try:
            fd = libbpf.map_fd_by_id(map_id)
        except BpfError as exc:
            _raise_for(exc, f"bpf_map_get_fd_by_id({map_id})")
            continue
        try:
            raw = libbpf.map_info(fd)
            if raw.type in SOCK_MAP_TYPES and any(_name_matches(raw.name, n) for n in names):
                seen.add(raw.id)
                result.append(_map_info_from_fd(fd, None))
        finally:
            os.close(fd)
    return result


def _not_sock(desc: str, raw: libbpf.RawMapInfo) -> NotASockMapError:
    return NotASockMapError(
        f"map {desc} (id {raw.id}) is a {_type_name(raw.type)}, not a sockhash or sockmap"
    )


def _resolve_path(path: str) -> MapInfo:
    if os.path.isdir(path):
        raise MapNotFoundError(f"{path} is a directory, not a pinned map; give the pin path of "
                               "the map itself (e.g. /sys/fs/bpf/tc/globals/cilium_sock_ops)")
    if not is_bpffs(path):
        where = _existing_ancestor(path)
        raise BpffsNotMountedError(
            f"{path}: {where} is not on a bpf filesystem; is bpffs mounted? ({MOUNT_HINT})"
        )
    try:
        fd = libbpf.obj_get(path, readonly=True)
    except BpfError as exc:
        raise (from_os_error(exc, path, missing=MapNotFoundError(f"{path}: no such pinned map"))
               or MapNotFoundError(f"{path}: cannot open pinned object ({exc.strerror})")) \
            from exc
    try:
        kind = libbpf.fd_kind(fd)
        if kind != "map":
            raise NotASockMapError(f"{path} is a pinned bpf {kind or 'object'}, not a map")
        raw = libbpf.map_info(fd)
        if raw.type not in SOCK_MAP_TYPES:
            raise _not_sock(path, raw)
        return _map_info_from_fd(fd, path)
    finally:
        os.close(fd)


def _resolve_id(text: str) -> MapInfo:
    try:
        map_id = int(text, 10)
    except ValueError:
        raise MapNotFoundError(f"bad map id {text!r}: expected id:N") from None
    try:
        fd = libbpf.map_fd_by_id(map_id)
    except BpfError as exc:
        raise (from_os_error(exc, f"map id {map_id}")
               or MapNotFoundError(f"no map with id {map_id}")) from exc
    try:
        raw = libbpf.map_info(fd)
        if raw.type not in SOCK_MAP_TYPES:
            raise _not_sock(f"id:{map_id}", raw)
        return _map_info_from_fd(fd, None)
    finally:
        os.close(fd)


def resolve_map(spec: str, bpffs_root: str = "/sys/fs/bpf") -> MapInfo:
    """Resolve ``--map``: a pin path ("/..."), "id:N", or a map name.

    A name is matched against loaded maps first, then against basenames of
    pins under ``bpffs_root``.  Several sock maps with the same name are an
    error rather than a guess, since ``clean`` deletes from the result.
    """
    if spec.startswith("/"):
        return _resolve_path(spec)
    if spec.startswith("id:"):
        return _resolve_id(spec[3:])

    named = _loaded_maps_named(spec)
    socks = [(i, raw) for i, raw in named if raw.type in SOCK_MAP_TYPES]
    if len(socks) > 1:
        ids = ", ".join(str(i) for i, _ in socks)
        raise MapNotFoundError(f"map name {spec} is ambiguous (ids {ids}); use id:N or a pin path")
    if socks:
        return _resolve_id(str(socks[0][0]))
    if named:
        raise _not_sock(spec, named[0][1])

    if is_bpffs(bpffs_root):
        for path in _pinned_files(bpffs_root):
            if os.path.basename(path) == spec:
                return _resolve_path(path)
        raise MapNotFoundError(f"no map named {spec} (none loaded, none pinned under "
                               f"{bpffs_root})")
    raise MapNotFoundError(f"no map named {spec} (none loaded; {bpffs_root} is not a bpf "
                           "filesystem, so no pins were searched)")


def _keep_walk(map_id: int, seen: dict[bytes, bytes]) -> None:
    """Keep a complete walk's keys for the map's next walk (``MapHandle.keys``)."""
    with _last_walks_lock:
        _last_walks[map_id] = seen
        _last_walks.move_to_end(map_id)
        while len(_last_walks) > KEPT_WALKS:
            _last_walks.popitem(last=False)


class MapHandle:
    """An open sockhash/sockmap: owns one fd, closed by ``close()`` or ``with``."""

    def __init__(self, info: MapInfo, fd: int) -> None:
        self.info = info
        self.fd = fd
        self.is_hash = info.map_type == "sockhash"
        self._lookup: tuple[libbpf.BpfObject, Any] | None = None  # the tc lookup, once loaded

    # -- keys --------------------------------------------------------------

    def keys(self, chunk: int = 4096) -> Iterator[bytes]:
        """Every key present throughout the walk, each exactly once.

        A snapshot is impossible from userspace; the walk tolerates concurrent
        deletes.  When the cursor key is deleted, sock_hash_get_next_key
        restarts from the first bucket.  Then the walk resumes from the latest
        earlier key that still exists, and if none does it re-walks while
        skipping keys already seen.  get_next_key calls are bounded by
        ``4 * max_entries + 16`` so a map churning faster than the walk cannot
        keep it going forever.  For a sockmap every index is a key, whether or
        not it holds a socket (sock_map_get_next_key); see ``contains``.
        Keys are walked ``chunk`` at a time before they are yielded (tests that
        delete the key just yielded ask for 1).

        A key the map's previous complete walk yielded is yielded as the same
        object: a daemon's audit would otherwise make 65,535 new key objects while
        the tracer still holds the last audit's, and the memory allocator keeps
        the arenas that churn leaves partly used (RSS rose 3-5 MB in 1 MB steps
        over the first ~600 audits at a 0.3 s interval).
        """
        budget = 4 * self.info.max_entries + 16
        seen: dict[bytes, bytes] = {}  # insertion-ordered: its tail is the latest keys
        known = _last_walks.get(self.info.id)
        walk = libbpf.KeyCursor(self.fd, self.info.key_size)
        cursor: bytes | None = None  # walk on from the key after it (None: the first)
        calls = 0
        while calls < budget:
            fresh: list[bytes] = []
            stop, made, repeated = walk.collect(cursor, seen, fresh, min(chunk, budget - calls),
                                                known)
            calls += made
            yield from fresh
            if stop is None:
                _keep_walk(self.info.id, seen)
                return
            if repeated:  # the key walked from was deleted and the walk restarted
                stop, calls = self._resume(walk, seen, stop, calls, budget)
                if stop is None:
                    _keep_walk(self.info.id, seen)
                    return
                if stop in seen:
                    break  # the budget is spent
                seen[stop] = stop
                yield stop
            cursor = stop
        log.warning("map %s: key walk stopped after %d get_next_key calls (map churning)",
                    self.info.name, calls)

    @staticmethod
    def _resume(walk: libbpf.KeyCursor, seen: dict[bytes, bytes], repeat: bytes, calls: int,
                budget: int) -> tuple[bytes | None, int]:
        """Where a restarted walk goes on: (the first unseen key after the latest earlier
        key that still exists, else after re-walking from ``repeat``; None at the end of
        the map; a seen key once the budget is spent), and the calls made so far."""
        for earlier in list(itertools.islice(reversed(seen), 1, RESUME_DEPTH)):
            if calls >= budget:
                return repeat, calls
            candidate = walk.next(earlier)
            calls += 1
            if candidate is None or candidate not in seen:
                return candidate, calls  # None: ``earlier`` is the last key
        resumed: bytes | None = repeat
        while resumed is not None and resumed in seen and calls < budget:
            resumed = walk.next(resumed)
            calls += 1
        return resumed, calls

    # -- probing -----------------------------------------------------------

    def lookup_cookie(self, key: bytes) -> int | None:
        """The cookie of the socket under ``key`` (value_size 8 only), else None.

        With a 4-byte value the kernel refuses every userspace lookup with
        ENOSPC before it looks at the key (sock_hash_lookup_sys,
        sock_map_lookup_sys), so no call is made.
        """
        if self.info.value_size != 8:
            return None
        try:
            value = libbpf.map_lookup(self.fd, key, 8)
        except BpfError as exc:
            if not self.is_hash and exc.errno == errno.EINVAL:
                return None  # sockmap index out of range
            raise
        if value is None:
            return None
        cookie: int = struct.unpack("=Q", value)[0]
        return cookie

    def contains(self, key: bytes) -> bool:
        """Whether ``key`` is in the map now.

        value_size 8: a lookup.  value_size 4 (no userspace lookup, see
        ``lookup_cookie``): for a sockhash, get_next_key semantics
        (sock_hash_get_next_key) — for a present key it returns the key after
        it, or ENOENT when it is the last; for an absent key it returns the
        first key of the map.  So the key is present iff its successor is not
        the first key, or it has no successor while the map is not empty.  The
        two calls are not atomic: a concurrent change can mislead one probe.
        For a 4-byte sockmap, the sockmap iterator reports occupied slots.
        """
        if self.info.value_size == 8:
            return self.lookup_cookie(key) is not None
        if self.is_hash:
            after = libbpf.map_get_next_key(self.fd, key, self.info.key_size)
            first = libbpf.map_get_next_key(self.fd, None, self.info.key_size)
            if after is None:
                return first is not None
            return after != first
        from sockguard.kernel.sockmap_iter import read_sockmap

        return key in read_sockmap(self.fd, self.info.key_size)

    def entry_socket(self, key: bytes) -> Record | None:
        """The socket ``key`` points to right now, as a record; None when the key holds none.

        One tc lookup run where that source loads (exact and per key), else
        one sockmap-iterator walk.  Remediation asks this immediately before
        a delete, so that it compares the owner with the entry's *current*
        socket, not the one an audit saw (a key deleted and re-inserted for a
        new connection points to that connection's socket).  Raises
        SockguardError when neither source can run here.
        """
        from sockguard.kernel import sockhash_lookup
        from sockguard.kernel.sockmap_iter import iterator_available, read_records

        if sockhash_lookup.lookup_available()[0]:
            if self._lookup is None:
                program = sockhash_lookup._probe()[0] or sockhash_lookup.BTF_PROGRAM
                obj = sockhash_lookup._load(self.fd, self.info.key_size, program)
                self._lookup = (obj, sockhash_lookup.Reader(obj, program, self.info.key_size))
            rec: Record | None = self._lookup[1].lookup(key)
            return rec
        if iterator_available()[0]:
            return read_records(self.fd, self.info.key_size).get(key)
        raise SockguardError("cannot tell which socket an entry points to here: neither the "
                             "tc lookup nor the sockmap iterator runs on this kernel")

    # -- changes -----------------------------------------------------------

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False when it was already gone.

        An empty or out-of-range sockmap slot fails with EINVAL, not ENOENT
        (__sock_map_delete), and also counts as gone.
        """
        try:
            return libbpf.map_delete(self.fd, key)
        except BpfError as exc:
            if not self.is_hash and exc.errno == errno.EINVAL:
                return False
            _raise_for(exc, f"delete from map {self.info.name}")
            raise

    def insert_socket(self, key: bytes, sock_fd: int, flags: int = libbpf.BPF_NOEXIST) -> None:
        """Insert an established TCP socket under ``key`` (mainly for tests and the lab).

        The value is the fd, encoded in the map's value size: the kernel reads
        a u64 from an 8-byte map (sock_map_update_elem_sys).
        """
        fmt = "=Q" if self.info.value_size == 8 else "=I"
        libbpf.map_update(self.fd, key, struct.pack(fmt, sock_fd), flags)

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        if self._lookup is not None:
            self._lookup[0].close()
            self._lookup = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_map(info: MapInfo) -> MapHandle:
    """Open the map ``info`` describes, by id, checking it is still that map.

    Raises MapGoneError when the map was unloaded since it was found.

    Map ids are allocated cyclically, so the id cannot silently name another
    map unless the id space wrapped; the check still guards remediation from
    acting on a different map.
    """
    try:
        fd = libbpf.map_fd_by_id(info.id)
    except BpfError as exc:
        raise (from_os_error(exc, f"map id {info.id}")
               or MapGoneError(f"map {info.name} (id {info.id}) no longer exists")) from exc
    try:
        raw = libbpf.map_info(fd)
    except BpfError:
        os.close(fd)
        raise
    if (
        raw.name != info.name
        or _type_name(raw.type) != info.map_type
        or raw.key_size != info.key_size
        or raw.value_size != info.value_size
    ):
        os.close(fd)
        raise MapGoneError(
            f"map {info.name} (id {info.id}) is gone: that id is now {raw.name}"
            f" ({_type_name(raw.type)})"
        )
    return MapHandle(info, fd)


def select_maps(
    specs: Sequence[str], bpffs_root: str = "/sys/fs/bpf",
    names: Sequence[str] = ("cilium_sock_ops",),
) -> tuple[list[MapInfo], bool]:
    """The maps named by ``specs`` (deduplicated), or the discovered ones if none.

    Returns the maps and whether they were discovered: a discovered map that
    does not fit the layout is skipped with a note, a named one is an error.
    """
    if specs:
        seen: dict[int, MapInfo] = {}
        for spec in specs:
            info = resolve_map(spec, bpffs_root=bpffs_root)
            seen.setdefault(info.id, info)
        return list(seen.values()), False
    return discover_maps(bpffs_root=bpffs_root, names=tuple(names)), True
