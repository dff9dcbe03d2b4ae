"""SIGTERM, SIGINT and SIGHUP for the daemon's main thread, received without a lock.

A Python signal handler runs in the main thread between two bytecodes, wherever that
thread is, also inside ``threading.Event.wait``, ``clear`` or ``set`` while it holds
the event's ``Condition(Lock())`` (CPython ``Lib/threading.py``; the ``signal``
module's docs warn about exactly this).  A handler that calls ``Event.set()`` then
waits for a lock its own thread holds, and the daemon hangs until SIGKILL.  So the
handler here only stores what arrived; ``signal.set_wakeup_fd`` wakes the main
thread's ``select`` from C, before any Python code runs, and the main thread acts on
the signal in ordinary code, where taking locks is safe.

The inbox is installed by ``sockguard run`` before the daemon's modules are imported
and its config read, so a stop asked for during start-up is a clean stop (exit 0),
and a reload asked for then is moot (the config is being read anyway) instead of
killing the process.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
from types import FrameType
from typing import Any

#: The signals the daemon answers: SIGHUP reloads, the others stop.
HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


class SignalInbox:
    """What arrived, and a socket that wakes the main thread when something does."""

    def __init__(self) -> None:
        self._recv, self._send = socket.socketpair()
        self._recv.setblocking(False)
        self._send.setblocking(False)
        #: the first stop signal received, if any
        self.stop_signal: int | None = None
        self._reloads = 0  # written only by the handler
        self._reloads_taken = 0  # written only by the main thread
        self._previous: dict[int, Any] = {}
        self._previous_fd: int | None = None

    # -- the main thread ----------------------------------------------------------------

    def install(self) -> None:
        """Take over the signals (main thread only); a second call changes nothing."""
        if self._previous_fd is not None:
            return
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._previous_fd = signal.set_wakeup_fd(self._send.fileno(), warn_on_full_buffer=False)

    def restore(self) -> None:
        """Give the signals back to whoever had them before ``install``."""
        if self._previous_fd is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._previous_fd = None

    def wait(self, timeout: float) -> None:
        """Sleep until a signal or ``wake`` arrives, or ``timeout`` seconds pass."""
        if self.stop_signal is None and self._reloads == self._reloads_taken:
            select.select([self._recv], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while self._recv.recv(4096):
                pass

    def take_reload(self) -> bool:
        """Whether a SIGHUP came since the last call (several count as one)."""
        seen = self._reloads
        if seen == self._reloads_taken:
            return False
        self._reloads_taken = seen
        return True

    @property
    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    def close(self) -> None:
        """Restore the signals and release the socket; a second call changes nothing."""
        self.restore()
        self._recv.close()
        self._send.close()

    # -- any thread -----------------------------------------------------------------------

    def wake(self) -> None:
        """Wake ``wait`` from another thread (a full socket is already a wake-up)."""
        with contextlib.suppress(OSError):
            self._send.send(b"\0")

    # -- the handler: plain stores only, see the module docstring -----------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reloads += 1
        elif self.stop_signal is None:
            self.stop_signal = signum


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15: what the journal should say stopped the daemon."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
