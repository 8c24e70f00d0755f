"""What the server and its clients agree on about one round's tensors: no Flower, no model.

Every process draws the same initial state from the run seed, so both sides can
say, without sending anything, what the server broadcasts (:meth:`Protocol.download`),
what a client loads at the start of a round (:meth:`Protocol.start`), which tensors
it trains, at which rank (:meth:`Protocol.rank_mask`), and so what its reply must
hold and where its change is measured from (:meth:`Protocol.expected_reply`).
"""

from __future__ import annotations

from fedlora.lora import LORA_ROLES, AdapterKey, RankMask, Role, Tensors
from fedlora.seeds import Stream, generator
from strategies import Strategy
from strategies.ranks import prunes


class Protocol:
    """A strategy's round, as both sides see it, from the initial state (shapes and starting values)."""

    def __init__(self, strategy: Strategy, initial: Tensors, *, seed: int, model_rank: int, train_head: bool) -> None:
        self.strategy = strategy
        self.initial = dict(initial)
        self.seed = seed
        self.model_rank = model_rank
        self.train_head = train_head
        # LoRA tensors by the strategy's rule; dense (head) modules by train.head.
        self.trainable: frozenset[AdapterKey] = frozenset(
            k for k in initial if (strategy.trainable(k) if k.role in LORA_ROLES else train_head)
        )
        # What a client keeps between rounds and never sends (FedSA-LoRA's B).
        self.personal: frozenset[AdapterKey] = frozenset(
            k for k in initial if k.role in LORA_ROLES and strategy.personal(k)
        )

    def trained_in(self, server_round: int) -> frozenset[AdapterKey]:
        """The tensors clients train (and send) in ``server_round``: ``trainable`` less what the strategy
        freezes that round (RoLoRA's other factor)."""
        strategy = self.strategy
        return frozenset(
            k for k in self.trainable if k.role not in LORA_ROLES or strategy.trains(k, server_round=server_round)
        )

    def download(self, state: Tensors) -> Tensors:
        """What the server broadcasts: the strategy's choice, less a frozen head (clients have it)."""
        down = self.strategy.broadcast(state)
        if not self.train_head:
            down = {k: v for k, v in down.items() if k.role in LORA_ROLES}
        return down

    def rank_mask(self, partition_id: int, *, own: int | None = None) -> RankMask:
        """The rank client ``partition_id`` trains, within the model's: the strategy's, or the client's
        ``own`` lower one (a self-pruning HetLoRA client's, kept in its node state)."""
        rank = self.strategy.client_rank(partition_id, rank=self.model_rank)
        return RankMask(min(rank, own) if own else rank, self.model_rank)

    def start(
        self, partition_id: int, received: Tensors, *, server_round: int, personal: Tensors | None = None
    ) -> Tensors:
        """What the client loads before training: the strategy's start from ``received``, seeded per (round, client).

        The strategy's personal tensors come from ``personal`` (the node's own, kept between rounds),
        else from the initial state: a client sampled for the first time.
        """
        mine = {k: self.initial[k] for k in self.personal} | (personal or {})
        g = generator(Stream.CLIENT_START, self.seed, server_round=server_round, client=partition_id)
        return self.strategy.start(received | mine, like=self.initial, generator=g)

    def expected_reply(
        self, partition_id: int, state: Tensors, *, server_round: int, reply: Tensors | None = None
    ) -> Tensors:
        """The payload the client would send had it not trained, from the server's full ``state``.

        Its keys and shapes are what the client's reply must have (by strategy, rank and
        trainable set), and its values are where the client's change is measured from. A
        self-pruning strategy's client may send fewer directions than its rank: then the
        ``reply``'s rank (its first A's rows), when it is at least 1, is the one expected.
        """
        begin = self.initial | self.start(partition_id, state, server_round=server_round)
        trained = {k: begin[k] for k in self.trained_in(server_round)}
        return self.strategy.payload(self.rank_mask(partition_id, own=self.reply_rank(reply)).view(trained))

    def reply_rank(self, reply: Tensors | None) -> int | None:
        """The rank a self-pruning client's ``reply`` claims (its first A's rows), or None."""
        if not reply or not prunes(self.strategy):
            return None
        a_keys = sorted(k for k in reply if k.role is Role.A)
        return int(reply[a_keys[0]].shape[0]) if a_keys and reply[a_keys[0]].dim() == 2 else None
