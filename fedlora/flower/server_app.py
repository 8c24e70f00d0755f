"""The ServerApp: one federated run, the same in simulation and deployment.

Both read the run's config the same way, from the Flower App's run config
(:func:`fedlora.appconfig.from_run_config`): a deployment from ``context.run_config``,
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

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load_file

from fedlora import gradient_init
from fedlora.appconfig import from_run_config
from fedlora.checkpoint import CHECKPOINT, SERVER_OPTIMIZER, load_checkpoint_meta, save_checkpoint, save_tensors
from fedlora.config import RunConfig
from fedlora.console import quiet_libraries, round_line, summary_text
from fedlora.export import export_adapter
from fedlora.flower import records
from fedlora.flower.rounds import FlowerRounds
from fedlora.lora import Role
from fedlora.metrics import METRICS, MetricsLog, columns, round_row, summarise
from fedlora.privacy import UNSAFE_WARNING
from fedlora.tracking import open_trackers
from fedlora.worker import Worker, get_worker

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]
ProgressCallback = Callable[[int, int], None]  # (replies so far, messages) within a round
ADAPTER_DIR = "adapter"
SERVER_LOG = "server.log"


def make_server_app(
    run_config: Mapping[str, Any] | None = None,
    *,
    on_round: RoundCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> ServerApp:
    """A ServerApp for the App run config ``run_config`` (None: the context's, as deployed)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if run_config is not None:
            cfg = from_run_config(run_config)
            run_server(grid, cfg, on_round=on_round, on_progress=on_progress)
            return
        # Deployed (flwr run): what a person follows with `flwr log` or --stream is this process's output.
        quiet_libraries()
        with logging_to_stdout():
            cfg = from_run_config(context.run_config)
            if not cfg.output_dir:  # a copy: the parsed config is cached per process
                cfg = dataclasses.replace(cfg, output_dir=f"outputs/run-{context.run_id}")
            try:
                out = run_server(grid, cfg, on_round=lambda row: log.info(round_line(row, cfg.rounds)))
            except FederationError as err:
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
    grid: Grid, cfg: RunConfig, *, on_round: RoundCallback | None = None, on_progress: ProgressCallback | None = None
) -> Path:
    """Run ``cfg.rounds`` rounds; write metrics, checkpoints and the final adapter. Returns the folder.

    With ``server.resume`` and a checkpoint in the output folder, the run continues after
    the checkpoint's round, from its state, D and privacy ledgers.
    """
    out = Path(cfg.output_dir or "outputs/serverapp").resolve()
    out.mkdir(parents=True, exist_ok=True)
    with run_log(out / SERVER_LOG):
        return _run_server(grid, cfg, out, on_round=on_round, on_progress=on_progress)


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """fedlora's log records (failed, late and rejected replies, resumes) also go to ``path``."""
    handler = logging.FileHandler(path)
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
    grid: Grid, cfg: RunConfig, out: Path, *, on_round: RoundCallback | None, on_progress: ProgressCallback | None
) -> Path:
    if cfg.privacy.enabled and cfg.privacy.unsafe_seeded_randomness:
        log.warning(UNSAFE_WARNING)
    nodes, clients = discover_partitions(grid, expected=cfg.clients, timeout=cfg.server.node_timeout)
    cfg = cfg.with_clients(clients)
    worker = get_worker(cfg).warm_up()
    rounds = FlowerRounds(
        cfg, worker.protocol, worker.initial_state(), nodes, label_names=worker.splits.label_names,
        on_progress=on_progress,
    )  # fmt: skip
    resumed = resume(rounds, out) if cfg.server.resume else None
    if resumed is None:
        initialise(grid, rounds, worker)
    metrics = MetricsLog(
        out / METRICS,
        columns(cfg.privacy, (*worker.task.metric_columns, *worker.strategy.metric_columns)),
        resume_after=resumed,
        trackers=open_trackers(cfg.trackers, out, cfg.to_flat()),
    )

    def after_round(server_round: int) -> None:
        stats = rounds.stats.get(server_round)
        started = time.perf_counter()
        every = cfg.train.eval_every
        due = every > 0 and (server_round % every == 0 or server_round == cfg.rounds)
        base = rounds.fold_log.delta
        evaluation = worker.evaluate(rounds.state, base=base) if due else {}  # the full state, not a broadcast
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
        gradients = rounds.gradient_round(grid, init, expected=gradient_init.expected(worker))
    else:  # a public calibration file: the server computes it, nothing is sent
        gradients, _ = gradient_init.from_calibration(worker, init.source, num_examples=init.samples)
    rounds.state = gradient_init.initialise(worker, rounds.state, gradients)


# -- checkpoints: everything a restarted ServerApp needs to go on ------------------------
def checkpoint_meta(rounds: FlowerRounds) -> dict[str, Any]:
    """What the tensors do not hold: the run it belongs to, D's version, the DP ledgers."""
    return {
        "config": _resumable(rounds.cfg),
        "fold_version": rounds.fold_log.version,
        "ledgers": {str(pid): [list(step) for step in history] for pid, history in rounds.ledgers().items()},
    }


