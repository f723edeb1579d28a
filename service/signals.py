"""Stop signals: one way to handle SIGTERM and SIGINT for a while, and give them back.

:func:`handling` installs a handler for SIGTERM and SIGINT (or the signals given) while a
block runs and restores the previous handlers when it ends, however it ends. Python lets
only the main thread install handlers, so anywhere else it installs nothing (the block runs
unchanged; the context yields False). :func:`stopping` is the common case: the handler sets
an event (and logs ``received SIGTERM; stopping``). :func:`install` and :func:`restore` are
the two halves, for an object that installs in one method and restores in another.

Users: the control API's, the native engine's and the TorchServe supervisor's
``run_forever``, the trainer's launcher (which forwards the signal to torchrun) and its
:class:`~service.training.recipe.StopRequest` (which records it).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Callable, Iterator

#: The signals that ask a process to stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Handler = Callable[[int, object], object]


def install(handler: Handler, signals: tuple[int, ...] = STOP_SIGNALS) -> dict[int, object]:
    """Install ``handler`` for ``signals``; the previous handlers, for :func:`restore`. In a
    thread other than the main one nothing is installed (an empty dict)."""
    previous: dict[int, object] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
    except BaseException:
        restore(previous)
        raise
    return previous


def restore(previous: dict[int, object]) -> None:
    """Put back the handlers :func:`install` replaced (one not set from Python: the default)."""
    for sig, handler in previous.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    previous.clear()


@contextlib.contextmanager
def handling(handler: Handler, signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[bool]:
    """``handler`` for ``signals`` while the block runs, the previous ones after it. Yields
    whether it installed anything (False outside the main thread)."""
    previous = install(handler, signals)
    try:
        yield bool(previous)
    finally:
        restore(previous)


def stopping(event: threading.Event, logger: logging.Logger | None = None,
             signals: tuple[int, ...] = STOP_SIGNALS):
    """:func:`handling` with a handler that sets ``event`` (after logging the signal's name on
    ``logger``, when one is given)."""

    def on_signal(signum, _frame):
        if logger is not None:
            logger.info("received %s; stopping", signal.Signals(signum).name)
        event.set()

    return handling(on_signal, signals)
