"""The server's rounds on Flower: sample, send, collect, validate, aggregate. It owns the global state.

:class:`FlowerRounds` holds the pure :class:`strategies.Strategy` (the math), the
:class:`fedlora.federation.protocol.Protocol` (what each client is sent and must reply), one
:class:`NodeState` per client node and the :class:`fedlora.federation.folding.FoldLog` of base
weights that change (empty for strategies that fold nothing). It derives from no
Flower strategy: it runs its own loop, so it can start at a checkpoint's round.

- Clients are sampled by partition id with a generator seeded by (seed, round), so a
  run is reproducible although Flower's node ids are random.
- Tensors fixed for the run (``strategy.fixed``: Fed-SB's A and B) go to each node
  once and stay in its ``context.state``; a node that lost them fails its round and
  gets them with its next one.
- A node of a folding strategy (FLoRA, FedEx) gets what brings its base weights to
  the current version: the folds it missed, or the server's D.
- The aggregate is the target of the server optimiser's step (``server.optimizer``;
  none: the aggregate itself), after which the strategy may re-parameterise (FedSVD).
- Every reply goes through :func:`fedlora.flower.collect.collect` (ordering by
  partition, failures, DP ledgers and refusals, byte counts) and is checked against
  what the protocol says the client must send (:mod:`fedlora.federation.validation`); a round
  with fewer than ``server.min_replies`` good replies leaves the state unchanged.
- Fed-SB's round 0 (its clients' base-weight gradients) is collected the same way.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.config.run import RunConfig
from fedlora.federation import stopping
from fedlora.federation.folding import FoldLog, FoldUpdate
from fedlora.federation.protocol import Protocol
from fedlora.federation.schedule import sample_partitions
from fedlora.federation.validation import reject_reason
from fedlora.flower import records
from fedlora.flower.collect import NodeState, Outgoing, Progress, collect
from fedlora.flower.discovery import JOIN_ASKS, JOIN_TIMEOUT_S, ask_new_nodes
from fedlora.flower.replies import Reply
from fedlora.lora import Tensors
from fedlora.outputs.metrics import RoundStats
from fedlora.privacy.accounting import Step
from fedlora.privacy.user_level import UserLevelDP
from strategies import robust
from strategies.base import GradientInit
from strategies.server_opt import ServerOptimizer

log = logging.getLogger(__name__)


@dataclass
class Checked:
    """A reply that may be aggregated: its tensors, what that client started from, its count and loss."""

    payload: Tensors
    start: Tensors
    count: int  # examples as it claims them (1 when weighting uniformly)
    loss: float | None  # None when the client does not report one (DP clients never do)


class FlowerRounds:
    """Runs the training rounds (and Fed-SB's round 0) of one run; ``state`` is the global state."""

    def __init__(
        self,
        cfg: RunConfig,
        protocol: Protocol,
        state: Tensors,
        nodes_by_partition: dict[int, int],
        *,
        label_names: tuple[str, ...],
        known_sizes: dict[int, int] | None = None,
        own_data: set[int] | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        self.cfg = cfg
        self.protocol = protocol
        self.strategy = protocol.strategy
        self.strategy.combine = robust.combiner(cfg.server.aggregation, trim=cfg.server.trim_fraction)
        own = own_data or set()
        # partition -> its size, where the server's table applies (not to a node's own data file)
        self.known_sizes = {pid: n for pid, n in (known_sizes or {}).items() if pid not in own}
        self.state = state
        self.nodes = {pid: NodeState(node) for pid, node in sorted(nodes_by_partition.items())}
        self.absent_ledgers: dict[int, list[Step]] = {}  # of partitions with no node in this run (a resume)
        self.fold_log = FoldLog(scaling=self.strategy.scaling)
        self.server_opt = ServerOptimizer(cfg.server.opt)
        self.stats: dict[int, RoundStats] = {}
        self.label_names = list(label_names)
        self.on_progress = on_progress  # (replies so far, messages) within a round
        self._fixed_digest = ""
        self._asked: dict[int, int] = {}  # late node id -> partition queries sent to it (JOIN_ASKS: no more)
        self._digest_of: tuple[int, int] = (-1, 0)  # (D's version, its digest_number)
        self.user_dp = UserLevelDP(cfg) if cfg.privacy.user_level else None

    def sample(self, server_round: int) -> list[int]:
        """Partition ids to train this round: seeded by (seed, round), sorted; the same schedule whichever
        nodes are connected (a partition without a node is skipped as offline)."""
        cfg = self.cfg
        if self.user_dp is not None and server_round > 0:  # Poisson cohorts, from private randomness
            return self.user_dp.cohort(cfg.clients, server_round)
        everyone = list(range(cfg.clients))
        return sample_partitions(everyone, cfg.sampled_per_round, seed=cfg.seed, server_round=server_round)

    def admit(self, grid: Grid, server_round: int) -> None:
        """Take in nodes that connected since the run started (or did not answer then), for partitions
        that have none yet; one that never answers is asked in ``JOIN_ASKS`` rounds at most."""
        if len(self.nodes) == self.cfg.clients:
            return
        known = {n.node_id for n in self.nodes.values()}
        new = sorted(n for n in set(grid.get_node_ids()) - known if self._asked.get(n, 0) < JOIN_ASKS)
        if not new:
            return
        timeout = min(self.cfg.server.round_timeout, JOIN_TIMEOUT_S)
        found, own, answered = ask_new_nodes(grid, new, expected=self.cfg.clients, taken=set(self.nodes),
                                             timeout=timeout)  # fmt: skip
        for pid, node in sorted(found.items()):
            self.nodes[pid] = NodeState(node, base_version=None)
            if pid in own:
                self.known_sizes.pop(pid, None)
            log.info("round %d: partition %d joined the run (node %d)", server_round, pid, node)
        for node in new:  # an answer without a usable partition is final; silence is asked again
            self._asked[node] = JOIN_ASKS if node in answered else self._asked.get(node, 0) + 1

    def ledgers(self) -> dict[int, list[Step]]:
        """Every client's latest DP accountant history (what a checkpoint keeps)."""
        return self.absent_ledgers | {pid: n.ledger for pid, n in self.nodes.items() if n.ledger is not None}

    def run(self, grid: Grid, *, first_round: int, after_round) -> None:
        """Rounds ``first_round`` .. ``cfg.rounds``; ``after_round(round)`` after each (evaluation, logs)."""
        for server_round in range(first_round, self.cfg.rounds + 1):
            stopping.check()
            if self.user_dp is not None and not self.user_dp.affords_round():
                log.warning(
                    "round %d: stopping before it: one more round would take epsilon from %.4g above "
                    "privacy.epsilon=%g", server_round, self.user_dp.spent, self.cfg.privacy.epsilon,
                )  # fmt: skip
                return
            self.train_round(grid, server_round)
            after_round(server_round)

    # -- a training round ---------------------------------------------------------------------
    def train_round(self, grid: Grid, server_round: int) -> None:
        self.admit(grid, server_round)
        chosen = self.sample(server_round)
        stats = self.stats[server_round] = RoundStats(replies_expected=len(chosen))
        online = set(grid.get_node_ids())
        offline = [pid for pid in chosen if pid not in self.nodes or self.nodes[pid].node_id not in online]
        if offline:
            log.warning("round %d: partition(s) %s sampled but their nodes are offline", server_round, offline)
        outgoing = self._train_messages(server_round, [pid for pid in chosen if pid not in offline], stats)
        log.debug("round %d: training partitions %s", server_round, [o.partition for o in outgoing])
        accepted = collect(
            grid,
            outgoing,
            nodes=self.nodes,
            stats=stats,
            server_round=server_round,
            timeout=self.cfg.server.round_timeout,
            private=self.cfg.privacy.enabled,
            check=partial(self._check, server_round=server_round),
            on_progress=self.on_progress,
        )
        if self.user_dp is not None:
            self._user_level_step(server_round, accepted, stats)
            return
        needed = self.cfg.server.min_replies
        if len(accepted) < needed:
            log.warning(
                "round %d: %d valid replies, fewer than server.min_replies=%d; the global adapter is unchanged",
                server_round, len(accepted), needed,
            )  # fmt: skip
            return
        payloads, p, losses = self._limit(server_round, accepted)
        target = self.strategy.aggregate(self.state, payloads, p, server_round=server_round)
        stepped = self.server_opt.step(self.state, target, keys=payloads[0].keys())
        self.state, changes = self.strategy.refine(stepped, server_round=server_round)
        self.server_opt.rebase(changes)
        stats.report = dict(self.strategy.report)
        if factors := self.strategy.fold(self.state, payloads, p):
            self.fold_log.append(factors)
        if None not in losses:
            stats.train_loss = sum(w * x for w, x in zip(p.tolist(), losses, strict=True))

    def _user_level_step(self, server_round: int, accepted: list[tuple[int, Checked]], stats: RoundStats) -> None:
        """privacy=user: whatever replied (none included), clipped, summed, noised, divided by the expected
        cohort; the strategy aggregates that one payload, the server optimiser and refinement post-process."""
        assert self.user_dp is not None
        like = self.protocol.expected_reply(0, self.state, server_round=server_round)
        checked = [c for _, c in accepted]
        payload = self.user_dp.round(server_round, [c.start for c in checked], [c.payload for c in checked], like)
        one = self.strategy.weights([1])
        target = self.strategy.aggregate(self.state, [payload], one, server_round=server_round)
        stepped = self.server_opt.step(self.state, target, keys=payload.keys())
        self.state, changes = self.strategy.refine(stepped, server_round=server_round)
        self.server_opt.rebase(changes)
        stats.report = dict(self.strategy.report) | self.user_dp.columns()

    def _limit(self, server_round: int, accepted: list[tuple[int, Checked]]):
        """(payloads, weights p, losses) with no client outweighing the rest (:mod:`strategies.robust`)."""
        pids = [pid for pid, _ in accepted]
        checked = [c for _, c in accepted]
        payloads = [c.payload for c in checked]
        server = self.cfg.server
        if server.update_clip is not None:
            starts = [c.start for c in checked]
            payloads, norms, bound = robust.clip_updates(payloads, starts, factor=server.update_clip)
            for pid, norm in zip(pids, norms, strict=True):
                if norm > bound:
                    log.warning(
                        "round %d: partition %d's update norm %.4g scaled down to %.4g (server.update_clip=%g x "
                        "the round's median)", server_round, pid, norm, bound, server.update_clip,
                    )  # fmt: skip
        counts = [c.count for c in checked]
        if self.cfg.strategy.weighting == "examples":
            known = [self.known_sizes.get(pid) for pid in pids]
            capped = robust.cap_counts(counts, known, ratio=server.max_weight_ratio)
            noised = self.cfg.privacy.enabled and not self.cfg.privacy.public_counts  # counts off by the DP noise
            for pid, claimed, used in zip(pids, counts, capped, strict=True):
                if used < claimed:
                    log.log(logging.DEBUG if noised else logging.WARNING,
                            "round %d: partition %d claims %d examples; weighted as %d", server_round, pid,
                            claimed, used)  # fmt: skip
            counts = capped
        return payloads, self.strategy.weights(counts), [c.loss for c in checked]

    def _train_messages(self, server_round: int, chosen: list[int], stats: RoundStats) -> list[Outgoing]:
        arrays = records.to_record(self.protocol.download(self.state))
        fixed = self.strategy.fixed(self.state)
        digest = records.digest(fixed) if fixed else ""
        if digest != self._fixed_digest:  # new fixed tensors: no node holds them yet
            self._fixed_digest = digest
            for node in self.nodes.values():
                node.holds_fixed = False
        fixed_record = records.to_record(fixed) if fixed else None
        arrays_size = records.size(arrays)
        fixed_size = records.size(fixed_record) if fixed_record is not None else (0, 0)
        base = {
            records.SERVER_ROUND: server_round, records.FIXED_DIGEST: digest, records.LABELS: self.label_names,
            records.CLIENTS: self.cfg.clients,
        }  # fmt: skip
        fold_records: dict[object, ArrayRecord] = {}  # entry index or "dense" -> record, built once per round
        outgoing = []
        for pid in chosen:
            node = self.nodes[pid]
            config = ConfigRecord(dict(base))
            content = RecordDict({records.ARRAYS: arrays, records.CONFIG: config})
            if node.ledger is not None:
                content[records.PRIVACY] = records.ledger_record(node.ledger)
            update = self.fold_log.update_for(node.base_version)
            if node.base_version is None or update.end > update.start + 1:
                log.info(
                    "round %d: partition %d catches up on base weights: version %s -> %d (%s)", server_round, pid,
                    "unknown" if node.base_version is None else node.base_version, update.end,
                    "the server's D" if update.dense is not None else f"{len(update.entries)} folds",
                )  # fmt: skip
            fold_arrays = self._fold_records(update, fold_records)
            records.put_fold_update(content, config, update, fold_arrays)
            stats.add_down(arrays_size)
            for record in fold_arrays:
                stats.add_down(records.size(record))
            carries_fixed = fixed_record is not None and not node.holds_fixed
            if carries_fixed:
                content[records.FIXED] = fixed_record
                stats.add_down(fixed_size)
            message = Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN, ttl=self._ttl)
            outgoing.append(Outgoing(pid, message, carries_fixed=carries_fixed, base_version=update.end))
        return outgoing

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

    def _check(self, pid: int, reply: Reply, *, server_round: int) -> Checked | str:
        """What of a parsed reply may be aggregated, or why it may not (shapes, values, norm bound)."""
        by_examples = self.cfg.strategy.weighting == "examples"
        if by_examples and reply.num_examples is None:
            return f"no {records.NUM_EXAMPLES} (the run weights by examples)"
        expected = self.protocol.expected_reply(pid, self.state, server_round=server_round)
        reason = reject_reason(reply.tensors or {}, expected, max_norm=self.cfg.server.max_update_norm)
        if reason is not None:
            return reason
        if reply.base_digest is None:
            return f"no {records.BASE_DIGEST} (the fingerprint of the base weights it trained on)"
        if reply.base_digest != self._base_digest():
            return (
                f"it trained on other base weights than the server's at version {self.fold_log.version} "
                f"(base-digest {reply.base_digest}, expected {self._base_digest()})"
            )
        count = reply.num_examples if by_examples and reply.num_examples is not None else 1
        return Checked(reply.tensors or {}, expected, count, reply.train_loss)

    @property
    def _ttl(self) -> float:
        """A round's messages expire with it: a node back from an outage gets the current round's, not
        stale ones it would spend the round on."""
        return self.cfg.server.round_timeout

    def _base_digest(self) -> int:
        """The fingerprint of the server's D (its current version), which every reply must match."""
        version = self.fold_log.version
        if self._digest_of[0] != version:
            self._digest_of = (version, records.digest_number(self.fold_log.delta))
        return self._digest_of[1]

    # -- round 0 of a gradient initialisation ----------------------------------------------------
    def gradient_round(self, grid: Grid, init: GradientInit, *, expected: Tensors) -> Tensors:
        """The summed base-weight gradients of the clients sampled for round 0, each over its share of
        ``init.samples`` examples, sent once (counted in round 0's stats). ``expected``: zeros shaped
        as a reply must be."""
        chosen = [pid for pid in self.sample(0) if pid in self.nodes]
        stats = self.stats[0] = RoundStats(replies_expected=len(chosen))
        share = math.ceil(init.samples / len(chosen))
        config = ConfigRecord({
            records.SERVER_ROUND: 0, records.PHASE: records.PHASE_INIT, records.INIT_EXAMPLES: share,
            records.LABELS: self.label_names, records.CLIENTS: self.cfg.clients,
        })  # fmt: skip
        outgoing = []
        for pid in chosen:
            content = RecordDict({records.CONFIG: config})
            if (ledger := self.nodes[pid].ledger) is not None:
                content[records.PRIVACY] = records.ledger_record(ledger)
            message = Message(content, dst_node_id=self.nodes[pid].node_id, message_type=MessageType.TRAIN,
                              ttl=self._ttl)  # fmt: skip
            outgoing.append(Outgoing(pid, message))

        def check(pid: int, reply: Reply) -> Tensors | str:
            gradients = reply.tensors or {}
            reason = reject_reason(gradients, expected)  # no norm bound: gradients are sums, not changes
            return reason if reason is not None else gradients

        accepted = collect(
            grid, outgoing, nodes=self.nodes, stats=stats, server_round=0, timeout=self.cfg.server.round_timeout,
            private=self.cfg.privacy.enabled, check=check, on_progress=self.on_progress,
        )  # fmt: skip
        total: Tensors = {}
        for _, gradients in accepted:
            for key, grad in gradients.items():
                total[key] = total[key] + grad.double() if key in total else grad.double()
        if not total:
            raise RuntimeError("no client gave a valid gradient for the initialisation (round 0)")
        log.info("gradient initialisation from %d clients: %d numbers uploaded", len(accepted), stats.numbers_up)
        return {k: v.float() for k, v in total.items()}
