"""The ServerApp: one federated run, the same in simulation and deployment.

Both read the run's config the same way, from the Flower App's run config
(:func:`fedlora.config.app.from_run_config`): a deployment from ``context.run_config``,
a simulation from the closure of :func:`make_server_app` (``run_simulation`` takes
no run config). The round loop is :class:`fedlora.flower.rounds.FlowerRounds`'; this
module discovers the nodes, resumes, evaluates, checkpoints and exports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load_file

from fedlora.config.app import from_run_config
from fedlora.config.groups import SimulationConfig
from fedlora.config.run import ConfigError, RunConfig
from fedlora.flower import personal_eval
from fedlora.flower.discovery import FederationError, discover_partitions
from fedlora.flower.init_round import gradient_round
from fedlora.flower.personal_eval import personal_round
from fedlora.flower.rounds import FlowerRounds
from fedlora.learning import gradient_init
from fedlora.learning.model import threads
from fedlora.learning.worker import Worker, get_worker
from fedlora.lora import Role
from fedlora.outputs.checkpoint import read_checkpoint, resumable_settings, save_checkpoint, save_tensors
from fedlora.outputs.console import quiet_libraries, round_line, summary_text
from fedlora.outputs.export import export_adapter
from fedlora.outputs.metrics import MetricsLog, columns, round_row, summarise
from fedlora.outputs.run_folder import ADAPTER_DIR, CHECKPOINT, METRICS, SERVER_LOG, SERVER_OPTIMIZER
from fedlora.outputs.tracking import open_trackers
from fedlora.privacy.budget import check_budget
from fedlora.privacy.dp_sgd import UNSAFE_WARNING

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]
ProgressCallback = Callable[[int, int], None]  # (replies so far, messages) within a round
Partitions = Callable[[], dict[int, int]]  # a simulation's partition id -> node id, known without asking


def make_server_app(
    run_config: Mapping[str, Any] | None = None,
    *,
    on_round: RoundCallback | None = None,
    on_progress: ProgressCallback | None = None,
    partitions: Partitions | None = None,
    simulation: SimulationConfig | None = None,
) -> ServerApp:
    """A ServerApp for the App run config ``run_config`` (None: the context's, as deployed); ``partitions``:
    in a simulation, the engine's own table of each partition's node (no partition query);
    ``simulation``: the simulation's own ``simulation`` group (the App's run config has no ``simulation.*``
    keys, so without it the server would see their defaults)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if run_config is not None:
            cfg = from_run_config(run_config)
            if simulation is not None:
                cfg = dataclasses.replace(cfg, simulation=simulation)
            run_server(grid, cfg, on_round=on_round, on_progress=on_progress, partitions=partitions)
            return
        # Deployed (flwr run): what a person follows with `flwr log` or --stream is this process's output.
        quiet_libraries()
        with logging_to_stdout():
            cfg = from_run_config(context.run_config)
            if not cfg.output_dir:  # a copy: the parsed config is cached per process
                cfg = dataclasses.replace(cfg, output_dir=f"outputs/run-{context.run_id}")
            try:
                out = run_server(grid, cfg, on_round=lambda row: log.info(round_line(row, cfg.rounds)))
            except (FederationError, ConfigError) as err:
                log.error("%s", err)
                return
            log.info("%s", summary_text(out / METRICS))
            log.info("outputs: %s (metrics.csv, checkpoint.safetensors, adapter/)", out)

    return app


