"""``fedlora simulate`` and ``fedlora centralised``: check what can fail before work starts, run, summarise."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from fedlora import console
from fedlora.appconfig import run_config_for
from fedlora.checkpoint import write_json
from fedlora.config import ConfigError, RunConfig
from fedlora.metrics import METRICS, read_metrics

RowCallback = Callable[[dict[str, Any]], None]


def output_folder(cfg: RunConfig, composed: Any) -> tuple[RunConfig, Path]:
    """The run's folder (``output_dir`` or outputs/<date>/<time>), set in both forms of the config."""
    out = Path(cfg.output_dir or Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")).resolve()
    composed.output_dir = str(out)
    return dataclasses.replace(cfg, output_dir=str(out)), out


def write_config(cfg: RunConfig, composed: Any, out: Path, overrides: list[str]) -> None:
    """config.yaml (composed), run_config.json (the typed config, flat) and Hydra's .hydra/ folder."""
    import yaml
    from omegaconf import OmegaConf

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(composed))
    write_json(out / "run_config.json", cfg.to_flat())
    (out / ".hydra").mkdir(exist_ok=True)
    (out / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(composed))
    (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))


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
    with Progress(*columns, console=console.console, transient=True, disable=plain) as progress:
        task = progress.add_task("rounds", total=rounds)
        clients = progress.add_task("clients", total=None, visible=False)

        def on_round(row: dict[str, Any]) -> None:
            progress.console.print(console.round_line(row, rounds))
            progress.update(clients, visible=False)
            if row["round"] > 0:
                progress.advance(task)

        def on_progress(done: int, expected: int) -> None:
            if done == 1:  # a new round: the clients' ETA starts over
                progress.reset(clients, total=expected, visible=True)
            progress.update(clients, completed=done, description="clients this round")

        yield on_round, on_progress


def summarise(out: Path) -> None:
    console.console.print(console.summary_table(read_metrics(out / METRICS)))
    console.console.print(f"outputs: {out}  (metrics.csv, checkpoint.safetensors, adapter/)")


def simulate(cfg: RunConfig, composed: Any, *, overrides: Sequence[str] = (), dry_run: bool, verbose: bool) -> int:
    """Validate, show the partitions (and DP plan), write the config, run the simulation, print the rounds."""
    import torch

    from fedlora.data import load_calibration
    from fedlora.flower.simulation import run_flower_simulation
    from fedlora.worker import get_worker

    if cfg.simulation.num_gpus > 0 and not torch.cuda.is_available() and not cfg.simulation.ray_address:
        raise ConfigError("simulation.num_gpus > 0 but this machine has no CUDA GPU")
    cfg, out = output_folder(cfg, composed)
    run_config_for(cfg)  # a setting the Flower run config cannot carry fails here, as it would deployed

    # Load data and model here, before Ray starts: bad paths and columns fail fast, and the
    # ServerApp (a thread of this process) finds them in the worker cache.
    worker = get_worker(cfg)
    console.show_partitions(worker, out if not dry_run else None)
    worker.warm_up()
    init = worker.strategy.gradient_init
    if init is not None and not init.from_clients:  # the calibration file fails now, not after the nodes started
        load_calibration(cfg.data, init.source, label_names=worker.splits.label_names)
    if cfg.privacy.enabled:
        console.show_privacy(worker)  # calibrates every client's noise now: an impossible budget fails here
    if dry_run:
        from omegaconf import OmegaConf

        console.console.print(OmegaConf.to_yaml(composed))
        return 0
    write_config(cfg, composed, out, list(overrides))
    console.console.print(console.header(worker, out))
    with round_lines(cfg.rounds) as (on_round, on_progress):
        run_flower_simulation(cfg, verbose=verbose, on_round=on_round, on_progress=on_progress)
    summarise(out)
    return 0


def centralised(cfg: RunConfig, composed: Any, *, overrides: Sequence[str] = ()) -> int:
    """The centralised reference of a federated run's config (:mod:`fedlora.centralised`)."""
    from fedlora.centralised import run_centralised, steps_per_round
    from fedlora.data import load_splits

    cfg, out = output_folder(cfg, composed)
    train_size = len(load_splits(cfg.data, seed=cfg.seed).train)
    steps = steps_per_round(cfg, train_size)
    write_config(cfg, composed, out, list(overrides))
    console.console.print(
        f"[bold]fedlora centralised[/] plain LoRA r={cfg.lora.rank} model={cfg.model.name} data={cfg.data.name} "
        f"({train_size} pooled training examples), {cfg.rounds} rounds of {steps} steps "
        f"(= {cfg.sampled_per_round} clients x their local steps), lr {cfg.train.lr:g} -> {out}"
    )
    with round_lines(cfg.rounds) as (on_round, _):
        run_centralised(cfg, out, on_round=on_round)
    summarise(out)
    return 0
