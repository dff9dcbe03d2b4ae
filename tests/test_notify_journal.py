"""The journal sender over systemd-python, as ``sockguard run`` uses it under systemd.

Found by tests/vm/run --systemd: ``systemd.journal.send`` formats CODE_LINE with
``{:d}``, so the string the handler builds made every record a logging error and
nothing structured reached the journal.  The library's last step (``sendv``) is
captured here instead of writing to a journal.
"""

from __future__ import annotations

import logging

import pytest

from sockguard.service import notify


def test_library_sender_writes_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    journal = pytest.importorskip("systemd.journal")
    sent: list[tuple[str, ...]] = []
    monkeypatch.setattr(journal, "sendv", lambda *args: sent.append(args))
    sender = notify._library_sender()
    assert sender is not None
    handler = notify.JournaldHandler(sender)
    record = logging.LogRecord("sockguard", logging.WARNING, "/x/daemon.py", 42,
                               "stale entry %s", ("k",), None)
    record.SOCKGUARD_KIND = "stale"
    handler.emit(record)  # emit() would swallow an error into handleError: check sent
    assert len(sent) == 1, "the record did not reach systemd.journal.sendv"
    fields = set(sent[0])
    assert {"MESSAGE=stale entry k", "CODE_LINE=42", "CODE_FILE=/x/daemon.py",
            "SOCKGUARD_KIND=stale", "PRIORITY=4"} <= fields
