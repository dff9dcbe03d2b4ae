"""A thin ctypes binding to the system ``libbpf.so.1`` (1.x).

Why ctypes and not a compiled extension: nodes get one Python package with
pre-built CO-RE objects and use the distribution's libbpf; nothing is
compiled on the node.  Only the low-level syscall wrappers and the few
object/program/link calls sockguard needs are bound.

Conventions of libbpf 1.x that this module relies on: the low-level calls
(``bpf_map_*``, ``bpf_obj_*``, ...) return ``-errno`` on failure; calls that
return a pointer return NULL and set ``errno``.  Every failure is raised as
:class:`BpfError`, an ``OSError`` carrying the errno and the operation.

File descriptors returned by the plain functions belong to the caller, who
closes them with ``os.close``.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from sockguard.core.errors import LibbpfMissingError
from sockguard.kernel import keywalk

log = logging.getLogger(__name__)

# enum bpf_map_type (include/uapi/linux/bpf.h)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_SOCKMAP = 15
BPF_MAP_TYPE_SOCKHASH = 18
BPF_MAP_TYPE_RINGBUF = 27

# enum bpf_prog_type
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_PROG_TYPE_SK_SKB = 14
BPF_PROG_TYPE_SK_MSG = 16
BPF_PROG_TYPE_TRACING = 26

# enum bpf_attach_type
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_SKB_STREAM_PARSER = 4
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_SK_MSG_VERDICT = 7
BPF_TRACE_ITER = 28
BPF_SK_SKB_VERDICT = 38

# flags of BPF_MAP_UPDATE_ELEM
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# flags of BPF_PROG_ATTACH
BPF_F_ALLOW_OVERRIDE = 1
BPF_F_ALLOW_MULTI = 2

BPF_OBJ_NAME_LEN = 16

_LIBBPF_WARN, _LIBBPF_INFO, _LIBBPF_DEBUG = 0, 1, 2


class BpfError(OSError):
    """A failed libbpf/bpf(2) operation: ``.errno`` and ``.op`` say which and why.

    ``detail`` carries extra context, such as libbpf's last warnings (the
    verifier log) when an object fails to load.
    """

    def __init__(self, err: int, op: str, detail: str = "") -> None:
        super().__init__(err, os.strerror(err))
        self.op = op
        self.detail = detail

    def __str__(self) -> str:
        base = f"{self.op}: {self.strerror}"
        return f"{base}\n{self.detail}" if self.detail else base


# --- loading --------------------------------------------------------------

_c_u32_p = ctypes.POINTER(ctypes.c_uint32)
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_libc: ctypes.CDLL | None = None
_print_cb: Any = None  # the CFUNCTYPE object must outlive every libbpf call
_recent: collections.deque[str] = collections.deque(maxlen=64)
_PRINT_BUF = 1 << 20  # bytes for one libbpf message, one buffer per thread
_print_tls = threading.local()

_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "bpf_map_get_next_id": (ctypes.c_int, [ctypes.c_uint32, _c_u32_p]),
    "bpf_map_get_fd_by_id": (ctypes.c_int, [ctypes.c_uint32]),
    "bpf_prog_get_fd_by_id": (ctypes.c_int, [ctypes.c_uint32]),
    "bpf_obj_get": (ctypes.c_int, [ctypes.c_char_p]),
    "bpf_obj_get_opts": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_void_p]),
    "bpf_obj_pin": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p]),
    "bpf_obj_get_info_by_fd": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, _c_u32_p]),
    "bpf_map_get_next_key": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_map_update_elem": (
        ctypes.c_int,
        [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64],
    ),
    "bpf_map_delete_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p]),
    "bpf_map_create": (
        ctypes.c_int,
        [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.c_void_p,
        ],
    ),
    "bpf_prog_query": (
        ctypes.c_int,
        [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, _c_u32_p, _c_u32_p, _c_u32_p],
    ),
    "bpf_prog_attach": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]),
    "bpf_prog_detach2": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int]),
    "bpf_link_create": (
        ctypes.c_int,
        [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p],
    ),
    "bpf_iter_create": (ctypes.c_int, [ctypes.c_int]),
    "bpf_prog_test_run_opts": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p]),
    "bpf_object__open_file": (ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_void_p]),
    "bpf_object__load": (ctypes.c_int, [ctypes.c_void_p]),
    "bpf_object__close": (None, [ctypes.c_void_p]),
    "bpf_object__find_program_by_name": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
    "bpf_object__find_map_by_name": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
    "bpf_map__fd": (ctypes.c_int, [ctypes.c_void_p]),
    "bpf_map__name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "bpf_map__reuse_fd": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
    "bpf_map__initial_value": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]),
    "bpf_map__set_initial_value": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t],
    ),
    "bpf_program__fd": (ctypes.c_int, [ctypes.c_void_p]),
    "bpf_program__set_autoload": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_bool]),
    "bpf_program__attach": (ctypes.c_void_p, [ctypes.c_void_p]),
    "bpf_program__name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "bpf_program__attach_cgroup": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
    "bpf_program__attach_iter": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_link__fd": (ctypes.c_int, [ctypes.c_void_p]),
    "bpf_link__destroy": (ctypes.c_int, [ctypes.c_void_p]),
    "libbpf_set_print": (ctypes.c_void_p, [_PRINT_FN]),
    "bpf_object__next_program": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_object__btf": (ctypes.c_void_p, [ctypes.c_void_p]),
    "btf__find_by_name_kind": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]),
    "btf__type_by_id": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_uint32]),
    "btf__name_by_offset": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_uint32]),
    "btf__resolve_size": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_uint32]),
    "btf__resolve_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint32]),
}


def _on_libbpf_print(level: int, fmt: bytes | None, ap: int | None) -> int:
    """Route libbpf's printf-style messages to ``logging`` instead of stderr."""
    try:
        if fmt is None or _libc is None:
            return 0
        # A verifier log comes as one message, and its reason is its last line: a
        # rejected tracer program's log on 5.10 is tens of KiB.  vsnprintf cannot be rerun
        # on the same va_list, so the buffer is large enough at once.
        buf = getattr(_print_tls, "buf", None)
        if buf is None:
            buf = _print_tls.buf = ctypes.create_string_buffer(_PRINT_BUF)
        needed = _libc.vsnprintf(buf, len(buf), fmt, ap)
        text = buf.value.decode(errors="replace").rstrip("\n")
        if needed >= len(buf):
            text += f"\n[libbpf message cut: {needed} bytes, the first {len(buf) - 1} kept]"
        if level <= _LIBBPF_INFO:
            _recent.append(text)
        log.debug("libbpf: %s", text)
    except Exception:  # an exception must never unwind through C frames
        return 0
    return 0


