"""The ServerApp: one federated run, the same in simulation and deployment.

Simulation builds it with :func:`make_server_app` (the run config travels by
closure, since ``run_simulation`` takes none); a deployment loads the module-level
``app``, which reads ``context.run_config`` (``RunConfig.to_flat()`` form).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.checkpoint import METRICS, MetricsLog, save_checkpoint
from fedlora.config import RunConfig
from fedlora.export import export_adapter
from fedlora.flower import records
from fedlora.flower.strategy import FedLoraStrategy
from fedlora.worker import get_worker

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]
ADAPTER_DIR = "adapter"
NODE_WAIT_S = 600.0
ROUND_TIMEOUT_S = 3600.0


def make_server_app(flat: Mapping[str, Any] | None = None, *, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp for the run ``flat`` (or the context's run config when None)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_flat(flat if flat is not None else context.run_config)
        run_server(grid, cfg, on_round=on_round)

    return app


app = make_server_app()


def run_server(grid: Grid, cfg: RunConfig, *, on_round: RoundCallback | None = None) -> Path:
    """Run ``cfg.rounds`` rounds; write metrics, checkpoints and the final adapter. Returns the folder."""
    out = Path(cfg.output_dir or "outputs/serverapp").resolve()
    out.mkdir(parents=True, exist_ok=True)
    worker = get_worker(cfg)
    nodes = discover_partitions(grid, expected=cfg.clients)
    fl = FedLoraStrategy(worker, worker.initial_state(), nodes_by_partition=nodes)
    if worker.strategy.gradient_init:
        fl.initialise(grid, timeout=ROUND_TIMEOUT_S)
    privacy_columns = ("refused", "epsilon_max", "epsilon_mean") if cfg.privacy.enabled else ()
    metrics = MetricsLog(out / METRICS, extra=(*privacy_columns, *worker.strategy.metric_columns))

    def evaluate(server_round: int, arrays: Any) -> MetricRecord | None:
        stats = fl.stats.get(server_round)
        every = cfg.train.eval_every
        due = every > 0 and (server_round % every == 0 or server_round == cfg.rounds)
        started = time.perf_counter()
        base = fl.fold_log.delta if fl.fold_log is not None else None
        result = worker.evaluate(fl.state, base=base) if due else {}  # the full state: broadcasts may omit some
        if server_round > 0:
            save_checkpoint(out, fl.state | (base or {}), server_round=server_round)  # base: D, if any
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
                "numbers_up": stats.numbers_up,
                "bytes_up": stats.bytes_up,
                "numbers_down": stats.numbers_down,
                "bytes_down": stats.bytes_down,
                **stats.report,
                **(stats.privacy() if cfg.privacy.enabled else {}),
            }
        metrics.append(row)
        if on_round is not None:
            on_round(row)
        return MetricRecord({k: v for k, v in result.items() if not math.isnan(v)}) if result else None

    initial = records.to_record(worker.sent_down(fl.state))
    fl.start(grid, initial_arrays=initial, num_rounds=cfg.rounds, timeout=ROUND_TIMEOUT_S, evaluate_fn=evaluate)
    export_adapter(worker, fl.state, out / ADAPTER_DIR, fold_log=fl.fold_log)
    return out


def discover_partitions(grid: Grid, *, expected: int) -> dict[int, int]:
    """Partition id -> node id, asked of every connected node once (node ids are random)."""
    deadline = time.monotonic() + NODE_WAIT_S
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of {expected} nodes connected in {NODE_WAIT_S:.0f} s")
        log.info("waiting for nodes: %d of %d connected", len(node_ids), expected)
        time.sleep(1.0)
    messages = [
        Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in node_ids
    ]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=ROUND_TIMEOUT_S):
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
