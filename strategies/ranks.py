"""Heterogeneous ranks, shared by FLoRA, FlexLoRA and HetLoRA: which client trains which rank.

The model is built with the largest rank r_max and a client of rank r_k < r_max trains
its first r_k directions (``fedlora.lora.RankMask`` zeroes A's rows and B's columns
beyond r_k and sends only its share). The scale s = alpha / r (``lora.alpha /
lora.rank``) is the same for every client and the server: the LoRA alpha is raised
with r_max so that s stays fixed (FLoRA's authors intend alpha_k = 2 r_k, s = 2;
scaling each client by alpha / r_k instead is the inconsistency their users reported).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlora.lora import AdapterKey, Role
from strategies.base import StrategyConfig, partner

RANK_RULES = ("cycle", "random")


@dataclass(frozen=True)
class RankedConfig(StrategyConfig):
    """``client_ranks``: empty (every client trains ``lora.rank``) or ranks such as ``[2,4,8,16]``;
    ``rank_rule``: ``cycle`` gives partition i rank ``client_ranks[i % len]``, ``random`` a draw
    seeded by (``rank_seed``, i)."""

    client_ranks: str = ""
    rank_rule: str = "cycle"
    rank_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank_rule not in RANK_RULES:
            raise ValueError(f"strategy.rank_rule must be one of {list(RANK_RULES)}, got {self.rank_rule!r}")
        object.__setattr__(self, "client_ranks", ",".join(map(str, self.ranks())))  # [2, 4] -> "2,4"

    def ranks(self) -> tuple[int, ...]:
        """The rank list (empty when homogeneous)."""
        text = str(self.client_ranks).strip().strip("[]()").replace(" ", "")
        try:
            ranks = tuple(int(part) for part in text.split(",") if part)
        except ValueError:
            raise ValueError(
                f"strategy.client_ranks must be ranks such as [2,4,8], got {self.client_ranks!r}"
            ) from None
        if any(r < 1 for r in ranks):
            raise ValueError(f"strategy.client_ranks must be >= 1, got {list(ranks)}")
        return ranks


class HeterogeneousRanks:
    """The rank rules of a strategy whose config is a :class:`RankedConfig` (mixed into its class)."""

    config: RankedConfig

    @classmethod
    def model_rank(cls, config: RankedConfig, *, rank: int) -> int:
        return max(config.ranks(), default=rank)

    @classmethod
    def lora_alpha(cls, config: RankedConfig, *, rank: int, alpha: float) -> float:
        """s = alpha / rank on every client, whatever the model's (largest) rank."""
        return alpha / rank * cls.model_rank(config, rank=rank)

    def client_rank(self, partition_id: int, *, rank: int) -> int:
        ranks = self.config.ranks()
        if not ranks:
            return rank
        if self.config.rank_rule == "random":
            return random.Random(f"flora-rank:{self.config.rank_seed}:{partition_id}").choice(ranks)
        return ranks[partition_id % len(ranks)]


# -- rank self-pruning (HetLoRA) --------------------------------------------------------------------
@dataclass(frozen=True)
class RankState:
    """A self-pruning client's own rank and the norm of its tail when it last trained (its node state)."""

    rank: int
    tail_norm: float


@dataclass(frozen=True)
class PruningConfig(RankedConfig):
    """``prune_lambda``: the strength of the penalty on a client's tail directions (0: no self-pruning);
    ``prune_gamma``: the decay factor, the tail of rank r being its directions from floor(gamma r) on."""

    prune_lambda: float = 0.0
    prune_gamma: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prune_lambda >= 0:
            raise ValueError(f"strategy.prune_lambda must be >= 0, got {self.prune_lambda}")
        if not 0 < self.prune_gamma < 1:
            raise ValueError(f"strategy.prune_gamma must be in (0, 1), got {self.prune_gamma}")


class SelfPruning:
    """Rank self-pruning: a client penalises its tail directions while it trains, and drops them for good
    when their size ended a round smaller than it ended the client's last one.

    The penalty is R = lambda sum_m ||B_m[:, t:r]||_F ||A_m[t:r]||_F over the adapted modules, from
    t = floor(gamma r): the paper writes lambda ||B_t A_t||; this is its upper bound (equal for a
    one-direction tail), whose proximal step is a closed-form shrinkage, stable at any step size
    and reaching exactly zero. That step follows each optimiser step (decoupled, as AdamW's weight
    decay): it reads no example, so DP-SGD's clipping and noise never see it (post-processing).
    """

    config: PruningConfig

    @property
    def prunes(self) -> bool:
        return self.config.prune_lambda > 0

    def tail_start(self, rank: int) -> int:
        """Where rank ``rank``'s tail starts; ``rank`` itself (no tail) when pruning would leave no direction."""
        start = math.floor(self.config.prune_gamma * rank)
        return start if start >= 1 else rank

    def tail_norm(self, tensors: Mapping[AdapterKey, torch.Tensor], rank: int) -> float:
        """sum_m ||B_m[:, t:r]||_F ||A_m[t:r]||_F over the modules in ``tensors`` (the penalty without lambda)."""
        start = self.tail_start(rank)
        return sum(float(b[:, start:rank].double().norm() * tensors[partner(k, Role.A)][start:rank].double().norm())
                   for k, b in tensors.items() if k.role is Role.B)  # fmt: skip

    @torch.no_grad()
    def penalty_step(self, params: Mapping[AdapterKey, torch.Tensor], rank: int, *, lr: float) -> None:
        """The proximal step of size ``lr`` on the penalty, every module's tail in place: each factor is
        shrunk towards zero by lr lambda times the other's norm (both from before the step), never past it."""
        start = self.tail_start(rank)
        if start == rank:
            return
        for key, b in params.items():
            if key.role is Role.B:
                a = params[partner(key, Role.A)]
                b_tail, a_tail = b[:, start:rank], a[start:rank]
                b_norm, a_norm = float(b_tail.norm()), float(a_tail.norm())
                c = lr * self.config.prune_lambda
                b_tail.mul_(shrinkage(b_norm, c * a_norm))
                a_tail.mul_(shrinkage(a_norm, c * b_norm))

    def next_state(self, tensors: Mapping[AdapterKey, torch.Tensor], rank: int, last: RankState | None) -> RankState:
        """After a round at ``rank``: the tail is pruned when its size fell since the client's ``last`` round
        at that rank, or is zero (the new state then holds the size of the new, shorter rank's tail)."""
        norm = self.tail_norm(tensors, rank)
        fell = norm == 0 or (last is not None and last.rank == rank and norm < last.tail_norm)
        if fell and self.tail_start(rank) < rank:
            rank = self.tail_start(rank)
            norm = self.tail_norm(tensors, rank)
        return RankState(rank, norm)


def prunes(strategy: object) -> bool:
    """Whether ``strategy`` self-prunes its clients' ranks (HetLoRA with ``prune_lambda`` > 0)."""
    return isinstance(strategy, SelfPruning) and strategy.prunes


def shrinkage(norm: float, threshold: float) -> float:
    """The factor of the proximal map of ``threshold`` ||x||: x -> x max(0, 1 - threshold / ||x||)."""
    return max(0.0, 1.0 - threshold / norm) if norm > 0 else 1.0


def product_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B A||_F from the small Gram matrices: ||B A||_F^2 = sum((B^T B) * (A A^T)) (HetLoRA's weights)."""
    b, a = b.double(), a.double()
    return float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt())