def _load() -> ctypes.CDLL:
    global _lib, _libc, _print_cb
    with _lock:
        if _lib is not None:
            return _lib
        try:
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as exc:
            raise LibbpfMissingError(
                f"cannot load libbpf.so.1 ({exc}); install libbpf1 (Debian/Ubuntu) or libbpf"
            ) from None
        for name, (restype, argtypes) in _PROTOTYPES.items():
            try:
                func = getattr(lib, name)
            except AttributeError:
                raise LibbpfMissingError(
                    f"libbpf.so.1 lacks {name}: libbpf >= 1.0 is required"
                ) from None
            func.restype = restype
            func.argtypes = argtypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.vsnprintf.restype = ctypes.c_int
        libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                   ctypes.c_void_p]  # fmt: skip
        _libc = libc
        _print_cb = _PRINT_FN(_on_libbpf_print)
        lib.libbpf_set_print(_print_cb)
        _lib = lib
        return lib


def lib() -> ctypes.CDLL:
    """The loaded ``libbpf.so.1``; raises LibbpfMissingError when it is not installed."""
    return _lib if _lib is not None else _load()


def available() -> tuple[bool, str]:
    """Whether libbpf can be loaded, and why not."""
    try:
        lib()
    except LibbpfMissingError as exc:
        return False, str(exc)
    return True, "libbpf.so.1 loaded"


def _check(ret: int, op: str) -> int:
    """Turn libbpf's ``-errno`` convention into BpfError; pass through results >= 0."""
    if ret < 0:
        raise BpfError(-ret, op)
    return ret


def _check_ptr(ptr: int | None, op: str, detail: str = "") -> int:
    if not ptr:
        err = ctypes.get_errno() or errno.EINVAL  # libbpf did not say
        raise BpfError(err, op, detail)
    return ptr


def _recent_warnings(limit: int = 30) -> str:
    lines = list(_recent)[-limit:]
    return "\n".join(lines)


# --- ids, fds, pins, info ---------------------------------------------------


