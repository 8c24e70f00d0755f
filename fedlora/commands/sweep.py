"""Privacy-budget sweeps: strategies x epsilon x seeds, one simulation per cell, resumable.

    fedlora sweep privacy [--preset sst2] [--level sample|user] [--out sweeps/x] [<overrides>]

The grid comes from ``conf/sweep/privacy.yaml`` (or ``privacy_<preset>.yaml``: a grid
with its own shared ``overrides``, after those of the preset its ``base`` names, if any);
``--strategies``, ``--epsilons`` (``inf``: no DP) and ``--seeds`` replace its lists, ``--level``
its ``level`` (sample: DP-SGD on every client, ``privacy=dp``; user: DP-FedAvg on the server, ``privacy=user``), and
command-line overrides come after the preset's. Every cell is a ``fedlora simulate`` subprocess (a fresh Ray and model
cache each) writing to ``<out>/cells/<strategy>/eps-<epsilon>/seed-<seed>/``; with
``centralised: true`` one ``fedlora centralised`` cell per seed adds the non-private
centralised reference (``cells/centralised/eps-inf/seed-<s>``); ``strategy_overrides``
(strategy or ``centralised``: [overrides]) gives a strategy its own settings, after the shared ones (a key
the command line sets stays the command line's). A cell that finished leaves
``cell.json`` and is not run again when the sweep is restarted. The CLI writes the
report (:mod:`fedlora.commands.report`) at the end.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from fedlora.config.run import ConfigError

CELL = "cell.json"
SWEEP = "sweep.json"
CENTRALISED = "centralised"  # the reference cell's strategy name


LEVELS = {"sample": "dp", "user": "user"}  # sweep level -> the privacy preset its private cells use


@dataclass(frozen=True)
class Cell:
    strategy: str  # or CENTRALISED
    epsilon: float  # math.inf: no DP
    seed: int
    level: str = "sample"  # sample (DP-SGD on the clients) | user (DP-FedAvg on the server)
    settings: tuple[str, ...] = ()  # the strategy's own overrides (the grid's strategy_overrides), after the shared

    @property
    def name(self) -> str:
        return f"{self.strategy}/eps-{format_epsilon(self.epsilon)}/seed-{self.seed}"

    @property
    def private(self) -> bool:
        return self.strategy != CENTRALISED and not math.isinf(self.epsilon)

    @property
    def command(self) -> str:
        return "centralised" if self.strategy == CENTRALISED else "simulate"

    def overrides(self) -> list[str]:
        if self.strategy == CENTRALISED:
            return [*self.settings, f"seed={self.seed}"]
        if math.isinf(self.epsilon):
            dp = ["privacy=none"]
        else:
            dp = [f"privacy={LEVELS[self.level]}", f"privacy.epsilon={self.epsilon:g}"]
        return [f"strategy={self.strategy}", *self.settings, f"seed={self.seed}", *dp]


def format_epsilon(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def parse_epsilon(text: str | float) -> float:
    value = float(text)
    if not value > 0:
        raise ConfigError(f"sweep epsilons must be > 0 or inf, got {text}")
    return value


def defaults(name: str, preset: str | None = None, *, _under: tuple[str, ...] = ()) -> dict:
    """The grid of ``conf/sweep/<name>.yaml`` or ``<name>_<preset>.yaml``."""
    import importlib.resources

    folder = importlib.resources.files("conf") / "sweep"
    stem = f"{name}_{preset}" if preset else name
    path = folder / f"{stem}.yaml"
    if not path.is_file():
        presets = sorted(p.name[len(name) + 1 : -5] for p in folder.iterdir() if p.name.startswith(f"{name}_"))
        raise ConfigError(f"unknown sweep {stem!r}; presets of {name}: {presets}")
    grid_ = yaml.safe_load(path.read_text())
    grid_.setdefault("overrides", [])
    if base := grid_.pop("base", None):  # another preset's overrides first, this one's replacing theirs in place
        if base in (*_under, preset):
            raise ConfigError(f"sweep preset {stem!r}: its base {base!r} is built on it (a cycle)")
        grid_["overrides"] = merged(defaults(name, base, _under=(*_under, preset))["overrides"], grid_["overrides"])
    grid_.setdefault("centralised", False)
    grid_.setdefault("level", "sample")
    grid_.setdefault("strategy_overrides", {})
    return grid_


def grid(
    strategies: list[str],
    epsilons: list[float],
    seeds: list[int],
    *,
    centralised: bool = False,
    level: str = "sample",
    strategy_overrides: dict[str, list[str]] | None = None,
) -> list[Cell]:
    """The cells: the centralised reference per seed (when asked), then strategy x epsilon x seed, each strategy
    with its own ``strategy_overrides`` (a preset's per-strategy settings, e.g. Fed-SB's rank; ``centralised``:
    the reference's own)."""
    from strategies import get_strategy_class

    if level not in LEVELS:
        raise ConfigError(f"unknown privacy level {level!r}; choose from {list(LEVELS)}")
    per_strategy = strategy_overrides or {}
    for name in [*strategies, *(s for s in per_strategy if s != CENTRALISED)]:
        try:
            get_strategy_class(name)
        except ValueError as err:
            raise ConfigError(f"sweep: {err}") from None
    own = tuple(per_strategy.get(CENTRALISED, ()))  # e.g. the schedule a long pooled run needs
    reference = [Cell(CENTRALISED, math.inf, seed, settings=own) for seed in seeds] if centralised else []
    return reference + [
        Cell(s, e, seed, level, tuple(per_strategy.get(s, ()))) for s in strategies for e in epsilons for seed in seeds
    ]


def run_cells(
    cells: list[Cell],
    overrides: list[str],
    out: Path,
    *,
    command: str = "",
    recorded: Callable[[Cell], bool] | None = None,
    on_done: Callable[[Cell, Path, float], None] | None = None,
) -> None:
    """Run every unfinished cell, with a progress bar (a plain line per cell, with the time left, when not on a
    terminal). ``recorded(cell)``: the cell is in a results file already (not run again); ``on_done(cell, folder,
    wall_s)``: after each finished cell (e.g. to add it to that file)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedlora import __version__
    from fedlora.outputs.console import console

    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP).write_text(
        json.dumps(
            {
                "cells": [asdict(c) | {"epsilon": format_epsilon(c.epsilon)} for c in cells],
                "overrides": overrides,
                "command": command or shlex.join(["fedlora", *sys.argv[1:]]),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "fedlora": __version__,
            },
            indent=2,
        )
    )
    todo = [c for c in cells if not (out / "cells" / c.name / CELL).is_file() and not (recorded and recorded(c))]
    spent: list[float] = []
    plain = not console.is_terminal
    columns = (TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.description}"), console=console, disable=plain) as progress:
        task = progress.add_task("", total=len(cells), completed=len(cells) - len(todo))
        for i, cell in enumerate(todo, start=len(cells) - len(todo) + 1):
            progress.update(task, description=cell.name)
            folder = out / "cells" / cell.name
            folder.mkdir(parents=True, exist_ok=True)
            # --overwrite: only unfinished cells run again, over what their interrupted run left
            cmd = [sys.executable, "-m", "fedlora.cli", cell.command, "--overwrite", *cell_overrides(cell, overrides)]
            started = time.perf_counter()
            with (folder / "log.txt").open("w") as log:
                done = subprocess.run([*cmd, f"output_dir={folder}"], stdout=log, stderr=subprocess.STDOUT, check=False)
            wall_s = time.perf_counter() - started
            minutes = wall_s / 60
            if done.returncode != 0:
                console.print(
                    f"cell {i}/{len(cells)} {cell.name} failed (exit {done.returncode}); see {folder / 'log.txt'}"
                )
                continue
            (folder / CELL).write_text(json.dumps(asdict(cell) | {"epsilon": format_epsilon(cell.epsilon)}))
            if on_done is not None:
                on_done(cell, folder, wall_s)
            progress.advance(task)
            spent.append(minutes)
            left = len(cells) - i
            cells_left = f"{left} cell" + ("s" if left > 1 else "")
            eta = f"; about {left * sum(spent) / len(spent):.0f} min left ({cells_left})" if left else ""
            if plain:
                console.print(f"cell {i}/{len(cells)} {cell.name} done in {minutes:.1f} min: {summary(folder)}{eta}")


def merged(base: list[str], own: list[str]) -> list[str]:
    """``base`` with each of ``own`` replacing the override of its key where ``base`` has one, else appended:
    a preset built on another keeps that one's order (its results file compares the list)."""
    out, where = list(base), {override_key(o): i for i, o in enumerate(base)}
    for o in own:
        if (i := where.get(override_key(o))) is None:
            out.append(o)
        else:
            out[i] = o
    return out


def override_key(override: str) -> str:
    """The key a Hydra override sets (``+a.b=1`` -> ``a.b``)."""
    return override.lstrip("+").partition("=")[0]


def cell_overrides(cell: Cell, overrides: list[str]) -> list[str]:
    """The sweep's shared overrides as this cell can take them (no privacy keys without DP, none of the other
    level's), then the cell's own."""
    from fedlora.config.compose import SAMPLE_ONLY, USER_ONLY

    if not cell.private:
        shared = [o for o in overrides if not override_key(o).startswith("privacy.")]
    else:
        other = SAMPLE_ONLY if cell.level == "user" else USER_ONLY
        shared = [o for o in overrides if override_key(o).removeprefix("privacy.") not in other]
    return [*shared, *cell.overrides()]


def summary(folder: Path) -> str:
    """A finished cell in a few words: its last accuracy and largest epsilon spent."""
    from fedlora.outputs.metrics import read_metrics
    from fedlora.outputs.run_folder import METRICS

    rows = [r for r in read_metrics(folder / METRICS) if r["test_accuracy"]]
    eps = [float(r[k]) for r in rows for k in ("epsilon_max", "epsilon") if r.get(k)]
    spent = f", epsilon spent {max(eps):.3g}" if eps else ""
    return f"accuracy {float(rows[-1]['test_accuracy']):.3f}{spent}" if rows else "no evaluation"
