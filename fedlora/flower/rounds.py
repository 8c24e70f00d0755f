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
import secrets
from functools import partial

from flwr.serverapp import Grid

from fedlora.config.run import RunConfig
from fedlora.federation import stopping
from fedlora.federation.folding import FoldLog
from fedlora.federation.protocol import Protocol
from fedlora.federation.schedule import sample_partitions
from fedlora.federation.server_step import server_step
from fedlora.federation.validation import reject_reason
from fedlora.federation.weighting import Checked, bounded
from fedlora.flower import records, secure
from fedlora.flower.collect import NodeState, Outgoing, Progress, collect
from fedlora.flower.discovery import JOIN_ASKS, JOIN_TIMEOUT_S, ask_new_nodes
from fedlora.flower.messages import round_config, train_messages
from fedlora.flower.replies import Reply
from fedlora.lora import Tensors
from fedlora.outputs.metrics import RoundStats
from fedlora.privacy.accounting import Step
from fedlora.privacy.user_level import UserLevelDP
from strategies import robust
from strategies import user_dp as user_dp_math
from strategies.server_opt import ServerOptimizer

log = logging.getLogger(__name__)


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
        self.combine = robust.combiner(cfg.server.aggregation, trim=cfg.server.trim_fraction)  # what a mean is
        own = self.own_data = own_data or set()  # partitions whose node trains on its own data file
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
        self.nonces: dict[int, int] = {}  # round -> the nonce its replies must echo
        self._asked: dict[int, int] = {}  # late node id -> partition queries sent to it (JOIN_ASKS: no more)
        self._digest_of: tuple[int, int] = (-1, 0)  # (D's version, its digest_number)
        self.user_dp = UserLevelDP(cfg) if cfg.privacy.user_level else None
        # a round's messages expire with it: a node back from an outage gets the current round's, not stale ones
        self.ttl = cfg.server.round_timeout

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
        if self.cfg.server.secure:
            self._secure_step(grid, server_round, outgoing, stats)
            return
        accepted = collect(
            grid, outgoing, nodes=self.nodes, stats=stats, server_round=server_round,
            timeout=self.cfg.server.round_timeout, straggler_factor=self.cfg.server.straggler_factor,
            private=self.cfg.privacy.enabled, check=partial(self._check, server_round=server_round),
            on_progress=self.on_progress,
        )  # fmt: skip
        for pid, _ in accepted:  # under DP: it has released label counts (a personalised evaluation's mix)
            self.nodes[pid].trained = True
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
        payloads, p, losses = bounded(accepted, self.strategy, self.cfg, known_sizes=self.known_sizes,
                                      server_round=server_round)  # fmt: skip
        step = server_step(self.strategy, self.state, payloads, p, server_round=server_round,
                           optimizer=self.server_opt, combine=self.combine)  # fmt: skip
        self.state, stats.report = step.state, step.report
        if step.fold:
            self.fold_log.append(step.fold)
        if None not in losses:
            stats.train_loss = sum(w * x for w, x in zip(p.tolist(), losses, strict=True))

    def _user_level_step(self, server_round: int, accepted: list[tuple[int, Checked]], stats: RoundStats) -> None:
        """privacy=user: whatever replied (none included), clipped, summed, noised, divided by the expected
        cohort; the strategy aggregates that one payload, the server optimiser and refinement post-process."""
        assert self.user_dp is not None
        like = self.protocol.expected_reply(0, self.state, server_round=server_round)
        checked = [c for _, c in accepted]
        payload = self.user_dp.round(server_round, [c.start for c in checked], [c.payload for c in checked], like)
        step = server_step(self.strategy, self.state, [payload], self.strategy.weights([1]),
                           server_round=server_round, optimizer=self.server_opt)  # fmt: skip
        self.state, stats.report = step.state, step.report | self.user_dp.columns()

    def _secure_step(self, grid: Grid, server_round: int, outgoing: list[Outgoing], stats: RoundStats) -> None:
        """The server step on a secure round's unmasked mean (privacy=user: on the noised sum of clipped
        updates, noised and charged even when too few clients were left: that does not depend on the data)."""
        like = self.protocol.expected_reply(0, self.state, server_round=server_round)
        mean = secure.secure_mean(grid, outgoing, cfg=self.cfg, like=like, nodes=self.nodes, stats=stats,
                                  server_round=server_round, nonce=self.nonces[server_round], known=self.known_sizes,
                                  clip=self.user_dp.clip.bound if self.user_dp else None)  # fmt: skip
        if self.user_dp is not None:
            payload = self.user_dp.round_from_secure(server_round, mean, like=like)
        elif mean is None or mean.count < self.cfg.server.min_replies:
            return
        else:
            payload, stats.train_loss = user_dp_math.apply(like, mean.update), mean.train_loss
        step = server_step(self.strategy, self.state, [payload], self.strategy.weights([1]),
                           server_round=server_round, optimizer=self.server_opt)  # fmt: skip
        self.state, stats.report = step.state, step.report | (self.user_dp.columns() if self.user_dp else {})

    def _train_messages(self, server_round: int, chosen: list[int], stats: RoundStats) -> list[Outgoing]:
        fixed = self.strategy.fixed(self.state)
        digest = records.digest(fixed) if fixed else ""
        if digest != self._fixed_digest:  # new fixed tensors: no node holds them yet
            self._fixed_digest = digest
            for node in self.nodes.values():
                node.holds_fixed = False
        self.nonces[server_round] = secrets.randbits(62)  # not from the seed: it only ties replies to this round
        config = round_config(server_round, self.nonces[server_round], fixed, labels=self.label_names,
                              clients=self.cfg.clients)  # fmt: skip
        return train_messages(
            [(pid, self.nodes[pid]) for pid in chosen], self.protocol.download(self.state), fixed, config,
            fold_log=self.fold_log, stats=stats, ttl=self.ttl,
        )  # fmt: skip

    def _check(self, pid: int, reply: Reply, *, server_round: int) -> Checked | str:
        """What of a parsed reply may be aggregated, or why it may not (shapes, values, norm bound)."""
        by_examples = self.cfg.strategy.weighting == "examples"
        if by_examples and reply.num_examples is None:
            return f"no {records.NUM_EXAMPLES} (the run weights by examples)"
        if reply.round_nonce != self.nonces.get(server_round):
            return f"it does not answer round {server_round}'s message (round nonce {reply.round_nonce})"
        expected = self.protocol.expected_reply(pid, self.state, server_round=server_round, reply=reply.tensors)
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

    def _base_digest(self) -> int:
        """The fingerprint of the server's D (its current version), which every reply must match."""
        version = self.fold_log.version
        if self._digest_of[0] != version:
            self._digest_of = (version, records.digest_number(self.fold_log.delta))
        return self._digest_of[1]