def map_get_next_id(start_id: int) -> int | None:
    """The id of the next loaded map after ``start_id``; None when there is none."""
    nxt = ctypes.c_uint32(0)
    ret = lib().bpf_map_get_next_id(start_id, ctypes.byref(nxt))
    if ret == -errno.ENOENT:  # end of the id space
        return None
    _check(ret, "bpf_map_get_next_id")
    return nxt.value


def map_fd_by_id(map_id: int) -> int:
    """A new fd for the map with this id (caller closes)."""
    return _check(lib().bpf_map_get_fd_by_id(map_id), f"bpf_map_get_fd_by_id({map_id})")


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd for the program with this id (caller closes)."""
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id({prog_id})")


BPF_F_RDONLY = 1 << 3


class _ObjGetOpts(ctypes.Structure):
    _fields_ = (("sz", ctypes.c_size_t), ("file_flags", ctypes.c_uint32))


def obj_get(path: str, readonly: bool = False) -> int:
    """A new fd for the object pinned at ``path`` in a bpffs (caller closes).

    ``readonly`` opens the pin O_RDONLY-like (BPF_F_RDONLY), which is all a
    scan needs: the kernel checks the pin file's mode against the flags
    (bpf_obj_get_user), and preloaded pins such as maps.debug are 0400.
    """
    if not readonly:
        return _check(lib().bpf_obj_get(os.fsencode(path)), f"bpf_obj_get({path})")
    opts = _ObjGetOpts(ctypes.sizeof(_ObjGetOpts), BPF_F_RDONLY)
    return _check(lib().bpf_obj_get_opts(os.fsencode(path), ctypes.byref(opts)),
                  f"bpf_obj_get({path})")


def obj_pin(fd: int, path: str) -> None:
    """Pin the object behind ``fd`` at ``path`` (which must be inside a bpffs)."""
    _check(lib().bpf_obj_pin(fd, os.fsencode(path)), f"bpf_obj_pin({path})")


class _BpfMapInfo(ctypes.Structure):
    """``struct bpf_map_info`` up to ``map_extra``; the kernel accepts a shorter struct."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    )


class _BpfProgInfo(ctypes.Structure):
    """``struct bpf_prog_info`` up to ``attach_btf_id`` (libbpf 1.1's uapi)."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
        ("attach_btf_obj_id", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


@dataclass(frozen=True)
class RawMapInfo:
    """What ``BPF_OBJ_GET_INFO_BY_FD`` says about a map."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str


@dataclass(frozen=True)
class RawProgInfo:
    """What ``BPF_OBJ_GET_INFO_BY_FD`` says about a program (the fields sockguard uses)."""

    type: int
    id: int
    name: str
    run_time_ns: int = 0  # with kernel.bpf_stats_enabled = 1 only
    run_cnt: int = 0


def _get_info(fd: int, info: ctypes.Structure, op: str) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), op)


def fd_kind(fd: int) -> str:
    """What kind of bpf object ``fd`` refers to: "map", "prog", "link", "btf" or "".

    BPF_OBJ_GET_INFO_BY_FD dispatches on the fd's type and fills whatever
    struct it is given, so asking for map info on a program fd "succeeds"
    with garbage; the anon inode's name tells them apart.
    """
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
    kinds = {
        "anon_inode:bpf-map": "map",
        "anon_inode:bpf-prog": "prog",
        "anon_inode:bpf_link": "link",
        "anon_inode:btf": "btf",
    }
    return kinds.get(target, "")


def map_info(fd: int) -> RawMapInfo:
    """Type, id, sizes and name of the map behind ``fd``.

    Raises BpfError(EINVAL) when ``fd`` is not a map (for instance a pinned program).
    """
    kind = fd_kind(fd)
    if kind != "map":
        raise BpfError(
            errno.EINVAL, f"bpf_obj_get_info_by_fd: fd {fd} is a {kind or 'non-bpf'} fd, not a map"
        )
    info = _BpfMapInfo()
    _get_info(fd, info, "bpf_obj_get_info_by_fd(map)")
    return RawMapInfo(
        type=info.type,
        id=info.id,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        map_flags=info.map_flags,
        name=info.name.decode(errors="replace"),
    )


