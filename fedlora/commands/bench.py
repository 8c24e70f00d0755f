"""``fedlora sweep``, ``fedlora bench`` and ``fedlora tables``: grids of runs, the published benchmarks,
and the docs' tables made from their results.

    fedlora sweep privacy [--preset sst2] [--seeds 0 1 2] [<overrides>]   # a grid into sweeps/, with its report
    fedlora bench ag_news [--seeds 0 1 2]        # a published benchmark: conf/sweep/privacy_ag_news.yaml, its
                                                 # results added cell by cell to docs/results/ag_news.json
    fedlora tables [--check] [--figures DIR]     # the docs' tables regenerated from docs/results/*.json

A benchmark is a sweep preset whose results file lives in the repository: a cell in the file is not run
again (it continues where it stopped, on another day or machine), and its tables are generated.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from fedlora.config.run import ConfigError
from fedlora.outputs.console import console

RESULTS_DIR = Path("docs") / "results"


def add_parsers(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The sweep, bench and tables sub-commands; returns the sweep's parser."""
    sweep = sub.add_parser(
        "sweep",
        help="run a grid of simulations (strategies x epsilon x seeds) and write its report",
        description="Run a sweep (conf/sweep/<name>.yaml); a finished cell is not run again. "
        "Arguments after the options are Hydra overrides for every cell.",
    )
    sweep.add_argument("name", choices=["privacy"], help="the sweep (its grid: conf/sweep/<name>.yaml)")
    sweep.add_argument("--preset", default=None, help="a preset grid and settings: conf/sweep/<name>_<preset>.yaml")
    sweep.add_argument("--out", type=Path, default=None, help="the sweep folder (default: sweeps/<name>[_<preset>])")
    sweep.add_argument("--results", type=Path, default=None, help="also add each finished cell to this results file")
    bench = sub.add_parser(
        "bench",
        help="run (or continue) a published benchmark; its results go to docs/results/<name>.json",
        description="A benchmark is conf/sweep/privacy_<name>.yaml with its results file in the repository: "
        "cells already in docs/results/<name>.json are not run again. Then `fedlora tables` updates the docs.",
    )
    bench.add_argument("name", help="the benchmark: conf/sweep/privacy_<name>.yaml")
    bench.add_argument("--out", type=Path, default=None, help="the runs' folder (default: sweeps/bench_<name>)")
    for p in (sweep, bench):
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides for every cell")
        p.add_argument("--strategies", nargs="+", default=None, help="replace the grid's strategies")
        p.add_argument("--epsilons", nargs="+", default=None, help="replace the grid's epsilons (inf: no DP)")
        p.add_argument("--seeds", nargs="+", type=int, default=None, help="replace the grid's seeds")
        p.add_argument("--centralised", action=argparse.BooleanOptionalAction, default=None,
                       help="with (or without) the centralised reference cell (default: the grid's)")  # fmt: skip
        p.add_argument("--level", choices=["sample", "user"], default=None,
                       help="the DP level of the private cells: sample (DP-SGD) or user (DP-FedAvg)")  # fmt: skip
    sweep.set_defaults(handler=run_sweep)
    bench.set_defaults(handler=run_bench, name_of_sweep="privacy")
    tables = sub.add_parser("tables", help="regenerate the docs' tables from docs/results/*.json")
    tables.add_argument("--check", action="store_true", help="only check: exit 1 when a page differs from its files")
    tables.add_argument("pages", nargs="*", type=Path, help="Markdown pages (default: README.md and docs/*.md)")
    tables.add_argument("--figures", type=Path, default=None, metavar="DIR",
                        help="also draw each results file's figures (a sweep report's) into DIR/<name>/")  # fmt: skip
    tables.set_defaults(handler=run_tables)
    for p in (sweep, bench, tables):
        p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    return sweep


