"""service/signals.py: handlers installed for SIGTERM/SIGINT while a block runs, called on a
real signal, the previous ones restored after it; nothing installed outside the main thread."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from service import signals

pytestmark = pytest.mark.unit


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_handler_is_called_on_sigterm_and_the_previous_one_restored():
    received = []
    before = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}
    with signals.handling(lambda signum, frame: received.append(signum)) as installed:
        assert installed is True
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: received == [signal.SIGTERM])
    assert {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS} == before


def test_previous_handlers_are_restored_when_the_block_raises():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(RuntimeError), signals.handling(lambda *a: None):
            assert signal.getsignal(signal.SIGTERM) is not mine
            raise RuntimeError("boom")
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stopping_sets_the_event_and_logs(caplog):
    import logging

    stop = threading.Event()
    log = logging.getLogger("test_signals")
    with caplog.at_level(logging.INFO, logger="test_signals"), signals.stopping(stop, log):
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(stop.is_set)
    assert "received SIGINT; stopping" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_nothing_is_installed():
    seen = {}

    def run():
        before = signal.getsignal(signal.SIGTERM)
        with signals.handling(lambda *a: None) as installed:
            seen["installed"] = installed
            seen["unchanged"] = signal.getsignal(signal.SIGTERM) is before
        seen["previous"] = signals.install(lambda *a: None)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == {"installed": False, "unchanged": True, "previous": {}}