@contextlib.contextmanager
def logging_to_stdout() -> Iterator[None]:
    """fedlora's log records, INFO and up, as plain lines on standard output."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s fedlora: %(message)s"))
    logger = logging.getLogger("fedlora")
    logger.addHandler(handler)
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    try:
        yield
    finally:
        logger.removeHandler(handler)


app = make_server_app()


def run_server(
    grid: Grid,
    cfg: RunConfig,
    *,
    on_round: RoundCallback | None = None,
    on_progress: ProgressCallback | None = None,
    partitions: Partitions | None = None,
) -> Path:
    """Run ``cfg.rounds`` rounds; write metrics, checkpoints and the final adapter. Returns the folder.
    ``partitions``: each partition's node where the caller knows it (a simulation); else the nodes are asked.

    With ``server.resume`` and a checkpoint in the output folder, the run continues after
    the checkpoint's round, from its state, D and privacy ledgers.
    """
    out = Path(cfg.output_dir or "outputs/serverapp").resolve()
    out.mkdir(parents=True, exist_ok=True)
    with run_log(out / SERVER_LOG, append=cfg.server.resume):
        return _run_server(grid, cfg, out, on_round=on_round, on_progress=on_progress, partitions=partitions)


@contextlib.contextmanager
def run_log(path: Path, *, append: bool) -> Iterator[None]:
    """fedlora's log records (failed, late and rejected replies, resumes) also go to ``path``."""
    handler = logging.FileHandler(path, mode="a" if append else "w")  # a new run starts a fresh log
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fedlora")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def _run_server(
    grid: Grid,
    cfg: RunConfig,
    out: Path,
    *,
    on_round: RoundCallback | None,
    on_progress: ProgressCallback | None,
    partitions: Partitions | None,
) -> Path:
    if cfg.privacy.any and cfg.privacy.unsafe_seeded_randomness:
        log.warning(UNSAFE_WARNING)
    if partitions is not None:  # a simulation: node i holds partition i of the run's table, by construction
        nodes, clients, own_data = partitions(), cfg.clients, set()
    else:
        nodes, clients, own_data = discover_partitions(
            grid, expected=cfg.clients, timeout=cfg.server.node_timeout, min_nodes=cfg.server.min_nodes
        )
    cfg = cfg.with_clients(clients)
    worker = get_worker(cfg).warm_up()
    check_budget(
        cfg, worker.privacy_plan
    )  # the same check as fedlora simulate's: a budget that cannot be met stops here
    known_sizes = {pid: len(worker.data.rows(pid)) for pid in range(clients)}  # the server's own table
    rounds = FlowerRounds(
        cfg, worker.adapted.protocol, worker.adapted.initial_state(), nodes, label_names=worker.data.splits.label_names,
        known_sizes=known_sizes, own_data=own_data, on_progress=on_progress,
    )  # fmt: skip
    resumed = resume(rounds, out) if cfg.server.resume else None
    if resumed is None:
        initialise(grid, rounds, worker)
    # a statistic of each client's data: under DP only from what it released
    personal = personal_eval.available(cfg, labelled=bool(worker.data.splits.label_names))
    personal_columns = personal_eval.COLUMNS if personal else ()
    metrics = MetricsLog(
        out / METRICS,
        columns(cfg.privacy, (*worker.task.metric_columns, *personal_columns, *worker.strategy.metric_columns)),
        resume_after=resumed,
        trackers=open_trackers(cfg.trackers, out, cfg.to_flat()),
    )

    def after_round(server_round: int) -> None:
        stats = rounds.stats.get(server_round)
        started = time.perf_counter()
        every = cfg.train.eval_every
        due = every > 0 and (server_round % every == 0 or server_round == cfg.rounds)
        base = rounds.fold_log.delta
        with threads(cfg.simulation.server_threads):  # no client trains now
            evaluation = worker.evaluate(rounds.state, base=base) if due else {}  # the full state, not a broadcast
        if due and personal:
            last = server_round == cfg.rounds and bool(rounds.protocol.personal)  # FedSA-LoRA's own models
            evaluation |= personal_round(rounds, grid, server_round, export=last)
        save_checkpoint(out, rounds.state | base, server_round=server_round, meta=checkpoint_meta(rounds))
        if moments := rounds.server_opt.state_tensors():
            save_tensors(out / SERVER_OPTIMIZER, moments)
        wall_s = time.perf_counter() - (stats.started if stats else started)
        row = round_row(server_round, evaluation, stats, privacy=cfg.privacy, wall_s=wall_s)
        metrics.append(row)
        if on_round is not None:
            on_round(row)

    if resumed is None:
        after_round(0)
    else:
        log.info("resuming after round %d of %d from %s", resumed, cfg.rounds, out / CHECKPOINT)
    try:
        rounds.run(grid, first_round=(resumed or 0) + 1, after_round=after_round)
    finally:
        metrics.close()
    summary = summarise(out / METRICS)
    export_adapter(worker, rounds.state, out / ADAPTER_DIR, fold_log=rounds.fold_log, summary=summary)
    return out


def initialise(grid: Grid, rounds: FlowerRounds, worker: Worker) -> None:
    """The strategy's gradient initialisation before round 1, if it has one (Fed-SB's LoRA-SB)."""
    init = worker.strategy.gradient_init
    if init is None:
        return
    if init.from_clients:
        gradients = gradient_round(rounds, grid, init, expected=gradient_init.expected(worker))
    else:  # a public calibration file: the server computes it, nothing is sent
        gradients, _ = gradient_init.from_calibration(worker, init.source, num_examples=init.samples)
    rounds.state = gradient_init.initialise(worker, rounds.state, gradients)


# -- checkpoints: everything a restarted ServerApp needs to go on ------------------------
def checkpoint_meta(rounds: FlowerRounds) -> dict[str, Any]:
    """What the tensors do not hold: the run it belongs to, D's version, the DP ledgers."""
    return {
        "config": resumable_settings(rounds.cfg),
        "fold_version": rounds.fold_log.version,
        "ledgers": {str(pid): [list(step) for step in history] for pid, history in rounds.ledgers().items()},
        "user_dp": rounds.user_dp.state() if rounds.user_dp is not None else None,
    }


def resume(rounds: FlowerRounds, out: Path) -> int | None:
    """Load ``out``'s checkpoint into ``rounds``; the round it was taken after (None: no checkpoint)."""
    path = out / CHECKPOINT
    if not path.exists():
        log.info("server.resume: no checkpoint in %s, starting from round 1", out)
        return None
    tensors, server_round, meta = read_checkpoint(path, initial=rounds.state, cfg=rounds.cfg)
    rounds.state = {k: v for k, v in tensors.items() if k.role is not Role.BASE}
    rounds.fold_log.restore({k: v for k, v in tensors.items() if k.role is Role.BASE}, meta["fold_version"] or 0)
    if (out / SERVER_OPTIMIZER).exists():
        rounds.server_opt.load_state_tensors(load_file(str(out / SERVER_OPTIMIZER)))
    if rounds.user_dp is not None and meta.get("user_dp"):
        rounds.user_dp.restore(meta["user_dp"])
    for pid, history in meta["ledgers"].items():
        ledger = [tuple(step) for step in history]
        if int(pid) in rounds.nodes:
            rounds.nodes[int(pid)].ledger = ledger
        else:
            rounds.absent_ledgers[int(pid)] = ledger
    return server_round
