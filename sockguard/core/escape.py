"""One escaping function for every text sockguard renders for a terminal or a log file.

Why: a process name (``comm``, up to 15 bytes any task can set with
``prctl(PR_SET_NAME)``), a pin path or a map name reaches the text table and
the stderr log lines.  A raw newline there forges a log line, an ANSI escape
repaints the terminal.  ``printable`` leaves ordinary text alone and writes
every control character (C0, DEL, C1) and the Unicode line and paragraph
separators as a visible escape: ``\\n``, ``\\r``, ``\\t``, ``\\x1b``,
``\\u2028``.  JSON output and journal fields are not passed through it: JSON
escapes control characters itself, and a journal field is a length-framed
value that cannot start another entry.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


#: str.translate table: every character that must not reach a terminal or log line raw.
_TABLE = {code: _escape_char(chr(code))
          for code in (*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)}


def printable(text: str) -> str:
    """``text`` with control characters escaped, so it stays one harmless line."""
    return text.translate(_TABLE)


__all__ = ["printable"]
