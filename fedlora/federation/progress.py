"""Progress inside a round: a simulation's clients say how many of their local steps are done.

A round of SmolLM2 on CPU takes minutes with nothing to show but "0 of 5 clients".
The clients are other processes (Ray's workers), so they say it through files: in the
folder of the simulation's stop file (:mod:`fedlora.federation.stopping`, which Ray's
workers inherit), each client round writes ``steps-<round>-<partition>`` ("done total"),
at most once a second and once more at its last step; the console sums the current
round's files (:func:`latest`). Nothing is written outside a simulation (a deployed
client's progress stays on its machine) or on a Ray worker of another machine that does
not share the folder (the bar then shows nothing more).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from fedlora.federation.stopping import STOP_FILE_ENV

EVERY_S = 1.0  # the least time between two writes of one client round's file
_current: dict[str, float | int] = {}  # this process's client round: round, partition, last write


def folder() -> Path | None:
    """The simulation's progress folder (its stop file's), where it exists on this machine."""
    path = os.environ.get(STOP_FILE_ENV)
    parent = Path(path).parent if path else None
    return parent if parent is not None and parent.is_dir() else None


@contextlib.contextmanager
def client_round(server_round: int, partition: int) -> Iterator[None]:
    """While inside, :func:`report` writes this client round's progress (one client at a time per process)."""
    _current.update(round=server_round, partition=partition, written=float("-inf"))
    try:
        yield
    finally:
        _current.clear()


def report(done: int, total: int) -> None:
    """``done`` of ``total`` local steps taken, from inside :func:`client_round`; throttled to ``EVERY_S``."""
    if not _current:
        return
    now = time.monotonic()
    if done < total and now - float(_current["written"]) < EVERY_S:
        return  # most steps end here, before any file-system call
    if (where := folder()) is None:
        return
    _current["written"] = now
    name = f"steps-{int(_current['round'])}-{int(_current['partition'])}"
    tmp = where / f".{name}.{os.getpid()}"
    with contextlib.suppress(OSError):  # progress is a courtesy: never fail a round for it
        tmp.write_text(f"{done} {total}")
        os.replace(tmp, where / name)


def latest() -> tuple[int, int, int] | None:
    """(round, steps done, steps planned) of the latest round any client has reported, over its clients that
    have started; None before the first report."""
    where = folder()
    files = [(int(p.name.split("-")[1]), p) for p in where.glob("steps-*-*")] if where is not None else []
    if not files:
        return None
    current = max(r for r, _ in files)
    done = total = 0
    for _, path in (f for f in files if f[0] == current):
        with contextlib.suppress(OSError, ValueError):
            d, t = (int(x) for x in path.read_text().split())
            done, total = done + d, total + t
    return current, done, total
