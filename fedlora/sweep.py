"""Privacy-budget sweeps: strategies x epsilon x seeds, one simulation per cell, resumable.

    fedlora sweep privacy --out sweeps/ag_news -- model=minilm data=ag_news ...

The grid's defaults are in ``conf/sweep/privacy.yaml``; ``--strategies``,
``--epsilons`` (``inf``: no DP) and ``--seeds`` replace them. Every cell is a
``fedlora simulate`` subprocess (a fresh Ray and model cache each) writing to
``<out>/cells/<strategy>/eps-<epsilon>/seed-<seed>/``; a cell that finished leaves
``cell.json`` there and is not run again when the sweep is restarted. The CLI writes
the report (:mod:`fedlora.report`) at the end.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from fedlora.config import ConfigError

CELL = "cell.json"


@dataclass(frozen=True)
class Cell:
    strategy: str
    epsilon: float  # math.inf: no DP
    seed: int

    @property
    def name(self) -> str:
        return f"{self.strategy}/eps-{format_epsilon(self.epsilon)}/seed-{self.seed}"

    def overrides(self) -> list[str]:
        dp = ["privacy=none"] if math.isinf(self.epsilon) else ["privacy=dp", f"privacy.epsilon={self.epsilon:g}"]
        return [f"strategy={self.strategy}", f"seed={self.seed}", *dp]


def format_epsilon(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def parse_epsilon(text: str | float) -> float:
    value = float(text)
    if not value > 0:
        raise ConfigError(f"sweep epsilons must be > 0 or inf, got {text}")
    return value


def defaults(name: str) -> dict:
    """The grid of ``conf/sweep/<name>.yaml``."""
    import importlib.resources

    path = importlib.resources.files("conf") / "sweep" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown sweep {name!r}; see conf/sweep/")
    return yaml.safe_load(path.read_text())


def grid(strategies: list[str], epsilons: list[float], seeds: list[int]) -> list[Cell]:
    from strategies import get_strategy_class

    for name in strategies:
        try:
            get_strategy_class(name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return [Cell(s, e, seed) for s in strategies for e in epsilons for seed in seeds]


def run_cells(cells: list[Cell], overrides: list[str], out: Path) -> None:
    """Run every unfinished cell, with a progress display (the report is :mod:`fedlora.report`'s)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps(
            {"cells": [asdict(c) | {"epsilon": format_epsilon(c.epsilon)} for c in cells], "overrides": overrides},
            indent=2,
        )
    )
    todo = [c for c in cells if not (out / "cells" / c.name / CELL).is_file()]
    with Progress(
        TextColumn("[bold]sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    ) as progress:
        task = progress.add_task("", total=len(cells), completed=len(cells) - len(todo))
        for cell in todo:
            progress.update(task, description=cell.name)
            folder = out / "cells" / cell.name
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "fedlora.cli",
                "simulate",
                *overrides,
                *cell.overrides(),
                f"output_dir={folder}",
            ]
            with (folder / "log.txt").open("w") as log:
                done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                progress.console.print(
                    f"[red]cell {cell.name} failed (exit {done.returncode}); see {folder / 'log.txt'}"
                )
                continue
            (folder / CELL).write_text(json.dumps(asdict(cell) | {"epsilon": format_epsilon(cell.epsilon)}))
            progress.advance(task)
