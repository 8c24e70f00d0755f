"""FedAvg on LoRA (McMahan et al., AISTATS 2017, applied to the LoRA factors).

A and B are averaged separately, each weighted by p_k. This is inexact: in general
sum_k p_k B_k A_k - B_bar A_bar = sum_k p_k (B_k - B_bar)(A_k - A_bar) != 0,
which is the error the exact strategies remove.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.lora import Tensors
from strategies.base import Strategy, average_payloads


class FedAvg(Strategy):
    """Example-weighted mean of every tensor the clients send."""

    name = "fedavg"

    def aggregate(
        self, state: Tensors, payloads: Sequence[Tensors], p: torch.Tensor, *, server_round: int = 1
    ) -> Tensors:
        """B_bar = sum_k p_k B_k, A_bar = sum_k p_k A_k (and dense modules alike)."""
        return average_payloads(state, payloads, p)