def _resumable(cfg: RunConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint's (not: rounds, output, server tolerances)."""
    return {
        k: v
        for k, v in cfg.to_flat().items()
        if k not in ("rounds", "output_dir") and k.split(".")[0] not in ("server", "simulation")
    }


def resume(rounds: FlowerRounds, out: Path) -> int | None:
    """Load ``out``'s checkpoint into ``rounds``; the round it was taken after (None: no checkpoint)."""
    path = out / CHECKPOINT
    if not path.exists():
        log.info("server.resume: no checkpoint in %s, starting from round 1", out)
        return None
    tensors, server_round, meta = load_checkpoint_meta(path)
    theirs, ours = meta.get("config", {}), _resumable(rounds.cfg)
    differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    if differ:
        raise ValueError(f"the checkpoint in {out} is from a different run: {differ[:5]} differ")
    rounds.state = {k: v for k, v in tensors.items() if k.role is not Role.BASE}
    rounds.fold_log.restore({k: v for k, v in tensors.items() if k.role is Role.BASE}, meta["fold_version"] or 0)
    if (out / SERVER_OPTIMIZER).exists():
        rounds.server_opt.load_state_tensors(load_file(str(out / SERVER_OPTIMIZER)))
    for pid, history in meta["ledgers"].items():
        ledger = [tuple(step) for step in history]
        if int(pid) in rounds.nodes:
            rounds.nodes[int(pid)].ledger = ledger
        else:
            rounds.absent_ledgers[int(pid)] = ledger
    return server_round


class FederationError(RuntimeError):
    """The nodes the run needs did not connect: one line says how many did and what to change."""


SETTLE_S = 10.0  # no new node for this long: look at whether the connected nodes are the whole federation


def discover_partitions(grid: Grid, *, expected: int, timeout: float) -> tuple[dict[int, int], int]:
    """(partition id -> node id, the federation's number of clients), asking each connected node once.

    The run waits for ``expected`` nodes (its ``clients``). Flower's local simulation starts
    its own number of SuperNodes (2 by default), each told its partition id and the number
    of partitions M: when the nodes connected for ``SETTLE_S`` seconds are exactly such a
    federation (M nodes, ids 0..M-1, all saying M), the run goes on with ``clients=M``.
    After ``timeout`` seconds without enough nodes, :class:`FederationError`.
    """
    deadline = time.monotonic() + timeout
    count, changed, told = -1, time.monotonic(), 0.0
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        now = time.monotonic()
        if len(node_ids) != count:
            count, changed = len(node_ids), now
        if now - told >= 30 or told == 0.0:
            log.info("waiting for nodes: %d of %d connected", len(node_ids), expected)
            told = now
        if node_ids and now - changed >= SETTLE_S:
            found, parts = _ask_partitions(grid, node_ids, timeout=timeout)
            size = _whole_federation(found, parts)
            if size:
                log.warning(
                    "the connected nodes are a federation of %d clients (each says num-partitions=%d): "
                    "running with clients=%d instead of %d", size, size, size, expected,
                )  # fmt: skip
                return found, size
            changed = now  # ask again only after the next quiet spell
        if now > deadline:
            raise FederationError(
                f"only {len(node_ids)} of {expected} client nodes connected within server.node_timeout={timeout:g} s; "
                f"start {expected} SuperNodes (Flower's local simulation: options.num-supernodes = {expected} in "
                f"$FLWR_HOME/config.toml) or run with clients={len(node_ids) or 1}"
            )
        time.sleep(1.0)
    found, _ = _ask_partitions(grid, node_ids, timeout=timeout)
    return found, expected


def _whole_federation(found: dict[int, int], parts: dict[int, int]) -> int:
    """M when the nodes are partitions 0..M-1 of a federation of M (M > 1), each saying so; else 0."""
    sizes = set(parts.values())
    if len(sizes) == 1 and (size := sizes.pop()) > 1 and sorted(found) == list(range(size)) and len(parts) == size:
        return size
    return 0


def _ask_partitions(grid: Grid, node_ids: list[int], *, timeout: float) -> tuple[dict[int, int], dict[int, int]]:
    """(partition id -> node id, partition id -> the num-partitions its node config says, where it says)."""
    messages = [
        Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in node_ids
    ]
    found: dict[int, int] = {}
    parts: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log.warning("node %d did not say its partition: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        metrics = reply.content[records.METRICS]
        pid = int(metrics[records.PARTITION_ID])
        if pid in found:
            raise ValueError(f"two nodes claim partition {pid}")
        found[pid] = reply.metadata.src_node_id
        if records.NUM_PARTITIONS in metrics:
            parts[pid] = int(metrics[records.NUM_PARTITIONS])
    if not found:
        raise RuntimeError("no node answered the partition query")
    return found, parts