def run_sweep(args: argparse.Namespace) -> int:
    from fedlora.commands.report import write_report
    from fedlora.commands.results import render

    out = (args.out or Path("sweeps") / (f"{args.name}_{args.preset}" if args.preset else args.name)).resolve()
    run_grid(args, name=args.name, preset=args.preset, out=out, results=args.results)
    if any((out / "cells").glob("*/*/*/cell.json")):
        console.print(f"report: {write_report(out)}")
    if args.results is not None:  # its cells may have run elsewhere
        console.print(f"results: {args.results}\n{render(args.results)}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from fedlora.commands.report import write_report
    from fedlora.commands.results import render

    if not (RESULTS_DIR.parent.is_dir() and Path("pyproject.toml").is_file()):
        raise ConfigError("fedlora bench runs from the repository's root (its results go to docs/results/)")
    results = RESULTS_DIR / f"{args.name}.json"
    out = (args.out or Path("sweeps") / f"bench_{args.name}").resolve()
    run_grid(args, name="privacy", preset=args.name, out=out, results=results)
    if any((out / "cells").glob("*/*/*/cell.json")):
        console.print(f"report: {write_report(out)}")
    if results.is_file():  # none when no cell has finished yet
        console.print(f"results: {results}\n{render(results)}")
    return 0


def run_grid(args: argparse.Namespace, *, name: str, preset: str | None, out: Path, results: Path | None) -> None:
    """Compose every cell first (a bad override fails before any runs), then run the unfinished ones."""
    from fedlora.commands.results import ResultsFile, cell_record, protocol, same_run_elsewhere
    from fedlora.commands.sweep import cell_overrides, defaults, grid, override_key, parse_epsilon, run_cells
    from fedlora.config.compose import compose

    grid_defaults = defaults(name, preset)
    given = {override_key(o) for o in args.overrides}  # the command line's keys win over a preset's
    per_strategy = {
        strategy: [o for o in settings if override_key(o) not in given]
        for strategy, settings in (grid_defaults["strategy_overrides"] or {}).items()
    }
    cells = grid(
        args.strategies or list(grid_defaults["strategies"]),
        [parse_epsilon(e) for e in (args.epsilons or grid_defaults["epsilons"])],
        args.seeds or [int(s) for s in grid_defaults["seeds"]],
        centralised=bool(grid_defaults["centralised"] if args.centralised is None else args.centralised),
        level=args.level or grid_defaults["level"],
        strategy_overrides=per_strategy,
    )
    overrides = [*grid_defaults["overrides"], *args.overrides]
    composed = {}
    for cell in cells:  # bad overrides fail here, not in every cell (each cell as it will run: no privacy keys
        composed[cell.name] = compose(cell_overrides(cell, overrides))[0]  # where not private, no other level's)
    command = shlex.join(["fedlora", *sys.argv[1:]])
    if results is None:
        run_cells(cells, overrides, out, command=command)
        return
    if results.suffix != ".json":
        raise ConfigError(f"a results file is JSON: {results}")
    book, kept = ResultsFile(results), protocol(overrides)  # the file keeps what the cells compute, not where
    if protocol(book.data.get("overrides", kept)) != kept:
        raise ConfigError(f"{results} holds cells run with other settings; use another results file")
    for cell in cells:  # a default changed since: the same overrides would now run other settings
        if not book.done(cell) and (changed := book.changed_settings(cell, composed[cell.name].to_flat())):
            raise ConfigError(f"{results}'s {cell.strategy} cells ran with other settings than a new seed "
                              f"would: {'; '.join(changed[:3])}; pin them in the preset or use another results "
                              "file")  # fmt: skip

    others = {p: json.loads(p.read_text()) for p in results.parent.glob("*.json") if p.resolve() != results.resolve()}
    for cell in cells:  # run with the same settings for another benchmark: copied, not run again
        if not book.done(cell) and (found := same_run_elsewhere(cell, composed[cell.name].to_flat(), others)):
            source, record = found
            book.add(cell, record | {"copied_from": source.name}, name=preset or name,
                     command=record.get("command", command), overrides=kept)  # fmt: skip
            console.print(f"{cell.name}: the same run is in {source}; copied, not run again")

    def record(cell, folder: Path, wall_s: float) -> None:
        book.add(cell, cell_record(cell, folder, wall_s=wall_s), name=preset or name, command=command,
                 overrides=kept)  # fmt: skip

    run_cells(cells, overrides, out, command=command, recorded=book.done, on_done=record)


def run_tables(args: argparse.Namespace) -> int:
    from fedlora.commands.report_figures import plot
    from fedlora.commands.results import load_results, update_pages

    if args.figures is not None and args.figures.exists() and not args.figures.is_dir():
        raise ConfigError(f"--figures needs a folder; {args.figures} is a file")
    pages = args.pages or [Path("README.md"), *sorted(Path("docs").glob("*.md"))]
    stale = update_pages([p for p in pages if p.is_file()], check=args.check)
    verb = "differ from their results files" if args.check else "updated"
    if stale:
        console.print(f"{len(stale)} page(s) {verb}: " + ", ".join(map(str, stale)))
    for results in sorted(RESULTS_DIR.glob("*.json")) if args.figures is not None else ():
        (folder := args.figures / results.stem).mkdir(parents=True, exist_ok=True)
        plot(load_results(results), folder)
        console.print(f"figures: {folder}")
    return 1 if args.check and stale else 0
