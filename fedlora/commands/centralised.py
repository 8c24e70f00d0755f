"""The centralised reference: what the same model and adapter reach on the pooled data.

``fedlora centralised <overrides>`` takes the overrides of the federated run it is
compared with and trains plain LoRA (FedAvg's adapter: A and B, the same rank, alpha,
targets and head) on all the training data in one process, without Flower: as many
"rounds" as the federated run, each of ``clients_per_round x local steps`` optimizer
steps, so that the two runs take the same number of optimizer steps in all and are
evaluated on the same test set at the same points. The local optimizer is fresh each
round and follows the same learning-rate schedule, as a federated client's does.
It writes what a simulation writes (``metrics.csv``, ``checkpoint.safetensors``,
``adapter/``, ``config.yaml``, ``run_config.json``). It is a non-private reference:
``privacy`` is set to none.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlora.config.federated import PrivacyConfig
from fedlora.config.groups import PartitionConfig
from fedlora.config.run import RunConfig
from fedlora.learning.model import set_threads
from fedlora.learning.train import local_steps
from fedlora.learning.worker import Worker
from fedlora.outputs.checkpoint import save_checkpoint
from fedlora.outputs.export import export_adapter
from fedlora.outputs.metrics import MetricsLog, RoundStats, columns, round_row, summarise
from fedlora.outputs.run_folder import ADAPTER_DIR, METRICS
from fedlora.outputs.tracking import open_trackers


def overrides_for(overrides: list[str]) -> list[str]:
    """The federated run's overrides, as plain LoRA on pooled data (strategy and privacy replaced)."""
    dropped = ("strategy=", "strategy.", "privacy=", "privacy.")
    return [o for o in overrides if not o.lstrip("+~").startswith(dropped)] + ["strategy=fedavg", "privacy=none"]


def steps_per_round(cfg: RunConfig, train_size: int) -> int:
    """Optimizer steps a federated round takes in all: clients sampled x local steps (of an average client)."""
    return cfg.sampled_per_round * local_steps(cfg.train, train_size // max(1, cfg.clients))


def run_centralised(cfg: RunConfig, out: Path, *, on_round: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Train ``cfg`` (already plain LoRA, see :func:`overrides_for`) on the pooled data; outputs in ``out``."""
    set_threads(cfg.simulation.num_cpus)  # as many as one client owns: the same steps, pooled
    probe = Worker(cfg, num_partitions=1)
    steps = steps_per_round(cfg, len(probe.data.splits.train))
    pooled = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, local_steps=steps, local_epochs=None),
        partition=PartitionConfig(name="iid"),
        privacy=PrivacyConfig(),
    )
    worker = Worker(pooled, num_partitions=1).warm_up()
    state = worker.adapted.initial_state()
    metrics = MetricsLog(
        out / METRICS,
        columns(pooled.privacy, worker.task.metric_columns),
        trackers=open_trackers(cfg.trackers, out, pooled.to_flat()),
    )

    def log_round(server_round: int, stats: RoundStats | None, started: float) -> None:
        every = pooled.train.eval_every
        due = every > 0 and (server_round % every == 0 or server_round == cfg.rounds)
        evaluation = worker.evaluate(state) if due else {}
        save_checkpoint(out, state, server_round=server_round, meta={"centralised": True})
        row = round_row(server_round, evaluation, stats, privacy=pooled.privacy, wall_s=time.perf_counter() - started)
        metrics.append(row)
        if on_round is not None:
            on_round(row)

    log_round(0, None, time.perf_counter())
    for server_round in range(1, cfg.rounds + 1):
        stats = RoundStats()  # nothing is exchanged: only the training loss and the wall time
        payload, _, result = worker.train_round(0, worker.adapted.protocol.download(state), server_round=server_round)
        state = state | payload
        stats.train_loss = result.mean_loss
        log_round(server_round, stats, stats.started)
    metrics.close()
    export_adapter(worker, state, out / ADAPTER_DIR, summary=summarise(out / METRICS))
    return out
