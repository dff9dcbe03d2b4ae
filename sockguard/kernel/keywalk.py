"""The native get_next_key loop (``keywalk.c``, built into ``_keywalk.so`` with the package).

A full sockhash is walked one syscall per key; from Python each call costs a ctypes
round trip as large as the syscall, and the walk is half of every audit's CPU on a
node where the map iterator is refused.  The loop in C walks a chunk of keys per call.
Where the library was not built (``SOCKGUARD_SKIP_BPF``), ``libbpf.KeyCursor`` walks
from Python instead: slower, never different.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

LIBRARY = Path(__file__).resolve().with_name("_keywalk.so")

#: sg_walk_keys returns: the chunk filled, the end of the map, or -errno.
FILLED, END = 0, 1


@functools.cache
def _load() -> tuple[Callable[..., int] | None, str]:
    if not LIBRARY.is_file():
        return None, (f"{LIBRARY.name} not built (package built with SOCKGUARD_SKIP_BPF or "
                      "without clang): keys are walked from Python, ~2x slower")
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError as exc:
        return None, f"{LIBRARY.name} does not load ({exc}): keys are walked from Python"
    walk = lib.sg_walk_keys
    walk.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p,
                     ctypes.c_uint, ctypes.POINTER(ctypes.c_uint)]
    walk.restype = ctypes.c_int
    native: Callable[..., int] = walk
    return native, f"native get_next_key loop ({LIBRARY.name})"


def available() -> tuple[bool, str]:
    """Whether the native loop is there, and a line saying which walk is used."""
    walk, why = _load()
    return walk is not None, why


class NativeWalk:
    """One walk's native calls: a reused output buffer of ``chunk`` keys."""

    def __init__(self, fd: int, key_size: int, chunk: int) -> None:
        walk, why = _load()
        if walk is None:
            raise RuntimeError(why)
        self._walk = walk
        self._fd = fd
        self._key_size = key_size
        self.chunk = chunk
        self._out = ctypes.create_string_buffer(key_size * chunk)
        self._walked = ctypes.c_uint()

    def step(self, key: bytes | None, limit: int) -> tuple[list[bytes], int]:
        """The keys after ``key`` (from the first when None), at most ``limit`` and at most
        ``chunk``, and the call's status: FILLED, END or -errno (after the keys it got)."""
        size = self._key_size
        ret = self._walk(self._fd, key, size, self._out, min(limit, self.chunk),
                         ctypes.byref(self._walked))
        raw = ctypes.string_at(self._out, self._walked.value * size)
        return [raw[i:i + size] for i in range(0, len(raw), size)], ret
