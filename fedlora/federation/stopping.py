"""Ctrl-C and SIGTERM stop a run within seconds, between two consistent states.

The signal handler only sets :data:`STOP`; the server's loops (waiting for nodes, for a
round's replies, between rounds) call :func:`check`, which raises :class:`Interrupted`.
So a run stops while it waits, never in the middle of writing its checkpoint and
metrics row, and the folder stays resumable. A second Ctrl-C raises KeyboardInterrupt
at once. Handlers can only be installed by the main thread, after Ray's own (Ray's
driver makes SIGTERM a bare ``sys.exit``); see :func:`fedlora.flower.simulation`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

STOP = threading.Event()
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as shells report it
FIRST_CTRL_C = (
    "\nstopping: the run stops once the clients' current round is in (the folder stays resumable); "
    "Ctrl-C again to stop now\n"
)


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C or SIGTERM)."""


class Signals:
    """The signal that asked the run to stop (None: none did)."""

    def __init__(self) -> None:
        self.received: int | None = None

    def handle(self, signum: int, frame: object) -> None:
        if STOP.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        STOP.set()
        if signum == signal.SIGINT:  # said at once: the stop itself waits for the server's next wait
            os.write(2, FIRST_CTRL_C.encode())

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 1) if self.received is not None else 0


def check() -> None:
    """Raise :class:`Interrupted` once a stop was asked for."""
    if STOP.is_set():
        raise Interrupted("stopped by a signal")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Signals]:
    """While inside, SIGINT and SIGTERM ask the run to stop (main thread only; elsewhere a no-op)."""
    signals = Signals()
    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    previous = {s: signal.signal(s, signals.handle) for s in EXIT_CODES}
    try:
        yield signals
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
