"""``fedlora simulate``: check everything that can fail before Ray starts, then run and summarise."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fedlora import console
from fedlora.appconfig import run_config_for
from fedlora.checkpoint import write_json
from fedlora.config import ConfigError, RunConfig
from fedlora.metrics import METRICS, read_metrics


def simulate(cfg: RunConfig, composed: Any, *, dry_run: bool, verbose: bool) -> int:
    """Validate, show the partitions (and DP plan), write the config, run the simulation, print the rounds."""
    import dataclasses

    import torch
    from omegaconf import OmegaConf
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedlora.data import load_calibration
    from fedlora.flower.simulation import run_flower_simulation
    from fedlora.worker import get_worker

    if cfg.simulation.num_gpus > 0 and not torch.cuda.is_available() and not cfg.simulation.ray_address:
        raise ConfigError("simulation.num_gpus > 0 but this machine has no CUDA GPU")
    out = Path(cfg.output_dir or Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")).resolve()
    cfg = dataclasses.replace(cfg, output_dir=str(out))
    composed.output_dir = str(out)
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
    resolved = OmegaConf.to_yaml(composed)
    if dry_run:
        console.console.print(resolved)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(resolved)
    write_json(out / "run_config.json", cfg.to_flat())
    console.console.print(console.header(worker, out))
    columns = (TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console.console, transient=True) as progress:
        task = progress.add_task("rounds", total=cfg.rounds)

        def on_round(row: dict[str, Any]) -> None:
            progress.console.print(console.round_line(row, cfg.rounds))
            if row["round"] > 0:
                progress.advance(task)

        run_flower_simulation(cfg, verbose=verbose, on_round=on_round)
    console.console.print(console.summary_table(read_metrics(out / METRICS)))
    console.console.print(f"outputs: {out}  (metrics.csv, checkpoint.safetensors, adapter/)")
    return 0
