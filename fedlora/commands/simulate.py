"""``fedlora simulate`` and ``fedlora centralised``: check what can fail before work starts, run, summarise."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.config.app import run_config_for
from fedlora.config.run import ConfigError, RunConfig, RunFailed
from fedlora.outputs import console
from fedlora.outputs.checkpoint import write_json
from fedlora.outputs.live import round_lines
from fedlora.outputs.metrics import read_metrics
from fedlora.outputs.metrics import summarise as summarise_metrics
from fedlora.outputs.run_folder import (
    CHECKPOINT,
    CONFIG,
    HYDRA,
    HYDRA_OVERRIDES,
    METRICS,
    RUN_CONFIG,
    check_output,
    check_overwrite,
    check_writable,
    clear_outputs,
    lock,
    run_inputs,
    write_partitions,
)
from fedlora.privacy.budget import check_budget, user_dp_plan

if TYPE_CHECKING:
    from fedlora.learning.worker import Worker


def output_folder(cfg: RunConfig, composed: Any) -> tuple[RunConfig, Path]:
    """The run's folder (``output_dir`` or outputs/<date>/<time>), set in both forms of the config."""
    out = Path(cfg.output_dir or Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")).resolve()
    composed.output_dir = str(out)
    return dataclasses.replace(cfg, output_dir=str(out)), out


def check_resume(cfg: RunConfig, worker: Worker) -> None:
    """With ``server.resume``, the checkpoint in the output folder must fit this run (before anything starts)."""
    from fedlora.outputs.checkpoint import read_checkpoint

    path = Path(cfg.output_dir) / CHECKPOINT
    if cfg.server.resume and path.exists():
        read_checkpoint(path, initial=worker.adapted.initial_state(), cfg=cfg)


def check_aggregated(out: Path, min_replies: int) -> None:
    """A run in which no round aggregated anything failed, whatever else it wrote."""
    rows = [r for r in read_metrics(out / METRICS) if int(r["round"]) > 0]
    valid = [
        int(r["replies_received"] or 0) - int(r["replies_rejected"] or 0) - int(r.get("refused") or 0) for r in rows
    ]
    if rows and all(v < min_replies for v in valid):
        raise RunFailed(
            f"no round aggregated anything: every round had fewer than server.min_replies={min_replies} valid "
            f"replies (see {out / 'server.log'}); the adapter is the initial one"
        )


RESUME_HINT = "the folder keeps every finished round: continue with the same overrides plus server.resume=true"


def interrupted_message(out: Path, rounds: int) -> str:
    """Where a stopped run stands and how to continue it."""
    done = read_metrics(out / METRICS) if (out / METRICS).is_file() else []
    if not done:
        return "interrupted before round 0 finished; nothing to resume"
    return (
        f"interrupted after round {done[-1]['round']} of {rounds}; continue with the same overrides plus "
        f"server.resume=true (output_dir={out})"
    )


def write_config(cfg: RunConfig, composed: Any, out: Path, overrides: list[str]) -> None:
    """config.yaml (composed), run_config.json (the typed config, flat) and Hydra's .hydra/ folder."""
    import yaml
    from omegaconf import OmegaConf

    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(OmegaConf.to_yaml(composed))
    write_json(out / RUN_CONFIG, cfg.to_flat() | privacy_plan(cfg))
    (out / HYDRA).mkdir(exist_ok=True)
    (out / HYDRA / CONFIG).write_text(OmegaConf.to_yaml(composed))
    (out / HYDRA / HYDRA_OVERRIDES).write_text(yaml.safe_dump(list(overrides)))


def privacy_plan(cfg: RunConfig) -> dict[str, float]:
    """privacy=user: the resolved delta, noise multipliers and planned epsilon (``privacy.plan.*`` keys)."""
    if not cfg.privacy.user_level:
        return {}
    plan, z_update, count = user_dp_plan(cfg)
    return {
        "privacy.plan.delta": plan.delta,
        "privacy.plan.noise_multiplier": plan.noise_multiplier,
        "privacy.plan.update_noise_multiplier": z_update,
        "privacy.plan.clip_count_stddev": count,
        "privacy.plan.client_rate": plan.sample_rate,
        "privacy.plan.epsilon": plan.spent(plan.planned()),
    }


def record_spent(out: Path) -> None:
    """run_config.json gets the epsilon the run spent (``privacy.spent.epsilon``), under user-level DP."""
    import json

    path = out / RUN_CONFIG
    flat = json.loads(path.read_text())
    if "privacy.plan.epsilon" in flat:
        flat["privacy.spent.epsilon"] = summarise_metrics(out / METRICS)["epsilon_spent"]
        write_json(path, flat)


def summarise(out: Path) -> None:
    console.console.print(console.summary_table(read_metrics(out / METRICS)))
    console.console.print(f"outputs: {out}  (metrics.csv, checkpoint.safetensors, adapter/)")


def simulate(
    cfg: RunConfig,
    composed: Any,
    *,
    overrides: Sequence[str] = (),
    dry_run: bool,
    verbose: bool,
    overwrite: bool = False,
) -> int:
    """Validate, show the partitions (and DP plan), write the config, run the simulation, print the rounds.

    Nothing is written before every check passed; a folder holding another run is refused
    unless resuming from its checkpoint or ``overwrite``."""
    import torch

    from fedlora.learning.data import load_calibration
    from fedlora.learning.worker import get_worker

    if cfg.simulation.num_gpus > 0 and not torch.cuda.is_available() and not cfg.simulation.ray_address:
        raise ConfigError("simulation.num_gpus > 0 but this machine has no CUDA GPU")
    cfg_output_dir = cfg.output_dir
    cfg, out = output_folder(cfg, composed)
    check_writable(out)
    check_output(out, resume=cfg.server.resume, overwrite=overwrite or dry_run)
    if overwrite and not dry_run:
        check_overwrite(out, inputs=run_inputs(cfg), resume=cfg.server.resume)
    run_config_for(cfg)  # a setting the Flower run config cannot carry fails here, as it would deployed

    # Load data and model here, before Ray starts: bad paths and columns fail fast, and the
    # ServerApp (a thread of this process) finds them in the worker cache.
    worker = get_worker(cfg)
    with console.console.status(
        f"loading the data and model {cfg.model.name}; partitioning for {cfg.clients:,} clients"
    ):
        worker.warm_up()
    check_resume(cfg, worker)
    init = worker.strategy.gradient_init
    if init is not None and not init.from_clients:  # the calibration file fails now, not after the nodes started
        load_calibration(cfg.data, init.source, label_names=worker.data.splits.label_names)
    check_budget(cfg, worker.privacy_plan)  # an impossible budget fails here (the ServerApp checks it too)
    if cfg.privacy.enabled:
        console.show_privacy(worker)
    if cfg.privacy.user_level:
        console.show_user_privacy(worker)
    if cfg.server.secure:
        from fedlora.flower.secure import describe

        console.console.print(describe(cfg), highlight=False)
    counts = console.show_partitions(worker)
    if dry_run:
        from omegaconf import OmegaConf

        composed.output_dir = cfg_output_dir  # as given: a dry run makes no folder
        where = out if cfg_output_dir else "outputs/<date>/<time>"
        console.console.print(OmegaConf.to_yaml(composed))
        console.console.print(f"dry run: the config is valid; nothing was trained or written (a run writes to {where})")
        return 0
    with lock(out):  # a second run into this folder stops here, before it writes anything
        if overwrite:
            clear_outputs(out)
        write_partitions(out, worker.data.splits.label_names, counts.tolist())
        return _run(cfg, composed, out, worker, overrides=overrides, verbose=verbose)


def _run(cfg: RunConfig, composed: Any, out: Path, worker: Worker, *, overrides: Sequence[str], verbose: bool) -> int:
    """The checked run: its config written, the simulation, the summary."""
    from fedlora.flower.simulation import run_flower_simulation

    write_config(cfg, composed, out, list(overrides))
    console.console.print(console.header(worker, out))
    with round_lines(cfg.rounds) as (on_round, on_progress):
        signals = run_flower_simulation(cfg, verbose=verbose, on_round=on_round, on_progress=on_progress)
    if signals.received is not None:
        console.err_console.print(interrupted_message(out, cfg.rounds), highlight=False, soft_wrap=True)
        return signals.exit_code
    summarise(out)
    record_spent(out)
    if not cfg.privacy.user_level:  # a user-level round always releases its noisy mean
        check_aggregated(out, cfg.server.min_replies)
    return 0


def centralised(cfg: RunConfig, composed: Any, *, overrides: Sequence[str] = (), overwrite: bool = False) -> int:
    """The centralised reference of a federated run's config (:mod:`fedlora.commands.centralised`)."""
    from fedlora.commands.centralised import run_centralised, steps_per_round
    from fedlora.learning.data import load_splits

    cfg, out = output_folder(cfg, composed)
    check_writable(out)
    check_output(out, resume=False, overwrite=overwrite)
    if overwrite:
        check_overwrite(out, inputs=run_inputs(cfg), resume=False)
    train_size = len(load_splits(cfg.data, seed=cfg.seed).train)
    steps = steps_per_round(cfg, train_size)
    with lock(out):
        if overwrite:
            clear_outputs(out)
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


def run(overrides: Sequence[str] = (), *, overwrite: bool = False, verbose: bool = False) -> Path:
    """``fedlora simulate <overrides>`` from Python: compose, check, run; the run's folder.

    Raises :class:`ConfigError` for bad input (before any work) and :class:`RunFailed` when the run
    stopped without finishing (interrupted, or no round aggregated)."""
    from fedlora.config.compose import compose

    cfg, composed = compose(list(overrides))
    cfg, out = output_folder(cfg, composed)
    code = simulate(cfg, composed, overrides=overrides, dry_run=False, verbose=verbose, overwrite=overwrite)
    if code != 0:
        raise RunFailed(f"fedlora simulate stopped with exit status {code}; its folder: {out}")
    return out