def prog_info(fd: int) -> RawProgInfo:
    """Type, id and name of the program behind ``fd``."""
    kind = fd_kind(fd)
    if kind != "prog":
        raise BpfError(
            errno.EINVAL, f"bpf_obj_get_info_by_fd: fd {fd} is a {kind or 'non-bpf'} fd, not a prog"
        )
    info = _BpfProgInfo()
    _get_info(fd, info, "bpf_obj_get_info_by_fd(prog)")
    return RawProgInfo(type=info.type, id=info.id, name=info.name.decode(errors="replace"),
                       run_time_ns=info.run_time_ns, run_cnt=info.run_cnt)


# --- maps ---------------------------------------------------------------------


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    """Create a map and return its fd (caller closes); ``name`` is cut to 15 bytes."""
    raw = name.encode()[: BPF_OBJ_NAME_LEN - 1]
    ret = lib().bpf_map_create(map_type, raw, key_size, value_size, max_entries, None)
    return _check(ret, f"bpf_map_create({name})")


def map_get_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after ``key`` (the first key when ``key`` is None); None at the end.

    When ``key`` is not in the map, hash-type maps return their first key
    again (htab_map_get_next_key, sock_hash_get_next_key): callers walking a
    map that changes underneath must guard against restarts.
    """
    out = ctypes.create_string_buffer(key_size)
    ret = lib().bpf_map_get_next_key(fd, key, out)
    if ret == -errno.ENOENT:  # no next key
        return None
    _check(ret, "bpf_map_get_next_key")
    return out.raw


class KeyCursor:
    """``map_get_next_key`` for one walk: one reused output buffer and a bound function,
    since a walk of a full map makes 65,535 calls and the per-call buffer cost a third.
    ``collect`` walks a chunk of keys per native call where ``keywalk`` is built."""

    def __init__(self, fd: int, key_size: int, *, chunk: int = 4096) -> None:
        self._fd = fd
        self._out = ctypes.create_string_buffer(key_size)
        self._next = lib().bpf_map_get_next_key
        self._native = (keywalk.NativeWalk(fd, key_size, chunk) if keywalk.available()[0]
                        else None)

    @property
    def native(self) -> bool:
        """Whether ``collect`` walks in the native loop."""
        return self._native is not None

    def next(self, key: bytes | None) -> bytes | None:
        """The key after ``key`` (the first when None); None at the end (see map_get_next_key)."""
        ret = self._next(self._fd, key, self._out)
        if ret == 0:
            return self._out.raw
        if ret == -errno.ENOENT:
            return None
        _check(ret, "bpf_map_get_next_key")
        return None  # not reached: libbpf returns 0 or -errno, and _check raised

    def collect(self, key: bytes | None, seen: dict[bytes, bytes], fresh: list[bytes],
                limit: int, known: dict[bytes, bytes] | None = None
                ) -> tuple[bytes | None, int, bool]:
        """Walk on from ``key`` adding each key not in ``seen`` to it (as key -> key) and to
        ``fresh``, with no Python call per key but the kernel's (the walk of a full map is
        most of an audit's CPU).  A key in ``known`` (an earlier walk's ``seen``) is handed
        out as that walk's object, not a new one.

        Returns (where it stopped, calls made, whether that key is a repeat): (None, n,
        False) at the end of the map; (a key already in ``seen``, n, True); or, once
        ``limit`` calls are made, (the last key added, n, False).
        """
        if self._native is not None:
            return self._collect_native(self._native, key, seen, fresh, limit, known or {})
        get_next, fd, out = self._next, self._fd, self._out
        same = (known or {}).get
        calls = 0
        while calls < limit:
            ret = get_next(fd, key, out)
            calls += 1
            if ret == 0:
                raw = out.raw
                key = same(raw, raw)
                if key in seen:
                    return key, calls, True
                seen[key] = key
                fresh.append(key)
            elif ret == -errno.ENOENT:
                return None, calls, False
            else:
                _check(ret, "bpf_map_get_next_key")
        return key, calls, False

    @staticmethod
    def _collect_native(walk: keywalk.NativeWalk, key: bytes | None, seen: dict[bytes, bytes],
                        fresh: list[bytes], limit: int, known: dict[bytes, bytes]
                        ) -> tuple[bytes | None, int, bool]:
        """``collect`` a native chunk at a time; the calls counted are the kernel's, keys
        walked past a repeat included (they bound the walk's work)."""
        same = known.get
        calls = 0
        while calls < limit:
            keys, ret = walk.step(key, limit - calls)
            calls += len(keys) + (ret != keywalk.FILLED)
            if known:
                keys = [same(k, k) for k in keys]
            unique = dict(zip(keys, keys, strict=True))
            if len(unique) == len(keys) and seen.keys().isdisjoint(unique):
                seen.update(unique)
                fresh.extend(keys)
            else:  # the walk restarted at the first bucket: stop at its first repeat
                for k in keys:
                    if k in seen:
                        return k, calls, True
                    seen[k] = k
                    fresh.append(k)
            if ret == keywalk.END:
                return None, calls, False
            if ret != keywalk.FILLED:
                _check(ret, "bpf_map_get_next_key")
            if keys:
                key = keys[-1]
        return key, calls, False


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under ``key``, or None when the key is absent (ENOENT)."""
    out = ctypes.create_string_buffer(value_size)
    ret = lib().bpf_map_lookup_elem(fd, key, out)
    if ret == -errno.ENOENT:
        return None
    _check(ret, "bpf_map_lookup_elem")
    return out.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Store ``value`` under ``key``; for sockmap/sockhash the value is a socket fd (i32)."""
    _check(lib().bpf_map_update_elem(fd, key, value, flags), "bpf_map_update_elem")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; False when it was not there (ENOENT)."""
    ret = lib().bpf_map_delete_elem(fd, key)
    if ret == -errno.ENOENT:
        return False
    _check(ret, "bpf_map_delete_elem")
    return True


# --- programs -----------------------------------------------------------------


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to ``target_fd`` (a cgroup, or a sockmap/sockhash).

    Works for sockmaps since kernel 6.0 (sock_map_bpf_prog_query) and reports
    programs attached by link as well as by ``bpf_prog_attach``.
    """
    cnt = 64
    while True:
        ids = (ctypes.c_uint32 * cnt)()
        n = ctypes.c_uint32(cnt)
        flags = ctypes.c_uint32(0)
        ret = lib().bpf_prog_query(
            target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(n)
        )
        if ret == -errno.ENOSPC and cnt < 1 << 16:  # more programs than slots
            cnt *= 4
            continue
        _check(ret, f"bpf_prog_query(attach_type={attach_type})")
        return list(ids[: n.value])


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    """Legacy ``BPF_PROG_ATTACH``: it outlives the process, so pair it with prog_detach."""
    _check(lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "bpf_prog_attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """Undo a legacy ``prog_attach`` of this program."""
    _check(lib().bpf_prog_detach2(prog_fd, target_fd, attach_type), "bpf_prog_detach2")


class _BpfIterLinkInfo(ctypes.Union):
    """``union bpf_iter_link_info``: only ``.map.map_fd`` is used; padded to 16 bytes."""

    _fields_ = (("map_fd", ctypes.c_uint32), ("_raw", ctypes.c_uint64 * 2))


class _BpfIterAttachOpts(ctypes.Structure):
    """``struct bpf_iter_attach_opts`` (libbpf.h)."""

    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("link_info", ctypes.POINTER(_BpfIterLinkInfo)),
        ("link_info_len", ctypes.c_uint32),
    )


class _BpfLinkCreateOpts(ctypes.Structure):
    """``struct bpf_link_create_opts`` of libbpf 1.1 (bpf.h); the trailing union is 32 bytes."""

    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("flags", ctypes.c_uint32),
        ("iter_info", ctypes.c_void_p),
        ("iter_info_len", ctypes.c_uint32),
        ("target_btf_id", ctypes.c_uint32),
        ("_union", ctypes.c_uint64 * 4),
    )


class _BpfTestRunOpts(ctypes.Structure):
    """``struct bpf_test_run_opts`` of libbpf 1.1 (bpf.h)."""

    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    )


class TestRun:
    """Runs one program with ``BPF_PROG_TEST_RUN`` on packets of one size, many times.

    The opts and the buffers are made once: a caller that runs the program
    once per map key (tens of thousands of times) pays only the syscall.
    """

    def __init__(self, prog_fd: int, size: int) -> None:
        self.prog_fd = prog_fd
        self.size = size
        self._in = ctypes.create_string_buffer(size)
        self._out = ctypes.create_string_buffer(size)
        self._opts = _BpfTestRunOpts()
        self._opts.sz = ctypes.sizeof(self._opts)
        self._opts.data_in = ctypes.cast(self._in, ctypes.c_void_p)
        self._opts.data_out = ctypes.cast(self._out, ctypes.c_void_p)
        self._opts.data_size_in = size
        self._opts.repeat = 1
        self._run = lib().bpf_prog_test_run_opts
        self._ref = ctypes.byref(self._opts)
        #: The input packet, written in place by callers that change a few bytes per run.
        self.packet = memoryview(self._in).cast("B")
        self._out_view = memoryview(self._out).cast("B")

    def run(self) -> tuple[int, memoryview]:
        """The program's return value and :attr:`packet` as the program left it.

        The returned view is the output buffer itself, valid until the next run:
        a caller that needs nothing from a run (its return value says so) copies
        nothing.
        """
        self._opts.data_size_out = self.size
        ret = self._run(self.prog_fd, self._ref)
        if ret < 0:
            raise BpfError(-ret, "bpf_prog_test_run_opts")
        return self._opts.retval, self._out_view[: self._opts.data_size_out]


class Link:
    """An attachment that ends when destroyed (or when its last fd closes).

    Wraps either a libbpf ``struct bpf_link *`` or a bare link fd from
    ``bpf_link_create``.
    """

    def __init__(self, *, ptr: int | None = None, fd: int | None = None) -> None:
        self._ptr = ptr
        self._fd = fd
        self._destroyed = False

    @property
    def fd(self) -> int:
        if self._destroyed:
            raise BpfError(errno.EBADF, "link already destroyed")
        if self._ptr is not None:
            return int(lib().bpf_link__fd(self._ptr))
        assert self._fd is not None
        return self._fd

    def destroy(self) -> None:
        """Detach and free the link; calling it again does nothing."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._ptr is not None:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None
        elif self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


class Program:
    """A program of a loaded :class:`BpfObject` (valid while the object is open)."""

    def __init__(self, ptr: int, name: str) -> None:
        self._ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return _check(lib().bpf_program__fd(self._ptr), f"bpf_program__fd({self.name})")

    def set_autoload(self, autoload: bool) -> None:
        """Include or leave out this program when its object is loaded (before load).

        A program the kernel would refuse (fentry where trampolines are not
        allowed, a helper an older kernel lacks) must be left out, or the
        whole object fails to load.
        """
        ret = lib().bpf_program__set_autoload(self._ptr, autoload)
        if ret < 0:
            raise BpfError(-ret, f"bpf_program__set_autoload({self.name})")

    def attach(self) -> Link:
        """Attach by section name (kprobe/..., tp_btf/..., raw_tp/..., fexit/...)."""
        ptr = lib().bpf_program__attach(self._ptr)
        return Link(ptr=_check_ptr(ptr, f"attach {self.name}"))

    def attach_cgroup(self, cgroup_fd: int) -> Link:
        """Attach (sockops, cgroup_skb, ...) to the cgroup v2 dir ``cgroup_fd`` by link."""
        ptr = lib().bpf_program__attach_cgroup(self._ptr, cgroup_fd)
        return Link(ptr=_check_ptr(ptr, f"bpf_program__attach_cgroup({self.name})"))

    def attach_iter_map(self, map_fd: int) -> Link:
        """Attach a map iterator (``iter/bpf_map_elem``, ``iter/sockmap``) to one map."""
        info = _BpfIterLinkInfo()
        info.map_fd = map_fd
        opts = _BpfIterAttachOpts()
        opts.sz = ctypes.sizeof(opts)
        opts.link_info = ctypes.pointer(info)
        opts.link_info_len = ctypes.sizeof(info)
        ptr = lib().bpf_program__attach_iter(self._ptr, ctypes.byref(opts))
        return Link(ptr=_check_ptr(ptr, f"bpf_program__attach_iter({self.name})"))

    def attach_iter(self) -> Link:
        """Attach an iterator that takes no target (``iter/tcp``, ``iter/task``, ...)."""
        ptr = lib().bpf_program__attach_iter(self._ptr, None)
        return Link(ptr=_check_ptr(ptr, f"bpf_program__attach_iter({self.name})"))

    def attach_to_map(self, map_fd: int, attach_type: int) -> Link:
        """Attach an sk_msg/sk_skb program to a sockmap/sockhash with a link.

        BPF_LINK_TYPE_SOCKMAP exists since kernel 6.10; unlike ``bpf_prog_attach``
        the attachment goes away with the link.
        """
        opts = _BpfLinkCreateOpts()
        opts.sz = ctypes.sizeof(opts)
        ret = lib().bpf_link_create(self.fd, map_fd, attach_type, ctypes.byref(opts))
        return Link(fd=_check(ret, f"bpf_link_create({self.name}, type={attach_type})"))


class Map:
    """A map of a :class:`BpfObject`."""

    def __init__(self, ptr: int, name: str) -> None:
        self._ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return _check(lib().bpf_map__fd(self._ptr), f"bpf_map__fd({self.name})")


# enum btf_kind (include/uapi/linux/btf.h)
BTF_KIND_INT = 1
BTF_KIND_ARRAY = 3
BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_ENUM = 6
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15
BTF_KIND_ENUM64 = 19


class _BtfType(ctypes.Structure):
    """``struct btf_type``: kind-specific records follow it (members, var_secinfo)."""

    _fields_ = (("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32),
                ("size_or_type", ctypes.c_uint32))


class _BtfEntry(ctypes.Structure):
    """``struct btf_member`` (name_off, type, offset) or ``btf_var_secinfo`` (type, offset,
    size): three u32 either way."""

    _fields_ = (("a", ctypes.c_uint32), ("b", ctypes.c_uint32), ("c", ctypes.c_uint32))


@dataclass(frozen=True)
class BtfMember:
    """A struct/union member, or a variable of a DATASEC; ``bit_offset`` from the start."""

    name: str
    type_id: int
    bit_offset: int


@dataclass(frozen=True)
class BtfType:
    """One BTF type: ``ref`` is the size (INT, STRUCT, DATASEC...) or the referenced type id
    (VAR, PTR, TYPEDEF, CONST...), as in ``struct btf_type``."""

    kind: int
    name: str
    ref: int
    members: tuple[BtfMember, ...] = ()


class Btf:
    """The BTF of an opened :class:`BpfObject` (valid while the object is open).

    Reading it needs no privilege: libbpf parses the ELF at open, and fixes up
    the DATASEC sizes and offsets that clang leaves 0.
    """

    def __init__(self, ptr: int, path: str) -> None:
        self._ptr = ptr
        self.path = path

    def find(self, name: str, kind: int) -> int | None:
        """The id of the type ``name`` of ``kind``; None when there is none."""
        ret = lib().btf__find_by_name_kind(self._ptr, name.encode(), kind)
        return ret if ret > 0 else None

    def type(self, type_id: int) -> BtfType:
        """The type ``type_id``, with its members for STRUCT, UNION and DATASEC."""
        ptr = _check_ptr(lib().btf__type_by_id(self._ptr, type_id),
                         f"{self.path}: btf__type_by_id({type_id})")
        raw = _BtfType.from_address(ptr)
        kind, vlen = (raw.info >> 24) & 0x1F, raw.info & 0xFFFF
        members: tuple[BtfMember, ...] = ()
        if kind in (BTF_KIND_STRUCT, BTF_KIND_UNION, BTF_KIND_DATASEC):
            entries = (_BtfEntry * vlen).from_address(ptr + ctypes.sizeof(_BtfType))
            if kind == BTF_KIND_DATASEC:  # name of the VAR, offset in bytes
                members = tuple(BtfMember(self.type(e.a).name, e.a, e.b * 8) for e in entries)
            else:  # kind_flag: bitfield size in the top 8 bits of the offset
                mask = 0xFFFFFF if raw.info >> 31 else 0xFFFFFFFF
                members = tuple(BtfMember(self._name(e.a), e.b, e.c & mask) for e in entries)
        return BtfType(kind, self._name(raw.name_off), raw.size_or_type, members)

    def resolve_size(self, type_id: int) -> int:
        """The size in bytes of ``type_id`` (through typedefs, modifiers and arrays)."""
        return _check(int(lib().btf__resolve_size(self._ptr, type_id)),
                      f"{self.path}: btf__resolve_size({type_id})")

    def resolve_type(self, type_id: int) -> int:
        """``type_id`` without its typedefs and const/volatile modifiers."""
        return _check(lib().btf__resolve_type(self._ptr, type_id),
                      f"{self.path}: btf__resolve_type({type_id})")

    def _name(self, offset: int) -> str:
        name = lib().btf__name_by_offset(self._ptr, offset)
        return name.decode() if name else ""


class BpfObject:
    """An opened (then loaded) BPF ELF object; closing it closes its programs and maps.

    Links created from its programs stay valid after close: the kernel keeps
    the program alive as long as a link refers to it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        _recent.clear()
        ptr = lib().bpf_object__open_file(os.fsencode(self.path), None)
        self._ptr: int | None = _check_ptr(
            ptr, f"bpf_object__open_file({self.path})", _recent_warnings()
        )
        self.loaded = False

    def _obj(self) -> int:
        if self._ptr is None:
            raise BpfError(errno.EBADF, f"{self.path}: object is closed")
        return self._ptr

    def _map_ptr(self, name: str) -> int:
        ptr = lib().bpf_object__find_map_by_name(self._obj(), name.encode())
        return _check_ptr(ptr, f"{self.path}: no map {name!r}")

    def rodata(self) -> bytes:
        """The current initial image of ``.rodata`` (its ``const volatile`` globals)."""
        size = ctypes.c_size_t(0)
        ptr = lib().bpf_map__initial_value(self._map_ptr(".rodata"), ctypes.byref(size))
        _check_ptr(ptr, f"{self.path}: bpf_map__initial_value(.rodata)")
        return ctypes.string_at(ptr, size.value)

    def set_rodata(self, data: bytes) -> None:
        """Replace ``.rodata`` before load; ``data`` must be exactly the section's size."""
        if self.loaded:
            raise BpfError(errno.EBUSY, f"{self.path}: set_rodata after load")
        ret = lib().bpf_map__set_initial_value(self._map_ptr(".rodata"), data, len(data))
        _check(ret, f"{self.path}: bpf_map__set_initial_value(.rodata, {len(data)} bytes)")

    def reuse_map(self, name: str, fd: int) -> None:
        """Before load: make map ``name`` the existing map ``fd`` instead of creating it.

        Several objects then share one map (``bpf_map__reuse_fd``); its type,
        key/value sizes and max_entries must be those the object declares.
        libbpf keeps a dup of ``fd``: the caller still owns (and closes) its own.
        """
        if self.loaded:
            raise BpfError(errno.EBUSY, f"{self.path}: reuse_map after load")
        ret = lib().bpf_map__reuse_fd(self._map_ptr(name), fd)
        _check(ret, f"{self.path}: bpf_map__reuse_fd({name})")

    def load(self) -> Self:
        """Create the maps, apply CO-RE relocations and verify the programs."""
        _recent.clear()
        ret = lib().bpf_object__load(self._obj())
        if ret < 0:
            raise BpfError(-ret, f"bpf_object__load({self.path})", _recent_warnings())
        self.loaded = True
        return self

    def btf(self) -> Btf:
        """The object's own BTF (its structs and the layout of its data sections)."""
        ptr = lib().bpf_object__btf(self._obj())
        return Btf(_check_ptr(ptr, f"{self.path}: no BTF"), self.path)

    def program_names(self) -> list[str]:
        """Every program of the object, in ELF order."""
        names: list[str] = []
        ptr = lib().bpf_object__next_program(self._obj(), None)
        while ptr:
            names.append(lib().bpf_program__name(ptr).decode())
            ptr = lib().bpf_object__next_program(self._obj(), ptr)
        return names

    def program(self, name: str) -> Program:
        ptr = lib().bpf_object__find_program_by_name(self._obj(), name.encode())
        return Program(_check_ptr(ptr, f"{self.path}: no program {name!r}"), name)

    def map(self, name: str) -> Map:
        return Map(self._map_ptr(name), name)

    def close(self) -> None:
        """Free the object and close its fds; idempotent."""
        if self._ptr is not None:
            lib().bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def iter_read(link: Link) -> bytes:
    """Run an iterator link once and return everything it wrote.

    Each ``bpf_iter_create`` starts a fresh walk; the read returns 0 at the end.
    """
    return iter_read_fd(iter_create(link))


def iter_create(link: Link) -> int:
    """A new iterator fd of ``link`` (a fresh walk); the caller reads it with ``iter_read_fd``.

    Iterators over network objects (``iter/tcp``) walk the network namespace
    of the calling thread at this moment.
    """
    return _check(lib().bpf_iter_create(link.fd), "bpf_iter_create")


def iter_read_fd(fd: int) -> bytes:
    """Read an iterator fd to its end and close it."""
    chunks: list[bytes] = []
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except InterruptedError:
                continue
            except OSError as exc:
                raise BpfError(exc.errno or errno.EIO, "read(bpf_iter)") from None
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)
