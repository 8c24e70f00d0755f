"""A run's live console: one line per round, a bar over the rounds, over a round's clients and over their steps.

On a terminal the bars are transient (only the round lines stay); when the output is
not a terminal (piped, a log file) only the round lines are printed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fedlora.outputs import console

RowCallback = Callable[[dict[str, Any]], None]


@contextmanager
def round_lines(rounds: int) -> Iterator[tuple[RowCallback, Callable[[int, int], None]]]:
    """Progress over the rounds and, within a round, over its clients (with an ETA); the row callback prints
    each metrics row as one line (the only output when not on a terminal)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    plain = not console.console.is_terminal
    starting = "starting Ray and the clients (the first round also loads the model in each)"
    if plain:
        console.console.print(starting + "...")
    with Progress(*columns, console=console.console, transient=True, disable=plain) as progress:
        task = progress.add_task(starting, total=rounds)
        clients = progress.add_task("clients", total=None, visible=False)

        def on_round(row: dict[str, Any]) -> None:
            progress.update(task, description="rounds")
            progress.console.print(console.round_line(row, rounds))
            progress.update(clients, visible=False)
            if row["round"] > 0:
                progress.advance(task)

        def on_progress(done: int, expected: int) -> None:
            if done == 1:  # a new round: the clients' ETA starts over
                progress.reset(clients, total=expected, visible=True)
            progress.update(clients, completed=done, description="clients this round")

        with client_steps(progress, disable=plain):
            yield on_round, on_progress


@contextmanager
def client_steps(progress: Any, *, disable: bool) -> Iterator[None]:
    """While inside, a bar of the local steps done in the latest round by its started clients, read every
    second from the clients' progress files (:mod:`fedlora.federation.progress`): a SmolLM2 round's minutes
    show movement before its first client replies."""
    if disable:
        yield
        return
    from fedlora.federation import progress as client_progress

    steps = progress.add_task("client steps", total=None, visible=False)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(1.0):
            if (latest := client_progress.latest()) is not None:
                server_round, done, total = latest
                progress.update(steps, completed=done, total=total, visible=True,
                                description=f"round {server_round}: client steps")  # fmt: skip

    watcher = threading.Thread(target=poll, name="fedlora-client-steps", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
