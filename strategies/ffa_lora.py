"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

A is drawn once from the run seed and frozen; B starts at zero and is the only
LoRA matrix that clients train and send. With A shared, averaging B is exact:
sum_k p_k s B_k A = s (sum_k p_k B_k) A. Upload per adapted weight: d_out * r.

A is never sent: every process draws it in ``initial_state`` from the generator
the run seed gives, so it is bit-identical on every client and in every round.

Scaling: with A frozen, alpha sets how far a step on B moves the weight, and the
paper reports FFA-LoRA insensitive to alpha over a wide range and prefers larger
values than vanilla LoRA's. ``alpha`` (default 64, i.e. s = 8 at r = 8, four times
``lora.alpha``'s default 16) overrides ``lora.alpha`` for this strategy; set
``strategy.alpha=null`` to use ``lora.alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.lora import AdapterKey, Role, Tensors
from strategies.base import Strategy, StrategyConfig, kaiming_a


@dataclass(frozen=True)
class FFALoraConfig(StrategyConfig):
    """``alpha``: LoRA alpha for this strategy (None: ``lora.alpha``)."""

    alpha: float | None = 64.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"strategy.alpha must be > 0, got {self.alpha}")


class FFALora(Strategy):
    """Train and average B only (B <- sum_k p_k B_k, the default ``aggregate``); A frozen at a seeded draw.

    User-level DP (``privacy=user``): the update (B_k - B and the head's) clipped to C: sensitivity C
    of the sum, over half of FedAvg's dimensions, so half the noise norm for the same sigma.
    """

    name = "ffa_lora"
    config_class = FFALoraConfig

    @classmethod
    def lora_alpha(cls, config: StrategyConfig, *, rank: int, alpha: float) -> float:
        own = getattr(config, "alpha", None)
        return alpha if own is None else own

    def trainable(self, key: AdapterKey) -> bool:
        return key.role is Role.B

    def initial_state(self, adapters: Tensors, *, generator: torch.Generator) -> Tensors:
        """A: (r, d_in) drawn from ``generator``; B: zeros (d_out, r), so dW = 0 at the start."""
        state = dict(adapters)
        for key in sorted(adapters):
            if key.role is Role.A:
                state[key] = kaiming_a(adapters[key], generator=generator)
            elif key.role is Role.B:
                state[key] = torch.zeros_like(adapters[key])
        return state

    def broadcast(self, state: Tensors) -> Tensors:
        """Everything but A, which every process already holds from the seed."""
        return {k: v for k, v in state.items() if k.role is not Role.A}
