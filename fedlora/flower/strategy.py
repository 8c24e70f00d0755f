"""The one Flower strategy: Flower's FedAvg round loop around a fedlora Strategy.

It keeps Flower's message plumbing and round loop, and changes four things:
clients are sampled by partition id with a generator seeded by (seed, round), so
a run is reproducible although node ids are random; replies are sorted by
partition id before aggregation, so results do not depend on arrival order;
aggregation is delegated to the pure-tensor strategy in ``strategies/``; and
tensors fixed for the run (``strategy.fixed``) go to each node once: a node keeps
them in its ``context.state``, and one that lost them (a restart) fails its round,
which makes the server send them again the next time it is sampled.

A strategy with a gradient initialisation (Fed-SB's LoRA-SB) gets a round 0
before round 1 (:meth:`FedLoraStrategy.initialise`). A strategy that folds updates
into the base weights (FLoRA, FedEx) has its folds logged here (``fold_log``); each
sampled node gets what brings its base weights to the current version, counted in
the round's download (:mod:`fedlora.folding`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.flower import records
from fedlora.folding import FoldLog, FoldUpdate
from fedlora.lora import Tensors
from fedlora.schedule import sample_partitions
from fedlora.worker import Worker, derive_seed

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
    report: dict[str, float] = field(default_factory=dict)  # the strategy's own diagnostics
    refused: int = 0  # clients whose privacy budget is exhausted
    epsilons: list[float] = field(default_factory=list)  # epsilon spent so far by each replying client

    def privacy(self) -> dict[str, float | int | None]:
        """The metrics.csv columns of a DP run."""
        eps = self.epsilons
        return {
            "refused": self.refused,
            "epsilon_max": max(eps) if eps else None,
            "epsilon_mean": sum(eps) / len(eps) if eps else None,
        }

    def count(self, replies: list[Message]) -> list[Message]:
        """Note each reply's epsilon and refusal; the replies that carry an update."""
        for m in replies:
            metrics = m.content[records.METRICS]
            if records.EPSILON in metrics:
                self.epsilons.append(float(metrics[records.EPSILON]))
        kept = [m for m in replies if not int(m.content[records.METRICS].get(records.REFUSED, 0))]
        self.refused += len(replies) - len(kept)
        return kept


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
        self.holding: set[int] = set()  # nodes that hold the current fixed tensors
        self._fixed_digest = ""
        self._carried_fixed: set[int] = set()  # nodes whose message this round carried them
        self.fold_log = FoldLog(scaling=worker.strategy.scaling) if worker.strategy.folds else None
        self.versions: dict[int, int | None] = {}  # node -> the base version it holds (None: unknown)
        self._sent_versions: dict[int, int] = {}

    def sample(self, server_round: int) -> list[int]:
        """Partition ids to train this round: seeded by (seed, round), sorted."""
        return sample_partitions(
            list(self.nodes_by_partition),
            self.worker.cfg.sampled_per_round,
            seed=self.worker.cfg.seed,
            server_round=server_round,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        chosen = self.sample(server_round)
        fixed = self.worker.strategy.fixed(self.state)
        digest = records.digest(fixed) if fixed else ""
        if digest != self._fixed_digest:
            self._fixed_digest, self.holding = digest, set()
        fixed_record = records.to_record(fixed) if fixed else None
        arrays_size = records.size(arrays)
        fixed_size = records.size(fixed_record) if fixed_record is not None else (0, 0)
        stats = self.stats[server_round] = RoundStats(replies_expected=len(chosen))
        config[records.SERVER_ROUND] = server_round
        config[records.FIXED_DIGEST] = digest
        self._carried_fixed = set()
        messages = []
        fold_records: dict[object, ArrayRecord] = {}  # entry index or "dense" -> record, built once per round
        self._sent_versions = {}
        for pid in chosen:
            node = self.nodes_by_partition[pid]
            node_config = ConfigRecord(dict(config)) if self.fold_log is not None else config
            content = RecordDict({records.ARRAYS: arrays, records.CONFIG: node_config})
            sent = [arrays_size]
            if self.fold_log is not None:
                update = self.fold_log.update_for(self.versions.get(node, 0))
                fold_arrays = self._fold_records(update, fold_records)
                records.put_fold_update(content, node_config, update, fold_arrays)
                self._sent_versions[node] = update.end
                sent += [records.size(r) for r in fold_arrays]
            if fixed_record is not None and node not in self.holding:
                content[records.FIXED] = fixed_record
                self._carried_fixed.add(node)
                sent.append(fixed_size)
            stats.numbers_down += sum(numbers for numbers, _ in sent)
            stats.bytes_down += sum(nbytes for _, nbytes in sent)
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        log.debug("round %d: training partitions %s", server_round, chosen)
        return messages

    def _fold_records(self, update: FoldUpdate, cache: dict[object, ArrayRecord]) -> list[ArrayRecord]:
        """The records carrying ``update``: D, or one per entry (each converted once per round)."""
        if update.dense is not None:
            if "dense" not in cache:
                cache["dense"] = records.to_record(update.dense)
            return [cache["dense"]]
        out = []
        for i, entry in enumerate(update.entries, start=update.start):
            if i not in cache:
                cache[i] = records.to_record(entry)
            out.append(cache[i])
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        for m in replies:
            if m.has_error():
                log.warning("round %d: node %d failed: %s", server_round, m.metadata.src_node_id, m.error.reason)
                self.holding.discard(m.metadata.src_node_id)  # it may have lost its fixed tensors
        replied = {m.metadata.src_node_id for m in valid}
        self.holding |= self._carried_fixed & replied
        for node, version in self._sent_versions.items():  # a failed or silent node's base version is unknown
            self.versions[node] = version if node in replied else None
        valid.sort(key=lambda m: int(m.content[records.METRICS][records.PARTITION_ID]))
        stats = self.stats[server_round]
        stats.replies_received = len(valid)
        valid = stats.count(valid)
        if stats.refused:
            log.warning("round %d: %d client(s) refused: privacy budget exhausted", server_round, stats.refused)
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
        self.state = strategy.aggregate(self.state, payloads, p, server_round=server_round)
        stats.report = dict(strategy.report)
        if self.fold_log is not None:
            self.fold_log.append(strategy.fold(self.state, payloads, p))
        stats.train_loss = sum(w * x for w, x in zip(p.tolist(), losses, strict=True))
        out = records.to_record(self.worker.sent_down(self.state))
        return out, MetricRecord({"train-loss": stats.train_loss, "replies": len(valid)})

    def initialise(self, grid: Grid, *, timeout: float) -> None:
        """Round 0 of a gradient-initialised strategy (LoRA-SB): the state from summed base-weight gradients.

        With ``init_source=clients`` the clients sampled for round 0 each sum the
        gradient over their share of ``init_samples`` examples and send it once (its
        size is counted in round 0's stats); otherwise the server uses the named
        calibration file and nothing is sent.
        """
        worker, cfg = self.worker, self.worker.cfg
        stats = self.stats[0] = RoundStats()
        if cfg.strategy.init_source != "clients":
            gradients, _ = worker.base_gradients(
                worker.calibration, num_examples=cfg.strategy.init_samples, seed=derive_seed(cfg.seed, 0, -3)
            )
            self.state = worker.initialise(self.state, gradients)
            return
        chosen = self.sample(0)
        share = math.ceil(cfg.strategy.init_samples / len(chosen))
        config = ConfigRecord(
            {records.SERVER_ROUND: 0, records.PHASE: records.PHASE_INIT, records.INIT_EXAMPLES: share}
        )
        messages = [
            Message(
                RecordDict({records.CONFIG: config}),
                dst_node_id=self.nodes_by_partition[pid],
                message_type=MessageType.TRAIN,
            )
            for pid in chosen
        ]
        stats.replies_expected = len(messages)
        replies = [m for m in grid.send_and_receive(messages, timeout=timeout) if not m.has_error()]
        stats.replies_received = len(replies)
        replies = stats.count(replies)
        if not replies:
            raise RuntimeError("no client answered the gradient initialisation (round 0)")
        total: Tensors = {}
        for m in sorted(replies, key=lambda m: int(m.content[records.METRICS][records.PARTITION_ID])):
            arrays = m.content[records.ARRAYS]
            numbers, nbytes = records.size(arrays)
            stats.numbers_up += numbers
            stats.bytes_up += nbytes
            for key, grad in records.from_record(arrays).items():
                total[key] = total[key] + grad.double() if key in total else grad.double()
        log.info("gradient initialisation from %d clients: %d numbers uploaded", len(replies), stats.numbers_up)
        self.state = worker.initialise(self.state, {k: v.float() for k, v in total.items()})
