"""Results files: what a benchmark measured, kept small enough to commit, and the tables made from them.

A sweep run with a results file (``fedlora bench <name>`` writes ``docs/results/<name>.json``) adds
each finished cell to it: its strategy, epsilon, seed and own settings, every round's metrics, its wall
time and its flat config, with the sweep's command and the library versions. A cell already in the file
is not run again, so a benchmark continues where it stopped, on another day or machine.

Tables in the docs are generated from these files, never typed: a block

    <!-- table: results/ag_news.json -->
    ...
    <!-- /table -->

in a Markdown page is replaced by :func:`render` of that file (``fedlora tables``), and
``fedlora tables --check`` (run by the tests) fails when a page differs from its files. A block
``<!-- brief: a.json b.json -->`` ... ``<!-- /brief -->`` (the README's) is :func:`render_brief`: one row
per file, its settings, every strategy's final accuracy and the orderings its intervals support.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from fedlora.commands.sweep import CENTRALISED, Cell, format_epsilon, override_key
from fedlora.outputs.metrics import read_metrics
from fedlora.outputs.run_folder import METRICS, RUN_CONFIG

KEPT_COLUMNS = (
    "round",
    "test_accuracy",
    "test_loss",
    "bytes_up",
    "bytes_down",
    "epsilon",
    "epsilon_max",
    "refused",
    "personal_accuracy",
    "personal_worst10",
    "wall_s",  # each round's, so a cell's speed can be read per round (the model loads in round 1)
)
LIBRARIES = ("fedlora", "torch", "flwr", "transformers", "peft", "opacus")
# Where a cell runs, not what it computes: a results file may hold cells run on more or fewer Ray workers
# (or a GPU) than its others; each cell's config still records its own, beside its wall time.
PLACEMENT = frozenset(
    {
        "simulation.num_cpus",
        "simulation.num_gpus",
        "simulation.ray_address",
        "simulation.parallel_clients",
        "simulation.server_threads",
    }
)
UNCOMPARED = PLACEMENT | {"output_dir"}  # two runs differing only here are the same run
BLOCK = re.compile(r"(<!-- table: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
AHEAD = re.compile(r" points, 95% CI (\[[^]]*\]), \d+ paired seeds: \S+ is ahead$")  # a verdict's ordering
BRIEF = re.compile(r"(<!-- brief: (?P<paths>[^>]+?) -->\n)(?P<body>.*?)(<!-- /brief -->)", re.S)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def cell_record(cell: Cell, folder: Path, *, wall_s: float) -> dict[str, Any]:
    """One finished cell, compact: identity, every round's kept metrics, wall time, flat config."""
    rows = [
        {k: _number(r[k]) for k in KEPT_COLUMNS if k in r and r[k] not in ("", None)}
        for r in read_metrics(folder / METRICS)
    ]
    config = json.loads((folder / RUN_CONFIG).read_text()) if (folder / RUN_CONFIG).is_file() else {}
    return asdict(cell) | {"epsilon": format_epsilon(cell.epsilon), "wall_s": round(wall_s, 1), "rounds": rows,
                           "config": config}  # fmt: skip


def _number(text: str) -> float | int | str:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in str(text) else value


