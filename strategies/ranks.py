"""Heterogeneous ranks, shared by FLoRA, FlexLoRA and HetLoRA: which client trains which rank.

The model is built with the largest rank r_max and a client of rank r_k < r_max trains
its first r_k directions (``fedlora.lora.RankMask`` zeroes A's rows and B's columns
beyond r_k and sends only its share). The scale s = alpha / r (``lora.alpha /
lora.rank``) is the same for every client and the server: the LoRA alpha is raised
with r_max so that s stays fixed (FLoRA's authors intend alpha_k = 2 r_k, s = 2;
scaling each client by alpha / r_k instead is the inconsistency their users reported).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from strategies.base import StrategyConfig

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
