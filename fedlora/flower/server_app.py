"""The ServerApp: one federated run, the same in simulation and deployment.

Simulation builds it with :func:`make_server_app` (the run config travels by
closure, since ``run_simulation`` takes none); a deployment loads the module-level
``app``, which reads ``context.run_config`` (``RunConfig.to_flat()`` form).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.appconfig import from_run_config
from fedlora.checkpoint import CHECKPOINT, METRICS, MetricsLog, load_checkpoint_meta, save_checkpoint
from fedlora.config import RunConfig
from fedlora.export import export_adapter
from fedlora.flower import records
from fedlora.flower.strategy import FedLoraStrategy
from fedlora.lora import Role
from fedlora.privacy import NOT_PRIVATE, NOT_PRIVATE_COLUMN, UNSAFE_WARNING
from fedlora.worker import get_worker

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]
ADAPTER_DIR = "adapter"
SERVER_LOG = "server.log"


def make_server_app(flat: Mapping[str, Any] | None = None, *, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp for the run ``flat`` (or the context's run config when None)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if flat is not None:
            cfg = RunConfig.from_flat(flat)
        else:  # a deployment: the run config is the App's (pyproject.toml) with the run's overrides
            cfg = from_run_config(context.run_config)
            cfg.output_dir = cfg.output_dir or f"outputs/run-{context.run_id}"
        run_server(grid, cfg, on_round=on_round)

    return app


app = make_server_app()


def run_server(grid: Grid, cfg: RunConfig, *, on_round: RoundCallback | None = None) -> Path:
    """Run ``cfg.rounds`` rounds; write metrics, checkpoints and the final adapter. Returns the folder.

    With ``server.resume`` and a checkpoint in the output folder, the run continues after
    the checkpoint's round, from its state, D and privacy ledgers.
    """
    out = Path(cfg.output_dir or "outputs/serverapp").resolve()
    out.mkdir(parents=True, exist_ok=True)
    with run_log(out / SERVER_LOG):
        return _run_server(grid, cfg, out, on_round=on_round)


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


def _run_server(grid: Grid, cfg: RunConfig, out: Path, *, on_round: RoundCallback | None) -> Path:
    worker = get_worker(cfg)
    nodes = discover_partitions(grid, expected=cfg.clients, timeout=cfg.server.node_timeout)
    fl = FedLoraStrategy(worker, worker.initial_state(), nodes_by_partition=nodes)
    resumed = resume(fl, out) if cfg.server.resume else None
    if resumed is None and worker.strategy.gradient_init:
        fl.initialise(grid, timeout=cfg.server.round_timeout)
    privacy_columns = ("refused", "epsilon_max", "epsilon_mean") if cfg.privacy.enabled else ()
    unsafe = cfg.privacy.enabled and cfg.privacy.unsafe_seeded_randomness
    if unsafe:  # every row says it: a reader of metrics.csv alone must not take epsilon for a guarantee
        privacy_columns += (NOT_PRIVATE_COLUMN,)
        log.warning(UNSAFE_WARNING)
    metrics = MetricsLog(out / METRICS, extra=(*privacy_columns, *worker.strategy.metric_columns), resume_after=resumed)

    def evaluate(server_round: int) -> None:
        stats = fl.stats.get(server_round)
        every = cfg.train.eval_every
        due = every > 0 and (server_round % every == 0 or server_round == cfg.rounds)
        started = time.perf_counter()
        base = fl.fold_log.delta if fl.fold_log is not None else None
        result = worker.evaluate(fl.state, base=base) if due else {}  # the full state: broadcasts may omit some
        save_checkpoint(out, fl.state | (base or {}), server_round=server_round, meta=checkpoint_meta(fl))
        row = {
            "round": server_round,
            "test_accuracy": result.get("accuracy"),
            "test_loss": result.get("loss"),
            "wall_s": time.perf_counter() - (stats.started if stats else started),
        }
        if stats is not None:
            row |= {
                "train_loss": stats.train_loss,
                "replies_expected": stats.replies_expected,
                "replies_received": stats.replies_received,
                "replies_rejected": stats.replies_rejected,
                "numbers_up": stats.numbers_up,
                "bytes_up": stats.bytes_up,
                "numbers_down": stats.numbers_down,
                "bytes_down": stats.bytes_down,
                **stats.report,
                **(stats.privacy() if cfg.privacy.enabled else {}),
            }
        if unsafe:
            row[NOT_PRIVATE_COLUMN] = NOT_PRIVATE
        metrics.append(row)
        if on_round is not None:
            on_round(row)

    if resumed is None:
        evaluate(0)
    else:
        log.info("resuming after round %d of %d from %s", resumed, cfg.rounds, out / CHECKPOINT)
    fl.run(grid, first_round=(resumed or 0) + 1, evaluate_fn=evaluate)
    export_adapter(worker, fl.state, out / ADAPTER_DIR, fold_log=fl.fold_log)
    return out


# -- checkpoints: everything a restarted ServerApp needs to go on ------------------------
def checkpoint_meta(fl: FedLoraStrategy) -> dict[str, Any]:
    """What the tensors do not hold: the run it belongs to, D's version, the DP ledgers."""
    return {
        "config": _resumable(fl.worker.cfg),
        "fold_version": fl.fold_log.version if fl.fold_log is not None else None,
        "ledgers": {str(pid): [list(step) for step in history] for pid, history in fl.ledgers.items()},
    }


def _resumable(cfg: RunConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint's (not: rounds, output, server tolerances)."""
    return {
        k: v
        for k, v in cfg.to_flat().items()
        if k not in ("rounds", "output_dir") and k.split(".")[0] not in ("server", "simulation")
    }


def resume(fl: FedLoraStrategy, out: Path) -> int | None:
    """Load ``out``'s checkpoint into ``fl``; the round it was taken after (None: no checkpoint)."""
    path = out / CHECKPOINT
    if not path.exists():
        log.info("server.resume: no checkpoint in %s, starting from round 1", out)
        return None
    tensors, server_round, meta = load_checkpoint_meta(path)
    theirs, ours = meta.get("config", {}), _resumable(fl.worker.cfg)
    differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    if differ:
        raise ValueError(f"the checkpoint in {out} is from a different run: {differ[:5]} differ")
    fl.state = {k: v for k, v in tensors.items() if k.role is not Role.BASE}
    if fl.fold_log is not None:
        fl.fold_log.restore({k: v for k, v in tensors.items() if k.role is Role.BASE}, meta["fold_version"])
    fl.ledgers = {int(pid): [tuple(step) for step in history] for pid, history in meta["ledgers"].items()}
    return server_round


def discover_partitions(grid: Grid, *, expected: int, timeout: float) -> dict[int, int]:
    """Partition id -> node id, asked of every connected node once (node ids are random)."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of {expected} nodes connected in {timeout:.0f} s")
        log.info("waiting for nodes: %d of %d connected", len(node_ids), expected)
        time.sleep(1.0)
    messages = [
        Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in node_ids
    ]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log.warning("node %d did not say its partition: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        pid = int(reply.content[records.METRICS][records.PARTITION_ID])
        if pid in found:
            raise ValueError(f"two nodes claim partition {pid}")
        found[pid] = reply.metadata.src_node_id
    if not found:
        raise RuntimeError("no node answered the partition query")
    return found
