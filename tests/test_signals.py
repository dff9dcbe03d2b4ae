"""The daemon's signal inbox (sockguard/service/signals.py), in this process.

Real signals to this process; no root, no kernel objects.  The daemon as a process
under signals: test_daemon.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sockguard.service.signals import SignalInbox, signal_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def inbox() -> Iterator[SignalInbox]:
    box = SignalInbox()
    box.install()
    yield box
    box.close()


def _later(delay: float, act: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        act()

    t = threading.Thread(target=run)
    t.start()
    return t


def _kill_later(sig: int, delay: float) -> threading.Thread:
    return _later(delay, lambda: os.kill(os.getpid(), sig))


def test_a_stop_signal_wakes_the_wait_and_is_kept(inbox: SignalInbox) -> None:
    sender = _kill_later(signal.SIGTERM, 0.2)
    t0 = time.monotonic()
    inbox.wait(30)
    sender.join()
    assert time.monotonic() - t0 < 10, "the wake-up fd did not end the wait"
    assert inbox.stop_signal == signal.SIGTERM
    os.kill(os.getpid(), signal.SIGINT)  # a later stop signal does not replace the first
    assert inbox.stop_requested and inbox.stop_signal == signal.SIGTERM
    t0 = time.monotonic()
    inbox.wait(30)  # a stop already received: no sleeping at all
    assert time.monotonic() - t0 < 10


def test_sighups_wake_the_wait_and_count_as_one_reload(inbox: SignalInbox) -> None:
    assert not inbox.take_reload()
    sender = _kill_later(signal.SIGHUP, 0.2)
    t0 = time.monotonic()
    inbox.wait(30)
    sender.join()
    assert time.monotonic() - t0 < 10
    for _ in range(3):
        os.kill(os.getpid(), signal.SIGHUP)
    assert inbox.take_reload()
    assert not inbox.take_reload()
    assert not inbox.stop_requested


def test_wake_from_another_thread_ends_the_wait(inbox: SignalInbox) -> None:
    waker = _later(0.2, inbox.wake)
    t0 = time.monotonic()
    inbox.wait(30)
    waker.join()
    assert time.monotonic() - t0 < 10
    assert not inbox.stop_requested and not inbox.take_reload()


def test_restore_gives_the_signals_and_the_wakeup_fd_back() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}
    box = SignalInbox()
    box.install()
    box.install()  # a second install must not record its own handler as "previous"
    assert signal.getsignal(signal.SIGTERM) == box._on_signal
    box.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert signal.set_wakeup_fd(-1) == -1  # nothing left registered


def test_signal_names() -> None:
    assert signal_name(signal.SIGTERM) == "SIGTERM"
    assert signal_name(999) == "signal 999"


# A handler that takes a lock hangs the process when the signal lands while the main
# thread holds that lock.  The child holds the lock of every Event and Lock of a real
# Daemon and signals itself: with a locking handler it never prints.
_HOLD_EVERY_LOCK = textwrap.dedent("""
    import contextlib, os, signal, threading
    from sockguard.service.config import load_config
    from sockguard.service.daemon import Daemon

    d = Daemon(load_config(None))
    d.signals.install()
    locks = []
    for obj in (d, d.tracer, d.collision_gate):
        for value in vars(obj).values():
            if isinstance(value, threading.Event):
                locks.append(value._cond)
            elif isinstance(value, type(threading.Lock())):
                locks.append(value)
    with contextlib.ExitStack() as held:
        for lock in locks:
            held.enter_context(lock)
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
    print(len(locks), d.signals.stop_signal == signal.SIGTERM, d.signals.take_reload())
""")


def test_the_handler_takes_none_of_the_daemons_locks() -> None:
    try:
        out = subprocess.run([sys.executable, "-c", _HOLD_EVERY_LOCK], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the signal handler waited for a lock the main thread held")
    assert out.returncode == 0, out.stderr
    held, stopped, reload = out.stdout.split()
    assert int(held) >= 2, "the Daemon has no Event or Lock left to hold: test is stale"
    assert (stopped, reload) == ("True", "True")