class ResultsFile:
    """A benchmark's results on disk (JSON); cells keyed by ``strategy/eps-e/seed-s``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {"cells": {}}

    def done(self, cell: Cell) -> bool:
        return cell.name in self.data["cells"]

    def changed_settings(self, cell: Cell, config: dict[str, Any]) -> list[str]:
        """Where ``config`` (flat, the cell as it would run) differs from a recorded cell of the same strategy
        and epsilon (another seed): "key: recorded -> now". Keys a recorded cell does not have (added to
        fedlora since), the seed, the output folder and the cell's placement are not compared."""
        same = [r for r in self.data["cells"].values()
                if r.get("strategy") == cell.strategy and r.get("epsilon") == format_epsilon(cell.epsilon)]  # fmt: skip
        if not same:
            return []
        recorded = same[0].get("config", {})
        skip = {"seed", *UNCOMPARED}
        return [f"{k}: {recorded[k]!r} -> {config[k]!r}" for k in sorted(set(recorded) & set(config) - skip)
                if _text(recorded[k]) != _text(config[k])]  # fmt: skip

    def add(self, cell: Cell, record: dict[str, Any], *, name: str, command: str, overrides: list[str]) -> None:
        """Record a finished cell with the ``command`` that ran it (also added to the file's commands)."""
        commands = [c for c in commands_of(self.data) if c != command] + [command]
        self.data.pop("command", None)  # a file from before commands were kept: its one command comes first
        self.data.update(name=name, commands=commands, overrides=overrides, versions=versions())
        self.data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.data["cells"][cell.name] = record | {"command": command}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)  # a benchmark stopped mid-write keeps its earlier cells


def same_run_elsewhere(
    cell: Cell, config: dict[str, Any], files: Mapping[Path, dict[str, Any]]
) -> tuple[Path, dict[str, Any]] | None:
    """A results file among ``files`` (path: its loaded data) that holds ``cell`` run with the same settings
    (every key of ``config``, the flat config the cell would run with, recorded with the same value; the
    output folder and the placement aside), and its record; None when none does. Benchmarks that share a
    setting (AG News's FedAvg cells are also the personalised benchmark's) then run such a cell once."""
    for path in sorted(files):
        record = files[path].get("cells", {}).get(cell.name)
        recorded = (record or {}).get("config", {})
        if record and all(k in recorded and _text(recorded[k]) == _text(v) for k, v in config.items()
                          if k not in UNCOMPARED):  # fmt: skip
            return path, record
    return None


def protocol(overrides: list[str]) -> list[str]:
    """``overrides`` without those that only place the cells (:data:`PLACEMENT`): what a results file keeps."""
    return [o for o in overrides if override_key(o) not in PLACEMENT]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def commands_of(data: dict[str, Any]) -> list[str]:
    """The commands that ran a results file's cells, oldest first (a file from before kept only its latest)."""
    return list(data.get("commands") or ([data["command"]] if data.get("command") else []))


def read_results(path: Path) -> dict[str, Any]:
    """A results file's data; a missing or malformed file is a :class:`ConfigError` (one line, status 2)."""
    from fedlora.config.errors import ConfigError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read results file {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), dict):
        raise ConfigError(f"{path} is not a results file (no cells)")
    return data


def load_results(path: Path, data: dict[str, Any] | None = None) -> list:
    """The file's cells (``data``: the file already read) as the report's
    :class:`~fedlora.commands.report.CellResult` (for tables)."""
    from fedlora.commands.report import CellResult, personal_of

    cells = []
    for record in (data or read_results(path))["cells"].values():
        rows = [r for r in record["rounds"] if "test_accuracy" in r]
        spent = [float(r[k]) for r in rows for k in ("epsilon_max", "epsilon") if k in r]
        cells.append(
            CellResult(
                strategy=record["strategy"],
                epsilon=math.inf if record["epsilon"] == "inf" else float(record["epsilon"]),
                seed=int(record["seed"]),
                rounds=[int(r["round"]) for r in rows],
                accuracy=[float(r["test_accuracy"]) for r in rows],
                upload=[float(r.get("bytes_up", 0)) for r in rows if int(r["round"]) > 0],
                download=[float(r.get("bytes_down", 0)) for r in rows if int(r["round"]) > 0],
                personal=personal_of(rows),
                spent=max(spent) if spent else None,
                refused=sum(int(r.get("refused", 0)) for r in rows),
            )
        )
    return cells


