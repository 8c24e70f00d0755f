"""Ctrl-C and SIGTERM stop a run within seconds, between two consistent states.

The signal handler only sets :data:`STOP`; the server's loops (waiting for nodes, for a
round's replies, between rounds) call :func:`check`, which raises :class:`Interrupted`.
So a run stops while it waits, never in the middle of writing its checkpoint and
metrics row, and the folder stays resumable. A second Ctrl-C raises KeyboardInterrupt
at once. Handlers can only be installed by the main thread, after Ray's own (Ray's
driver makes SIGTERM a bare ``sys.exit``); see :func:`fedlora.flower.simulation`.

The clients hear it too: a simulation names a stop file in :data:`STOP_FILE_ENV` (Ray's
workers inherit it), the first signal creates that file, and a client's local training
calls :func:`check_client` in every layer's forward and backward pass
(:func:`fedlora.learning.train.stop_checks`), so a round of many minutes (SmolLM2 on CPU)
ends within a fraction of a step instead of running to its end. A flag would not do: the
clients are other processes. Deployed clients own their machines and finish their round.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator

STOP = threading.Event()
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as shells report it
STOP_FILE_ENV = "FEDLORA_STOP_FILE"  # a simulation's clients stop their local training once this file exists
FIRST_CTRL_C = (
    "\nstopping: the clients stop at their next step, the run keeps its last finished round (the folder stays "
    "resumable); Ctrl-C again to stop now\n"
)


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C or SIGTERM)."""


class ClientStopped(Exception):
    """A client's local training ended early: its run is stopping (the round is not aggregated)."""


class Signals:
    """The signal that asked the run to stop (None: none did)."""

    def __init__(self) -> None:
        self.received: int | None = None

    def handle(self, signum: int, frame: object) -> None:
        if STOP.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        STOP.set()
        tell_clients()
        if signum == signal.SIGINT:  # said at once: the stop itself waits for the server's next wait
            os.write(2, FIRST_CTRL_C.encode())

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 1) if self.received is not None else 0


def check() -> None:
    """Raise :class:`Interrupted` once a stop was asked for."""
    if STOP.is_set():
        raise Interrupted("stopped by a signal")


def tell_clients() -> None:
    """Create the stop file the clients check (where this process named one)."""
    path = os.environ.get(STOP_FILE_ENV)
    if path:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def stop_file_named() -> bool:
    """Whether this process runs in a simulation that names a stop file for its clients."""
    return bool(os.environ.get(STOP_FILE_ENV))


def check_client() -> None:
    """In a client's training loop: raise :class:`ClientStopped` once its simulation is stopping."""
    path = os.environ.get(STOP_FILE_ENV)
    if path and os.path.exists(path):
        raise ClientStopped("the run is stopping (Ctrl-C or SIGTERM)")


@contextlib.contextmanager
def stop_file() -> Iterator[None]:
    """While inside, :data:`STOP_FILE_ENV` names a fresh stop file (removed on leaving); for the
    processes started inside (Ray's workers) to inherit."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="fedlora-stop-")
    os.environ[STOP_FILE_ENV] = os.path.join(folder, "stop")
    try:
        yield
    finally:
        os.environ.pop(STOP_FILE_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)  # also the clients' progress files (fedlora.federation.progress)


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
