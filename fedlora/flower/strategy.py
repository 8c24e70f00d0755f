"""The one Flower strategy: Flower's FedAvg message plumbing around a fedlora Strategy.

It keeps Flower's ``configure_train``/``aggregate_train`` interface, runs its own
round loop (:meth:`FedLoraStrategy.run`, which can start from a resumed round),
and changes five things:
clients are sampled by partition id with a generator seeded by (seed, round), so
a run is reproducible although node ids are random; replies are sorted by
partition id before aggregation, so results do not depend on arrival order;
aggregation is delegated to the pure-tensor strategy in ``strategies/``; and
tensors fixed for the run (``strategy.fixed``) go to each node once: a node keeps
them in its ``context.state``, and one that lost them (a restart) fails its round,
which makes the server send them again the next time it is sampled; and every
reply is checked (:mod:`fedlora.validation`) before it may enter the aggregate:
failed, late, malformed, non-finite or too large replies are logged with their
client and left out, and a round with fewer than ``server.min_replies`` good
replies leaves the global adapter unchanged.

With DP-SGD each client's accountant history comes back with its reply; the
server keeps the latest (``ledgers``, checkpointed) and sends it with the client's
next round, so a node whose state was lost (a restarted run) continues its budget.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.flower import records
from fedlora.folding import FoldLog, FoldUpdate
from fedlora.lora import Tensors
from fedlora.privacy import Step
from fedlora.schedule import sample_partitions
from fedlora.validation import reject_reason
from fedlora.worker import Worker, derive_seed

log = logging.getLogger(__name__)


@dataclass
class RoundStats:
    """Communication and timing of one round, measured from the real payloads."""

    started: float = field(default_factory=time.perf_counter)
    replies_expected: int = 0
    replies_received: int = 0  # arrived in time, without error
    replies_rejected: int = 0  # arrived but failed validation
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

        def refused(m: Message) -> bool:
            return records.METRICS in m.content and bool(int(m.content[records.METRICS].get(records.REFUSED, 0)))

        for m in replies:
            metrics = m.content.metric_records.get(records.METRICS, {})
            if records.EPSILON in metrics:
                self.epsilons.append(float(metrics[records.EPSILON]))
        kept = [m for m in replies if not refused(m)]
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
        self.ledgers: dict[int, list[Step]] = {}  # partition -> its latest DP accountant history
        self._sent: list[tuple[Message, int]] = []  # this round's messages and the partition each asks to train
        self._asked: dict[str, int] | None = None  # message id -> partition, for this round's replies

    def run(self, grid: Grid, *, first_round: int, evaluate_fn: Callable[[int], None]) -> None:
        """Rounds ``first_round`` .. ``cfg.rounds``; ``evaluate_fn(round)`` after each."""
        cfg = self.worker.cfg
        for server_round in range(first_round, cfg.rounds + 1):
            arrays = records.to_record(self.worker.sent_down(self.state))
            messages = list(self.configure_train(server_round, arrays, ConfigRecord(), grid))
            replies = grid.send_and_receive(messages, timeout=cfg.server.round_timeout) if messages else []
            self.aggregate_train(server_round, replies)
            evaluate_fn(server_round)

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
        stats = self.stats[server_round] = RoundStats(replies_expected=len(chosen))
        online = set(grid.get_node_ids())
        offline = [pid for pid in chosen if self.nodes_by_partition[pid] not in online]
        if offline:
            log.warning("round %d: partition(s) %s sampled but their nodes are offline", server_round, offline)
            chosen = [pid for pid in chosen if pid not in offline]
        fixed = self.worker.strategy.fixed(self.state)
        digest = records.digest(fixed) if fixed else ""
        if digest != self._fixed_digest:
            self._fixed_digest, self.holding = digest, set()
        fixed_record = records.to_record(fixed) if fixed else None
        arrays_size = records.size(arrays)
        fixed_size = records.size(fixed_record) if fixed_record is not None else (0, 0)
        config[records.SERVER_ROUND] = server_round
        config[records.FIXED_DIGEST] = digest
        config[records.LABELS] = list(self.worker.splits.label_names)
        self._carried_fixed = set()
        messages = []
        fold_records: dict[object, ArrayRecord] = {}  # entry index or "dense" -> record, built once per round
        self._sent_versions = {}
        self._sent, self._asked = [], None
        for pid in chosen:
            node = self.nodes_by_partition[pid]
            node_config = ConfigRecord(dict(config)) if self.fold_log is not None else config
            content = RecordDict({records.ARRAYS: arrays, records.CONFIG: node_config})
            if pid in self.ledgers:
                content[records.PRIVACY] = records.ledger_record(self.ledgers[pid])
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
            self._sent.append((messages[-1], pid))
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
        stats = self.stats[server_round]
        arrived = []
        for m in replies:
            if m.has_error():
                pid = self._partition_of(m)
                log.warning("round %d: partition %s failed: %s", server_round, pid, m.error.reason)
                self.holding.discard(self.nodes_by_partition.get(pid))  # it may have lost its fixed tensors
            else:
                arrived.append(m)
        silent = sorted({pid for _, pid in self._sent} - {self._partition_of(m) for m in replies})
        if silent:
            log.warning(
                "round %d: partition(s) %s did not reply within server.round_timeout=%g s",
                server_round,
                silent,
                self.worker.cfg.server.round_timeout,
            )
        replied = {m.metadata.src_node_id for m in arrived}
        self.holding |= self._carried_fixed & replied
        for node, version in self._sent_versions.items():  # a failed or silent node's base version is unknown
            self.versions[node] = version if node in replied else None
        stats.replies_received = len(arrived)
        self._note_ledgers(arrived)
        arrived = stats.count(arrived)
        if stats.refused:
            log.warning("round %d: %d client(s) refused: privacy budget exhausted", server_round, stats.refused)

        valid, payloads, num_examples, losses = [], [], [], []
        for m in sorted(arrived, key=lambda m: self._partition_of(m) or 0):
            arrays = m.content[records.ARRAYS]
            numbers, nbytes = records.size(arrays)
            stats.numbers_up += numbers
            stats.bytes_up += nbytes
            checked = self._check_reply(m, server_round)
            if isinstance(checked, str):
                pid = self._partition_of(m)
                log.warning(
                    "round %d: rejected the reply of partition %s (node %d): %s",
                    server_round,
                    pid,
                    m.metadata.src_node_id,
                    checked,
                )
                stats.replies_rejected += 1
                continue
            payload, n, loss = checked
            valid.append(m)
            payloads.append(payload)
            num_examples.append(n)
            losses.append(loss)
        needed = self.worker.cfg.server.min_replies
        if len(valid) < needed:
            log.warning(
                "round %d: %d valid replies, fewer than server.min_replies=%d; the global adapter is unchanged",
                server_round,
                len(valid),
                needed,
            )
            return None, None

        strategy = self.worker.strategy
        p = strategy.weights(num_examples)
        self.state = strategy.aggregate(self.state, payloads, p, server_round=server_round)
        stats.report = dict(strategy.report)
        if self.fold_log is not None:
            self.fold_log.append(strategy.fold(self.state, payloads, p))
        if None not in losses:
            stats.train_loss = sum(w * x for w, x in zip(p.tolist(), losses, strict=True))
        out = records.to_record(self.worker.sent_down(self.state))
        return out, MetricRecord({"replies": len(valid)})

    def _check_reply(self, m: Message, server_round: int) -> tuple[Tensors, int, float | None] | str:
        """(payload, examples, train loss) of a reply that may be aggregated, or why it may not.

        Examples: the client's count when weighting by examples, else 1. Train loss: None
        when the client does not report one (DP clients never do).
        """
        pid = self._partition_of(m)
        if pid is None or m.metadata.src_node_id != self.nodes_by_partition[pid]:
            return "a reply to no message of this round, or from another node"
        by_examples = self.worker.cfg.strategy.weighting == "examples"
        try:
            metrics = m.content[records.METRICS]
            claimed = int(metrics[records.PARTITION_ID])
            num_examples = int(metrics[records.NUM_EXAMPLES]) if by_examples else 1
            loss = float(metrics[records.TRAIN_LOSS]) if records.TRAIN_LOSS in metrics else None
            payload = records.from_record(m.content[records.ARRAYS])
        except (KeyError, ValueError, TypeError) as err:
            return f"malformed reply ({type(err).__name__}: {err})"
        if claimed != pid:
            return f"it claims partition {claimed}"
        if num_examples < 1:
            return f"num-examples is {num_examples}"
        if loss is not None and not math.isfinite(loss):
            return f"train loss is {loss}"
        expected = self.worker.expected_reply(pid, self.state, server_round=server_round)
        reason = reject_reason(payload, expected, max_norm=self.worker.cfg.server.max_update_norm)
        return reason if reason is not None else (payload, num_examples, loss)

    def _partition_of(self, reply: Message) -> int | None:
        """The partition this round's message ``reply`` answers asked to train (None: not one of ours).

        By message id, not by sender: an error reply comes from the SuperLink.
        """
        if self._asked is None:  # built once per round, after the grid has set the message ids
            self._asked = {m.metadata.message_id: pid for m, pid in self._sent}
        return self._asked.get(reply.metadata.reply_to_message_id)

    def _note_ledgers(self, replies: list[Message]) -> None:
        """Keep each client's DP accountant history as its reply states it (never a shorter one)."""
        for m in replies:
            pid = self._partition_of(m)
            if pid is not None and records.PRIVACY in m.content:
                history = records.ledger_history(m.content[records.PRIVACY])
                if len(history) >= len(self.ledgers.get(pid, [])):
                    self.ledgers[pid] = history

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
        config[records.LABELS] = list(worker.splits.label_names)
        self._sent, self._asked = [], None
        messages = []
        for pid in chosen:
            content = RecordDict({records.CONFIG: config})
            if pid in self.ledgers:
                content[records.PRIVACY] = records.ledger_record(self.ledgers[pid])
            messages.append(Message(content, dst_node_id=self.nodes_by_partition[pid], message_type=MessageType.TRAIN))
            self._sent.append((messages[-1], pid))
        stats.replies_expected = len(messages)
        replies = [m for m in grid.send_and_receive(messages, timeout=timeout) if not m.has_error()]
        stats.replies_received = len(replies)
        self._note_ledgers(replies)
        replies = stats.count(replies)
        expected = worker.base_shapes()
        total: Tensors = {}
        for m in sorted(replies, key=lambda m: self._partition_of(m) or 0):
            pid = self._partition_of(m)
            if pid is None:
                continue
            try:
                gradients = records.from_record(m.content[records.ARRAYS])
            except (KeyError, ValueError) as err:
                gradients, reason = {}, f"malformed reply ({type(err).__name__}: {err})"
            else:
                reason = reject_reason(gradients, expected)  # no norm bound: gradients are sums, not changes
            if reason is not None:
                log.warning("round 0: rejected the gradient of partition %d: %s", pid, reason)
                stats.replies_rejected += 1
                continue
            numbers, nbytes = records.size(m.content[records.ARRAYS])
            stats.numbers_up += numbers
            stats.bytes_up += nbytes
            for key, grad in gradients.items():
                total[key] = total[key] + grad.double() if key in total else grad.double()
        if not total:
            raise RuntimeError("no client gave a valid gradient for the initialisation (round 0)")
        log.info("gradient initialisation from %d clients: %d numbers uploaded", len(replies), stats.numbers_up)
        self.state = worker.initialise(self.state, {k: v.float() for k, v in total.items()})