def render(path: Path) -> str:
    """The Markdown a docs block shows for results file ``path``: the table, then the paired comparisons."""
    from fedlora.commands.report import comparisons, table

    data = read_results(path)
    cells = load_results(path, data)
    header, body = table(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    minutes = sum(r["wall_s"] for r in data["cells"].values()) / 60
    runs = f"{len(cells)} run" + ("s" if len(cells) != 1 else "")
    commands = "; ".join(f"`{c}`" for c in commands_of(data)) or "?"
    copied = sorted(r["copied_from"] for r in data["cells"].values() if r.get("copied_from"))
    if copied:  # run once for another benchmark with the same settings
        runs += f" ({len(copied)} of them copied from {', '.join(sorted(set(copied)))})"
    lines += ["", f"{runs}, {minutes:.0f} min of wall time in all; {commands}."]
    lines += [f"- {line}" for line in comparisons(cells)]
    return "\n".join(lines) + "\n"


def settings_of(overrides: list[str]) -> str:
    """A results file's setting in words: model, data, federation, rounds (from its shared overrides)."""
    o = dict(item.split("=", 1) for item in overrides if "=" in item)
    words = [o.get("model", "default model"), o.get("data", "default data")]
    if "clients" in o:
        per_round = f", {o['clients_per_round']} per round" if "clients_per_round" in o else ""
        words.append(f"{o['clients']} clients{per_round}")
    if o.get("partition") == "dirichlet":
        words.append(f"Dirichlet {o.get('partition.alpha', 'default')}")
    return ", ".join([*words, f"{o.get('rounds', 'default')} rounds"])


def render_brief(paths: list[Path]) -> str:
    """A table of one row per results file: its command and settings, each strategy's final accuracy at each
    epsilon (mean ± 95% t half-width, n; the reference and FedAvg first), and only the paired comparisons
    whose interval excludes zero, as ``A - B: points [CI]``."""
    from fedlora.commands.report import comparisons
    from fedlora.outputs.stats import t_interval

    lines = ["| benchmark | final accuracy: mean ± 95% t CI (n seeds) | orderings: A - B in points [95% CI], paired "
             "seeds, where the CI excludes zero |", "|---|---|---|"]  # fmt: skip
    for path in paths:
        data = read_results(path)
        cells = load_results(path, data)
        finals: dict[float, dict[str, list[float]]] = {}
        for c in cells:
            finals.setdefault(c.epsilon, {}).setdefault(c.strategy, []).append(c.final)
        accuracy = "; ".join(
            ("no DP" if math.isinf(eps) else f"epsilon {eps:g}") + ": "
            + ", ".join(f"{s} {t_interval(by[s]).format()}" for s in sorted(by, key=_reference_first))
            for eps, by in sorted(finals.items())
        )  # fmt: skip
        orderings = [AHEAD.sub(r" \1", line) for line in comparisons(cells) if AHEAD.search(line)]
        seeds = max((len(v) for by in finals.values() for v in by.values()), default=0)
        none = "none measurable" if seeds > 1 else "one seed: none can be stated" if seeds else "no cells yet"
        bench = f"fedlora bench {data.get('name')}"  # the one command that runs the file's cells, if it is one
        label = f"`{bench}`" if any(c.split(" --")[0] == bench for c in commands_of(data)) else path.name
        what = f"{label}: {settings_of(data.get('overrides', []))}"
        lines.append(f"| {what} | {accuracy or '-'} | {'; '.join(orderings) or none} |")
    return "\n".join(lines) + "\n"


def _reference_first(strategy: str) -> tuple[bool, bool, str]:
    return strategy != CENTRALISED, strategy != "fedavg", strategy


def update_pages(pages: list[Path], *, check: bool) -> list[Path]:
    """Regenerate every results block in ``pages`` (or, with ``check``, only compare); the pages that differ."""
    stale = []
    for page in pages:
        text = page.read_text()
        new = BLOCK.sub(lambda m, here=page.parent: m.group(1) + render(here / m.group("path")) + m.group(4), text)
        new = BRIEF.sub(
            lambda m, here=page.parent: m.group(1) + render_brief([here / p for p in m.group("paths").split()])
            + m.group(4), new
        )  # fmt: skip
        if new != text:
            stale.append(page)
            if not check:
                page.write_text(new)
    return stale
