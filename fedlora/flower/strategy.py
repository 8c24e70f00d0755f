"""The one Flower strategy: Flower's FedAvg round loop around a fedlora Strategy.

It keeps Flower's message plumbing and round loop, and changes three things:
clients are sampled by partition id with a generator seeded by (seed, round), so
a run is reproducible although node ids are random; replies are sorted by
partition id before aggregation, so results do not depend on arrival order; and
aggregation is delegated to the pure-tensor strategy in ``strategies/``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.flower import records
from fedlora.lora import Tensors
from fedlora.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class RoundStats:
    """Communication and timing of one round, measured from the real payloads."""

    started: float = field(default_factory=time.perf_counter)
    replies_expected: int = 0
    replies_received: int = 0
    numbers_up: int = 0
    bytes_up: int = 0
    numbers_down: int = 0
    bytes_down: int = 0
    train_loss: float | None = None


class FedLoraStrategy(FedAvg):
    """Samples, sends, collects; ``worker.strategy`` does the math on ``state``."""

    def __init__(self, worker: Worker, state: Tensors, *, nodes_by_partition: dict[int, int]) -> None:
        cfg = worker.cfg
        super().__init__(
            fraction_train=cfg.sampled_per_round / cfg.clients,
            fraction_evaluate=0.0,  # evaluation is central, on the server's test split
            min_train_nodes=cfg.sampled_per_round,
            min_available_nodes=len(nodes_by_partition),
        )
        self.worker = worker
        self.state = state
        self.nodes_by_partition = dict(sorted(nodes_by_partition.items()))
        self.stats: dict[int, RoundStats] = {}

    def sample(self, server_round: int) -> list[int]:
        """Partition ids to train this round: seeded by (seed, round), sorted."""
        rng = random.Random(f"fedlora-sample:{self.worker.cfg.seed}:{server_round}")
        k = min(self.worker.cfg.sampled_per_round, len(self.nodes_by_partition))
        return sorted(rng.sample(list(self.nodes_by_partition), k))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        chosen = self.sample(server_round)
        numbers, nbytes = records.size(arrays)
        self.stats[server_round] = RoundStats(
            replies_expected=len(chosen), numbers_down=numbers * len(chosen), bytes_down=nbytes * len(chosen)
        )
        config[records.SERVER_ROUND] = server_round
        content = RecordDict({records.ARRAYS: arrays, records.CONFIG: config})
        nodes = [self.nodes_by_partition[p] for p in chosen]
        log.debug("round %d: training partitions %s", server_round, chosen)
        return self._construct_messages(content, nodes, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        for m in replies:
            if m.has_error():
                log.warning("round %d: node %d failed: %s", server_round, m.metadata.src_node_id, m.error.reason)
        valid.sort(key=lambda m: int(m.content[records.METRICS][records.PARTITION_ID]))
        stats = self.stats[server_round]
        stats.replies_received = len(valid)
        if not valid:
            log.warning("round %d: no client replied; the global adapter is unchanged", server_round)
            return None, None

        payloads, num_examples, losses = [], [], []
        for m in valid:
            arrays = m.content[records.ARRAYS]
            numbers, nbytes = records.size(arrays)
            stats.numbers_up += numbers
            stats.bytes_up += nbytes
            payloads.append(records.from_record(arrays))
            metrics = m.content[records.METRICS]
            num_examples.append(int(metrics[records.NUM_EXAMPLES]))
            losses.append(float(metrics[records.TRAIN_LOSS]))

        strategy = self.worker.strategy
        p = strategy.weights(num_examples)
        self.state = strategy.aggregate(self.state, payloads, p)
        stats.train_loss = sum(w * x for w, x in zip(p.tolist(), losses, strict=True))
        out = records.to_record(self.worker.sent_down(self.state))
        return out, MetricRecord({"train-loss": stats.train_loss, "replies": len(valid)})
