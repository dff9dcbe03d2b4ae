"""libbpf's ring buffer consumer, for the tracer.

Kept in its own module (instead of growing ``libbpf.py``) because only the
tracer uses it: ``ring_buffer__new/add/poll/free``.

Why libbpf's consumer and not an mmap of our own: libbpf already handles the
producer/consumer positions, busy and discarded records and epoll across
several ring buffers; the callback is the only Python in the loop.

The ctypes callback object must outlive the ``struct ring_buffer``: it is
kept on the :class:`RingBuffer` and the C side is freed before it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from sockguard.kernel import libbpf
from sockguard.kernel.libbpf import BpfError

log = logging.getLogger(__name__)

SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "ring_buffer__new": (ctypes.c_void_p, [ctypes.c_int, SAMPLE_FN, ctypes.c_void_p,
                                           ctypes.c_void_p]),
    "ring_buffer__add": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, SAMPLE_FN,
                                        ctypes.c_void_p]),
    "ring_buffer__poll": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
    "ring_buffer__consume": (ctypes.c_int, [ctypes.c_void_p]),
    "ring_buffer__free": (None, [ctypes.c_void_p]),
}
_bound = False


def _lib() -> ctypes.CDLL:
    """libbpf with this module's prototypes set (once)."""
    global _bound
    lib = libbpf.lib()
    if not _bound:
        for name, (restype, argtypes) in _PROTOTYPES.items():
            func = getattr(lib, name)
            func.restype = restype
            func.argtypes = argtypes
        _bound = True
    return lib


Handler = Callable[[bytes], None]


class RingBuffer:
    """libbpf's ring buffer consumer over one or more BPF ring buffer maps.

    ``handler`` gets each record's bytes, in the thread that calls
    :meth:`poll`.  An exception in it is logged and the record dropped: it
    must never unwind through libbpf's C frames.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._cb = SAMPLE_FN(self._on_sample)  # referenced for the C side's lifetime
        self._ptr: int | None = None
        self.errors = 0

    def _on_sample(self, _ctx: int | None, data: int | None, size: int) -> int:
        try:
            if data:
                self._handler(ctypes.string_at(data, size))
        except Exception:
            self.errors += 1
            log.exception("ring buffer handler failed; record dropped")
        return 0

    def add(self, map_fd: int) -> None:
        """Consume the ring buffer map ``map_fd`` too."""
        lib = _lib()
        if self._ptr is None:
            ptr = lib.ring_buffer__new(map_fd, self._cb, None, None)
            if not ptr:
                raise BpfError(ctypes.get_errno() or errno.EINVAL, "ring_buffer__new")
            self._ptr = ptr
            return
        ret = lib.ring_buffer__add(self._ptr, map_fd, self._cb, None)
        if ret < 0:
            raise BpfError(-ret, "ring_buffer__add")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for records and handle them; how many were handled."""
        if self._ptr is None:
            raise BpfError(errno.EBADF, "ring buffer has no maps")
        ret: int = _lib().ring_buffer__poll(self._ptr, timeout_ms)
        if ret == -errno.EINTR:
            return 0  # a signal: the caller checks its stop flag
        if ret < 0:
            raise BpfError(-ret, "ring_buffer__poll")
        return ret

    def consume(self) -> int:
        """Handle whatever is queued now, without waiting."""
        if self._ptr is None:
            return 0
        ret: int = _lib().ring_buffer__consume(self._ptr)
        if ret < 0:
            raise BpfError(-ret, "ring_buffer__consume")
        return ret

    def close(self) -> None:
        """Free the consumer; idempotent."""
        if self._ptr is not None:
            _lib().ring_buffer__free(self._ptr)
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
