"""Talking to systemd: sd_notify messages and journald logging with structured fields.

Why both paths everywhere: systemd-python (``from systemd import daemon,
journal``) is an optional extra, because it needs libsystemd headers to build.
When it is importable it is used (libsystemd's own sd_notify and
sd_journal_send); when it is not, the two protocols are small enough to speak
directly with the ``socket`` module:

- sd_notify: one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named
  by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace).
- journald's native protocol: one datagram to /run/systemd/journal/socket of
  ``KEY=VALUE\\n`` fields, or ``KEY\\n<u64 LE length><bytes>\\n`` for values
  holding a newline.

So ``Type=notify`` works with a bare ``NOTIFY_SOCKET`` (the tests bind one)
and ``journalctl -u sockguard SOCKGUARD_KIND=stale`` works either way.  Off
systemd (no ``NOTIFY_SOCKET``, no ``JOURNAL_STREAM``) notifications are no-ops
and logs go to stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from sockguard.core.escape import printable

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "sockguard"
#: Record attributes with this prefix become journal fields (``extra={...}``).
FIELD_PREFIX = "SOCKGUARD_"
_MAX_MESSAGE = 64 * 1024


def _systemd_module(name: str) -> ModuleType | None:
    """``systemd.<name>`` from systemd-python, or None: imported lazily, optional."""
    try:
        return importlib.import_module(f"systemd.{name}")
    except ImportError:
        return None


# -- sd_notify --------------------------------------------------------------------------


class Notifier:
    """Sends sd_notify state lines; a no-op when not started by systemd (no NOTIFY_SOCKET).

    ``use_library=False`` forces the socket-module implementation (tests use
    it to check both paths reach the same socket).
    """

    def __init__(self, env: Mapping[str, str] | None = None, use_library: bool = True) -> None:
        env = os.environ if env is None else env
        self.socket_path = env.get("NOTIFY_SOCKET") or None
        self._lib = _systemd_module("daemon") if use_library and env is os.environ else None
        self._watchdog = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    @property
    def watchdog_seconds(self) -> float | None:
        """systemd's WatchdogSec for us (WATCHDOG_USEC, if WATCHDOG_PID is ours), else None."""
        return self._watchdog

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one message; False when there is no one to tell or it failed."""
        if self.socket_path is None:
            return False
        message = "\n".join(lines)
        if self._lib is not None:
            return bool(self._lib.notify(message))
        return _raw_notify(self.socket_path, message)


def _raw_notify(path: str, message: str) -> bool:
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), addr)
    except OSError:
        return False
    return True


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. our parent)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs, for RELOADING=1's MONOTONIC_USEC= (systemd >= 253)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# -- journald ---------------------------------------------------------------------------


Sender = Callable[[dict[str, str]], None]


def encode_journal_fields(fields: Mapping[str, str]) -> bytes:
    """journald's native protocol: one datagram holding every field."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class NativeJournalSender:
    """Writes journal entries with the native protocol (no libsystemd needed)."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def __call__(self, fields: dict[str, str]) -> None:
        self._sock.sendto(encode_journal_fields(fields), self.path)

    def close(self) -> None:
        self._sock.close()


def _library_sender() -> Sender | None:
    journal = _systemd_module("journal")
    if journal is None:
        return None

    def send(fields: dict[str, str]) -> None:
        rest = dict(fields)
        message = rest.pop("MESSAGE")
        # systemd.journal.send formats CODE_LINE with {:d}: a str raises ValueError, and
        # every record would end up as a "Logging error" on stderr instead of the journal.
        line = rest.pop("CODE_LINE", "")
        journal.send(message, CODE_LINE=int(line) if line.isdigit() else None, **rest)

    return send


def _valid_field(name: str) -> bool:
    return bool(name) and not name[0].isdigit() and name[0] != "_" and all(
        c.isupper() or c.isdigit() or c == "_" for c in name
    )


class JournaldHandler(logging.Handler):
    """A logging handler writing to journald with sockguard's structured fields.

    Only attributes named ``SOCKGUARD_*`` (given with ``extra=``) become fields,
    plus the usual PRIORITY, SYSLOG_IDENTIFIER, LOGGER, CODE_* and THREAD_NAME;
    unlike systemd-python's own JournalHandler it does not dump every record
    attribute into the journal.
    """

    def __init__(self, sender: Sender | None = None) -> None:
        super().__init__()
        chosen = sender or _library_sender()
        if chosen is None:
            chosen = NativeJournalSender()
        self.sender: Sender = chosen

    @staticmethod
    def priority(levelno: int) -> int:
        if levelno >= logging.CRITICAL:
            return 2
        if levelno >= logging.ERROR:
            return 3
        if levelno >= logging.WARNING:
            return 4
        if levelno >= logging.INFO:
            return 6
        return 7

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = self.format(record)[:_MAX_MESSAGE]
        fields = {
            "MESSAGE": message,
            "PRIORITY": str(self.priority(record.levelno)),
            "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
            "LOGGER": record.name,
            "THREAD_NAME": record.threadName or "",
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }
        for key, value in record.__dict__.items():
            if key.startswith(FIELD_PREFIX) and _valid_field(key) and value is not None:
                fields[key] = str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sender(self.fields(record))
        except Exception:
            self.handleError(record)


class StderrFormatter(logging.Formatter):
    """Plain lines for a terminal; structured fields appended as ``KEY=value``.

    Fields are appended so that off systemd (and in tests) the same facts
    are visible without journald.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s sockguard %(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return escaped_format(super(), record)


def escaped_format(formatter: Any, record: logging.LogRecord) -> str:
    """``formatter``'s line with the message and the SOCKGUARD_* fields escaped (escape.py).

    A process name with a newline or an ANSI escape (any task can set its own)
    must not forge a log line or repaint a terminal.  Only a traceback
    (``log.exception``) keeps its line breaks: it follows the escaped line.
    ``formatter`` is a ``logging.Formatter`` (or its ``super()`` proxy).
    """
    saved = record.msg, record.args
    record.msg, record.args = printable(record.getMessage()), None
    try:
        text: str = formatter.format(record)
    finally:
        record.msg, record.args = saved
    extra = " ".join(f"{k}={printable(str(v))}" for k, v in sorted(record.__dict__.items())
                     if k.startswith(FIELD_PREFIX))
    if not extra:
        return text
    head, nl, tail = text.partition("\n")  # the fields go on the message's own line
    return f"{head} [{extra}]{nl}{tail}"


class EscapingFormatter(logging.Formatter):
    """The CLI's ``sockguard: message`` lines, escaped like the daemon's."""

    def format(self, record: logging.LogRecord) -> str:
        return escaped_format(super(), record)


def journal_wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether systemd connected our stderr to the journal (``JOURNAL_STREAM``) and it listens."""
    env = os.environ if env is None else env
    return bool(env.get("JOURNAL_STREAM")) and os.path.exists(JOURNAL_SOCKET)


def make_log_handler(target: str) -> logging.Handler:
    """The handler for ``log.target``: "journal", "stderr" or "auto"."""
    use_journal = target == "journal" or (target == "auto" and journal_wanted())
    if use_journal:
        with contextlib.suppress(OSError):
            return JournaldHandler()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StderrFormatter())
    return handler
